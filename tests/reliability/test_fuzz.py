"""A short, deterministic run of bench/fuzz.py (the full run: `python -m bench.fuzz --inputs 100000`)."""

from __future__ import annotations

import pytest

from bench import fuzz


def test_fuzz_parser_meter_and_exchange_raise_nothing_unexpected():
    doc = fuzz.run(inputs=3000, seed=20261129)
    assert doc["inputs"] >= 3000
    assert set(doc["per_target"]) == set(fuzz.SHARES)
    assert doc["exceptions"] == 0, doc["failures"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "x", "name": ' + b"[" * 300 + b"]" * 300 + b"}]}",
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": ' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": ' + b"[" * 254 + b"]" * 254 + b"}",
    ],
)
def test_found_by_fuzzing_deep_nesting_is_a_bad_request(raw: bytes):
    """Found by this fuzzer: JSON nested deeper than orjson writes (254) raised TypeError in parse (extra
    message fields, tools) or in the upstream rewrite (any field), so Envoy answered 503 instead of a 400."""
    fuzz.check_parse("chat", raw, 16)  # raises anything but BadRequest on failure
