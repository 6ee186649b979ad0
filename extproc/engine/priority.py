"""The paper's control formulas (arXiv 2603.00356, Eq. 1-3), as plain functions of numbers.

Debt bound: the gap g lies in [1 - m, 1], where m is the largest ratio capacity/baseline over the entitlement's
dimensions (usage can never exceed the pool's capacity). Debt is an exponential average of gaps started at 0,
so it stays in the same interval; an idle entitlement has gap 0 and its debt decays geometrically (anti-windup).
"""

from __future__ import annotations

# Negative debt (credit) lowers priority, but the debt factor never drops below this: credit can't zero a weight.
MIN_DEBT_FACTOR = 0.1


def weight(
    class_weight: float,
    slo_ms: float,
    mean_slo_ms: float,
    burst: float,
    debt: float,
    alpha_slo: float,
    alpha_burst: float,
    alpha_debt: float,
) -> float:
    """Eq. 1: w = w_κ · 1/(1 + α_slo·ℓ/ℓ̄) · 1/(1 + α_burst·b) · (1 + α_debt·d)."""
    slo_factor = 1.0 / (1.0 + alpha_slo * slo_ms / mean_slo_ms) if mean_slo_ms > 0 else 1.0
    debt_factor = max(MIN_DEBT_FACTOR, 1.0 + alpha_debt * debt)
    return class_weight * slo_factor / (1.0 + alpha_burst * max(burst, 0.0)) * debt_factor


def ema(previous: float, sample: float, gamma: float) -> float:
    """Eq. 2 and 3: x ← γ·x + (1 − γ)·sample."""
    return gamma * previous + (1.0 - gamma) * sample


def burst_sample(usage: tuple[float, ...], baseline: tuple[float, ...]) -> float:
    """Eq. 3's δ: Σ over dimensions with a baseline of max(0, used/baseline − 1)."""
    return sum(max(0.0, u / b - 1.0) for u, b in zip(usage, baseline) if b > 0)


def gap_sample(usage: tuple[float, ...], baseline: tuple[float, ...], refused: bool) -> float:
    """Eq. 2's g, measured: 1 − (dominant share of baseline actually used).

    Positive gap (under-service) only counts when the entitlement asked for more than it got in the period (a
    request was queued or rejected); an entitlement that was never refused is fully served, so its gap is at
    most 0 (credit when it used more than its baseline).
    """
    shares = [u / b for u, b in zip(usage, baseline) if b > 0]
    if not shares:
        return 0.0
    g = 1.0 - max(shares)
    return g if refused else min(g, 0.0)
