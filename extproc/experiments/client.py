"""The client model, shared by the virtual-time and the live runner.

- A 429 (or 503) carries `Retry-After` in whole seconds (the adapter rounds the engine's estimate up, at least 1;
  `extproc.envoy.errors.retry_after_seconds`); the client waits exactly that plus a jitter of 0–100 ms (its own
  seeded generator) and sends the same request again. Without a Retry-After it waits 1 s. There is no retry
  limit; a user whose load period has ended by the time it would retry gives up (the request is counted as
  not served).
- An evicted request (preemptible work terminated for higher-priority work) is a 429 with Retry-After 1 to the
  client: it waits 1 s and sends the whole request again (tokens already streamed are lost).
- 403 (entitlement absent, pending or removed) and 400 (can never fit): the request is given up at once.
- A request held in the gateway queue simply waits (no client timeout shorter than the queue's own).
- Closed-loop users send their next request `think` seconds after the previous one ended (served or given up);
  in virtual time it reaches the gateway 5 ms (simulated) later still (runner.TURNAROUND_S: the network and the
  client), live the real path's delay applies.
"""

from __future__ import annotations

from extproc.engine.decisions import Reason
from extproc.envoy.errors import HTTP_FOR_REASON, retry_after_seconds

JITTER_S = 0.1
EVICTED_RETRY_S = 1.0


def retry_delay(reason: Reason | None, retry_after: float | None, jitter: float) -> float | None:
    """Seconds until the client tries again, or None when it gives up (403 / 400)."""
    if reason is Reason.EVICTED:
        return EVICTED_RETRY_S + jitter
    status = HTTP_FOR_REASON.get(reason, 429) if reason is not None else 429
    if reason is Reason.OVER_KV and retry_after is None:
        return None  # 400: can never fit
    if status == 403:
        return None
    return retry_after_seconds(retry_after) + jitter


def retry_delay_http(status: int, retry_after_header: str | None, jitter: float) -> float | None:
    """The same rule from an HTTP answer (live mode)."""
    if status in (429, 503):
        try:
            secs = float(retry_after_header) if retry_after_header else 1.0
        except ValueError:
            secs = 1.0
        return max(1.0, secs) + jitter
    if status >= 500:  # upstream error after admission (e.g. backend reset): try again in a second
        return 1.0 + jitter
    return None
