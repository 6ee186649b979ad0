"""Client-facing refusals: OpenAI error JSON, HTTP status per engine reason, Retry-After and RateLimit headers.

Status codes (DESIGN.md §6):
- 400 invalid_request_error: body is not JSON, not an object, or a field has the wrong type.
- 401 invalid_request_error / invalid_api_key: no bearer key, or a key no entitlement holds.
- 403 permission_error: the key is known but its entitlement is not Bound (Pending/Expired) or was removed.
  403 rather than 429: waiting does not help, an operator has to act.
- 404 invalid_request_error: unknown model (model_not_found) or unknown path (unknown_url).
- 405: a metered endpoint called with a method other than POST.
- 413 invalid_request_error / request_too_large: body over the server's --max-body-bytes.
- 415 invalid_request_error / unsupported_content_encoding: a compressed request body (gzip, br, ...).
- 400 invalid_request_error / over_kv: prompt + max_tokens larger than the pool's or the entitlement's whole KV
  (the engine says so with OVER_KV and no retry time): waiting cannot help, so not a 429.
- 429 rate_limit_exceeded: every per-entitlement or pool-contention reason, queue full, queue timeout, eviction.
  `code` is the engine reason (`over_concurrency`, `pool_contended`, `queue_timeout`, ...). Carries
  `Retry-After` (whole seconds, rounded up, at least 1) and RateLimit-* headers.
- 503 service_unavailable / no_capacity: the pool has zero replicas (scale from zero pending); Retry-After too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import orjson

from ..engine.decisions import Reason

HTTP_FOR_REASON: dict[Reason, int] = {
    Reason.NOT_BOUND: 403,
    Reason.ENTITLEMENT_REMOVED: 403,
    Reason.OVER_CONCURRENCY: 429,
    Reason.OVER_THROUGHPUT: 429,
    Reason.OVER_KV: 429,
    Reason.POOL_CONTENDED: 429,
    Reason.QUEUE_FULL: 429,
    Reason.QUEUE_TIMEOUT: 429,
    Reason.EVICTED: 429,
    Reason.NO_CAPACITY: 503,
}

_MESSAGES: dict[Reason, str] = {
    Reason.NOT_BOUND: "Your entitlement is not active (pending or expired); contact the operator.",
    Reason.ENTITLEMENT_REMOVED: "Your entitlement was removed while the request waited.",
    Reason.OVER_CONCURRENCY: "Too many requests in flight for your entitlement.",
    Reason.OVER_THROUGHPUT: "Token rate limit reached for your entitlement.",
    Reason.OVER_KV: "Not enough KV cache available for your entitlement (or the request is larger than the pool).",
    Reason.POOL_CONTENDED: "The pool is busy and higher-priority work holds the capacity.",
    Reason.QUEUE_FULL: "The admission queue is full.",
    Reason.QUEUE_TIMEOUT: "Capacity did not free up before your request's queue deadline.",
    Reason.EVICTED: "Request evicted: preemptible work was terminated to give capacity to higher-priority work.",
    Reason.NO_CAPACITY: "The pool has no replicas at the moment (scaling up).",
}


_NEVER_FITS = (
    "The request (prompt + max_tokens) needs more KV cache than your entitlement or the pool can ever hold; "
    "shorten the prompt or lower max_tokens."
)


@dataclass(slots=True)
class Reply:
    """An ImmediateResponse in plain terms; `service` turns it into protobuf."""

    status: int
    type: str
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    details: str = ""

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type, "code": self.code}})


def retry_after_seconds(retry_after: float | None) -> int:
    """Whole seconds, rounded up, never below 1 (a 0 would invite an immediate retry storm)."""
    if retry_after is None or not math.isfinite(retry_after) or retry_after <= 0:
        return 1
    return max(1, math.ceil(retry_after - 1e-9))


def ratelimit_headers(limit: int | None, remaining: int | None, reset: int) -> dict[str, str]:
    """RateLimit header fields (draft-ietf-httpapi-ratelimit-headers, the -Limit/-Remaining/-Reset form).

    The quota they describe is the entitlement's concurrency ceiling: requests in flight at once. It is the
    one quota a client can act on request by request; token rates show up as Retry-After instead.
    """
    if limit is None:
        return {"ratelimit-reset": str(reset)}
    return {
        "ratelimit-limit": str(limit),
        "ratelimit-remaining": str(max(0, remaining if remaining is not None else limit)),
        "ratelimit-reset": str(reset),
    }


def for_reason(reason: Reason | None, retry_after: float | None, limit: int | None = None) -> Reply:
    reason = reason or Reason.POOL_CONTENDED
    if reason is Reason.OVER_KV and retry_after is None:
        # The engine's "can never fit": prompt + max_tokens exceed the pool's (or the entitlement's) whole KV.
        # Retrying cannot help, so this is a 400 like OpenAI's context_length_exceeded, not a 429.
        return Reply(400, "invalid_request_error", reason.value, _NEVER_FITS, details="tokenpools_over_kv")
    status = HTTP_FOR_REASON.get(reason, 429)
    headers: dict[str, str] = {}
    if status in (429, 503):
        secs = retry_after_seconds(retry_after)
        headers["retry-after"] = str(secs)
        if status == 429:
            headers.update(ratelimit_headers(limit, 0, secs))
        else:
            headers.update(ratelimit_headers(None, None, secs))
    kind = {403: "permission_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}[status]
    return Reply(status, kind, reason.value, _MESSAGES.get(reason, reason.value), headers, f"tokenpools_{reason.value}")


def bad_request(message: str, code: str = "invalid_body") -> Reply:
    return Reply(400, "invalid_request_error", code, message, details="tokenpools_bad_request")


def unauthorized(message: str) -> Reply:
    return Reply(
        401, "invalid_request_error", "invalid_api_key", message, {"www-authenticate": "Bearer"}, "tokenpools_unauthorized"
    )


def model_not_found(model: str) -> Reply:
    return Reply(
        404,
        "invalid_request_error",
        "model_not_found",
        f"The model {model!r} does not exist or is not served here.",
        details="tokenpools_model_not_found",
    )


def unknown_url(method: str, path: str) -> Reply:
    return Reply(
        404, "invalid_request_error", "unknown_url", f"Unknown request URL: {method} {path}.", details="tokenpools_unknown_url"
    )


def method_not_allowed(method: str, path: str) -> Reply:
    return Reply(
        405,
        "invalid_request_error",
        "method_not_allowed",
        f"{method} is not allowed on {path}; use POST.",
        {"allow": "POST"},
        "tokenpools_method_not_allowed",
    )


def too_large(size: int, limit: int) -> Reply:
    return Reply(
        413,
        "invalid_request_error",
        "request_too_large",
        f"Request body is {size} bytes; the limit is {limit} bytes.",
        details="tokenpools_request_too_large",
    )


def unsupported_encoding(encoding: str) -> Reply:
    """A compressed request body (Content-Encoding other than identity): we would have to inflate untrusted
    input to meter it (a decompression bomb), and vLLM does not accept compressed bodies either."""
    return Reply(
        415,
        "invalid_request_error",
        "unsupported_content_encoding",
        f"Content-Encoding {encoding[:40]!r} is not supported for request bodies; send the JSON uncompressed.",
        details="tokenpools_unsupported_encoding",
    )


def internal(message: str = "The gateway could not process the request.") -> Reply:
    return Reply(500, "server_error", "internal_error", message, details="tokenpools_internal")


def sse_error_event(reply: Reply) -> bytes:
    """The same error as an SSE event, for a stream that already started (the client sees it before the cut)."""
    return b"data: " + reply.body() + b"\n\n"
