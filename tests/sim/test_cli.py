"""The sim-backend command: options, custom profiles, and running it as a subprocess."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import click
from click.testing import CliRunner

from extproc.sim.cli import sim_backend
from extproc.sim.profiles import get_profile, load_profile


def test_is_a_click_command_with_help():
    assert isinstance(sim_backend, click.Command)
    result = CliRunner().invoke(sim_backend, ["--help"])
    assert result.exit_code == 0
    for opt in ("--model", "--port", "--host", "--profile", "--profile-file", "--max-num-seqs", "--kv-cache-tokens",
                "--time-scale", "--stream-interval"):
        assert opt in result.output


def test_bad_options_are_usage_errors(tmp_path: Path):
    r = CliRunner().invoke(sim_backend, ["--kv-cache-tokens", "100"])  # smaller than max_model_len
    assert r.exit_code == 2 and "max_model_len" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: paper-spark\nwarp_drive: 9\n")
    r = CliRunner().invoke(sim_backend, ["--profile-file", str(bad)])
    assert r.exit_code == 2 and "warp_drive" in r.output


def test_yaml_profile(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: h100-llama3-8b\nname: mine\nmax_num_seqs: 8\nmin_step_s: 0.02\n")
    p = load_profile(f)
    assert (p.name, p.max_num_seqs, p.min_step_s) == ("mine", 8, 0.02)
    assert p.kv_cache_tokens == get_profile("h100-llama3-8b").kv_cache_tokens
    g = tmp_path / "full.yaml"
    g.write_text("max_num_seqs: 2\nmax_num_batched_tokens: 64\nkv_cache_tokens: 1024\nmax_model_len: 512\n")
    assert load_profile(g).name == "full" and load_profile(g).block_size == 16


def test_python_m_runs_the_server():
    proc = subprocess.Popen([sys.executable, "-m", "extproc.sim", "--port", "0", "--model", "m", "--time-scale", "10"],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "listening on http://127.0.0.1:" in line
        url = line.split("listening on ")[1].split()[0]
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, "SIGTERM stops it cleanly"
