"""What the operator views show, computed from the status server's documents.

`tokenpools top` and the status page (`GET /`, status.html) show the same rows; this module is the Python half
(the page repeats the few lines of arithmetic in JavaScript). Input: `/status` (Engine.snapshot()), optionally
`/status/scaler` (the controller's desired replicas; 404 when the server runs without one). Rates (admitted/s,
rejected/s by reason) are counter deltas between two polls divided by the seconds between them; the first poll
has none.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

CLASS_ORDER = {"dedicated": 0, "guaranteed": 1, "elastic": 2, "spot": 3, "preemptible": 4}
DIMENSIONS = (("tokens_per_second", "tok/s"), ("kv_cache_tokens", "KV"), ("concurrency", "conc"))


class Unreachable(Exception):
    """The status server did not answer (or answered something that is not its JSON)."""


@dataclass
class Poll:
    t: float  # the poller's clock (monotonic seconds)
    status: dict[str, Any]
    scaler: dict[str, Any] | None


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def fetch(base: str, t: float, timeout: float = 2.0) -> Poll:
    """One poll of `base` (e.g. http://127.0.0.1:9464): /status, and /status/scaler when the server has one."""
    base = base.rstrip("/")
    try:
        code, body = _get(base + "/status", timeout)
        if code != 200:
            raise Unreachable(f"{base}/status answered HTTP {code}")
        status = json.loads(body)
        if not isinstance(status, dict) or "pools" not in status or "entitlements" not in status:
            raise Unreachable(f"{base}/status is not a tokenpools status document")
        code, body = _get(base + "/status/scaler", timeout)
        scaler = json.loads(body) if code == 200 else None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach the tokenpools status server at {base}: {reason}") from exc
    return Poll(t, status, scaler)


def _rate(now: float | int, before: float | int | None, dt: float | None) -> float | None:
    if before is None or not dt or dt <= 0:
        return None
    return max(0.0, (now - before) / dt)


def rows(cur: Poll, prev: Poll | None = None) -> dict[str, Any]:
    """The rows both views show: {"pools": [...], "entitlements": [...], "interval_s": dt or None}.

    Pools sorted by name; entitlements by pool, then class (dedicated first), then name."""
    dt = (cur.t - prev.t) if prev is not None else None
    scaler_pools = (cur.scaler or {}).get("pools", {})
    pools = []
    for name in sorted(cur.status["pools"]):
        p = cur.status["pools"][name]
        sc = scaler_pools.get(name)
        backends = (sc or {}).get("backends") or {}
        pools.append(
            {
                "pool": name,
                "model": p.get("model"),
                "replicas": p.get("replicas"),
                "desired_replicas": sc.get("desiredReplicas") if sc else None,
                "live_replicas": backends.get("liveReplicas"),
                "capacity": p.get("capacity", {}),
                "used": p.get("used", {}),
                "queued": p.get("queued", 0),
                "in_flight": p.get("in_flight", 0),
            }
        )
    before = prev.status["entitlements"] if prev is not None else {}
    ents = []
    for name, e in cur.status["entitlements"].items():
        b = before.get(name)
        reasons = e.get("rejected_by_reason") or {}
        b_reasons = (b or {}).get("rejected_by_reason") or {}
        by_reason = {}
        for why, n in sorted(reasons.items()):
            r = _rate(n, b_reasons.get(why, 0) if b is not None else None, dt)
            if r:
                by_reason[why] = r
        # Shadow mode: admitted, but enforcement would have refused them ("would <reason>").
        would = (e.get("shadow_would") or {}).get("by_reason") or {}
        b_would = ((b or {}).get("shadow_would") or {}).get("by_reason") or {}
        for why, n in sorted(would.items()):
            r = _rate(n, b_would.get(why, 0) if b is not None else None, dt)
            if r:
                by_reason[f"would {why}"] = r
        ents.append(
            {
                "entitlement": name,
                "tenant": e.get("tenant"),
                "pool": e.get("pool"),
                "class": e.get("class"),
                "shadow": bool(e.get("shadow")),
                "state": e.get("state"),
                "used": e.get("used", {}),
                "baseline": e.get("baseline", {}),
                "ceiling": e.get("ceiling", {}),
                "weight": e.get("weight"),
                "debt": e.get("debt"),
                "burst": e.get("burst"),
                "queued": e.get("queued", 0),
                "in_flight": e.get("in_flight", 0),
                "admitted_total": e.get("admitted_total", 0),
                "rejected_total": e.get("rejected_total", 0),
                "rejected_by_reason": dict(reasons),
                "admitted_per_s": _rate(e.get("admitted_total", 0), b.get("admitted_total") if b else None, dt),
                "rejected_per_s": _rate(e.get("rejected_total", 0), b.get("rejected_total") if b else None, dt),
                "rejected_per_s_by_reason": by_reason,
            }
        )
    ents.sort(key=lambda r: (r["pool"] or "", CLASS_ORDER.get(r["class"], 9), r["entitlement"]))
    for p in pools:  # per pool: the sum of its entitlements' rates
        mine = [e for e in ents if e["pool"] == p["pool"]]
        for k in ("admitted_per_s", "rejected_per_s"):
            vals = [e[k] for e in mine if e[k] is not None]
            p[k] = sum(vals) if vals else None
    return {"interval_s": dt, "pools": pools, "entitlements": ents}


# ---- formatting (shared by the table and the tests) ----------------------------------------------------------


def num(x: float | int | None) -> str:
    """Compact: 7, 12.5, 3.2k, 1.1M; '-' for none."""
    if x is None:
        return "-"
    x = float(x)
    a = abs(x)
    if a >= 1e6:
        return f"{x / 1e6:.1f}M"
    if a >= 1e4:
        return f"{x / 1e3:.0f}k"
    if a >= 1e3:
        return f"{x / 1e3:.1f}k"
    if a == int(a):
        return str(int(x))
    return f"{x:.1f}" if a >= 10 else f"{x:.2f}".rstrip("0").rstrip(".")


def pair(used: float | int | None, of: float | int | None) -> str:
    """'used/of', or just 'used' when there is nothing to compare with (no baseline)."""
    if not of:
        return num(used)
    return f"{num(used)}/{num(of)}"
