"""Token estimates (prior and learning) and the wording of refusals."""

from __future__ import annotations

import orjson
import pytest

from extproc.engine import Reason
from extproc.envoy import errors
from extproc.envoy.openai import parse
from extproc.envoy.tokens import LEARN_MIN_BYTES, PRIOR_BYTES_PER_TOKEN, TokenEstimator


def chat(text: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})


def test_prior_estimate():
    est = TokenEstimator().estimate(parse("chat", chat("x" * 400)))
    assert est.tokens == 400 / PRIOR_BYTES_PER_TOKEN + 4 + 3
    ids = TokenEstimator().estimate(parse("completions", orjson.dumps({"model": "m", "prompt": [1, 2, 3]})))
    assert ids.tokens == 3  # exact


def test_learns_the_ratio_from_reported_usage():
    te = TokenEstimator()
    req = parse("chat", chat("é" * 1000))  # 2000 bytes of text
    for _ in range(40):
        est = te.estimate(req)
        te.observe("m", est, prompt_tokens=1000 + 7)  # this model's tokenizer: 2 bytes per token here
    assert te.ratio("m") == pytest.approx(2.0, rel=0.05)
    assert te.estimate(req).tokens == pytest.approx(1007, rel=0.05)
    assert te.ratio("other") == PRIOR_BYTES_PER_TOKEN


def test_ignores_small_or_missing_observations():
    te = TokenEstimator()
    small = te.estimate(parse("chat", chat("x" * (LEARN_MIN_BYTES - 1))))
    te.observe("m", small, 1)
    te.observe("m", te.estimate(parse("chat", chat("x" * 1000))), None)
    assert te.ratio("m") == PRIOR_BYTES_PER_TOKEN


@pytest.mark.parametrize("value, secs", [(None, 1), (0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (7.5, 8), (float("inf"), 1)])
def test_retry_after_rounds_up_to_whole_seconds(value, secs):
    assert errors.retry_after_seconds(value) == secs


def test_reason_replies():
    r = errors.for_reason(Reason.POOL_CONTENDED, 2.3, limit=6)
    assert r.status == 429 and r.headers["retry-after"] == "3"
    assert r.headers["ratelimit-limit"] == "6" and r.headers["ratelimit-remaining"] == "0"
    assert orjson.loads(r.body()) == {"error": {"message": r.message, "type": "rate_limit_exceeded", "code": "pool_contended"}}
    assert errors.for_reason(Reason.NO_CAPACITY, 30).status == 503
    assert errors.for_reason(Reason.NO_CAPACITY, 30).headers["retry-after"] == "30"
    assert errors.for_reason(Reason.NOT_BOUND, None).status == 403
    assert "retry-after" not in errors.for_reason(Reason.NOT_BOUND, None).headers
    assert errors.for_reason(Reason.OVER_KV, None).status == 400  # never fits
    assert errors.for_reason(Reason.OVER_KV, 1.5).status == 429  # fits later
    for reason in Reason:
        assert errors.for_reason(reason, 1.0).status in (400, 403, 429, 503)
