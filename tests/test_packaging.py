"""The wheel carries what `tokenpools` reads at run time outside Python code: the Envoy bootstraps (linked from
envoy/ into extproc/envoy/templates/), the status page and the examples. Built here, not assumed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_envoy_bootstraps_and_page(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("tokenpools-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in ("bootstrap.yaml", "tls-ext-proc.yaml"):
            # the file itself, not a link: a wheel has no symlinks
            assert z.read(f"extproc/envoy/templates/{name}") == (REPO / "envoy" / name).read_bytes(), name
    assert "extproc/ui/status.html" in names
    assert any(n.startswith("extproc/examples/") and n.endswith(".yaml") for n in names), sorted(names)


def test_the_renderer_reads_the_packaged_template():
    from extproc.envoy.bootstrap import TEMPLATE, TLS_SNIPPET

    assert TEMPLATE.is_relative_to(REPO / "extproc") and TLS_SNIPPET.is_relative_to(REPO / "extproc")
    assert TEMPLATE.read_bytes() == (REPO / "envoy" / "bootstrap.yaml").read_bytes()
