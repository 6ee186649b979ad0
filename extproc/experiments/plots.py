"""PNG plots (matplotlib, Agg): kept small (≈ 100 dpi, few colours) so the key ones can be committed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
DPI = 90


def _phase_lines(ax, results: dict[str, Any]) -> None:
    for ph in results["phases"][1:]:
        ax.axvline(ph["start_s"], color="#999999", lw=0.8, ls="--")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def timeline(results: dict[str, Any], out: Path) -> Path:
    """Sequences in flight per tenant over time, one panel per policy, with the pool's capacity."""
    pols = list(results["policies"])
    fig, axes = plt.subplots(len(pols), 1, figsize=(9, 1.9 * len(pols) + 0.4), sharex=True, squeeze=False)
    tenants = list(results["tenants"])
    for ax, pol in zip(axes[:, 0], pols):
        s = results["policies"][pol]["series"]
        t = s["t"]
        ys = [[v or 0 for v in s["tenants"][n].get("in_flight", [0] * len(t))] for n in tenants]
        ax.stackplot(t, *ys, labels=tenants, colors=COLORS[: len(tenants)], alpha=0.85, step="post")
        ax.step(t, s["capacity"], where="post", color="black", lw=1.2, label="capacity (slots)")
        if any(s["waiting"]):
            ax.plot(t, [r + w for r, w in zip(s["running"], s["waiting"])], color="#d62728", lw=0.9, ls=":",
                    label="running + waiting in vLLM")
        _phase_lines(ax, results)
        ax.set_ylabel("in flight")
        ax.set_title(pol, fontsize=9, loc="left")
        ax.set_ylim(0, max(max(s["capacity"]), max((r + w for r, w in zip(s["running"], s["waiting"])), default=0)) * 1.15 + 1)
    axes[0, 0].legend(fontsize=7, ncol=len(tenants) + 2, loc="upper center", bbox_to_anchor=(0.5, 1.45), frameon=False)
    axes[-1, 0].set_xlabel("time (s)")
    return _save(fig, out)


def ttft_bars(results: dict[str, Any], out: Path) -> Path:
    """p99 TTFT per tenant and phase, one bar per policy (log scale)."""
    pols = list(results["policies"])
    phases = [p["name"] for p in results["policies"][pols[0]]["phases"]]
    tenants = list(results["tenants"])
    fig, axes = plt.subplots(1, len(phases), figsize=(3.2 * len(phases), 3.0), sharey=True, squeeze=False)
    width = 0.8 / len(pols)
    for ax, ph in zip(axes[0], phases):
        for i, pol in enumerate(pols):
            row = next(p for p in results["policies"][pol]["phases"] if p["name"] == ph)["tenants"]
            vals = [(row.get(n) or {}).get("p99_ttft_s") or 0 for n in tenants]
            ax.bar([j + i * width for j in range(len(tenants))], vals, width, label=pol, color=COLORS[i % len(COLORS)])
        ax.set_xticks([j + width * (len(pols) - 1) / 2 for j in range(len(tenants))])
        ax.set_xticklabels([n.split("-")[-1] if "-" in n else n for n in tenants], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(ph, fontsize=9)
    axes[0, 0].set_ylabel("p99 TTFT (s)")
    axes[0, -1].legend(fontsize=7)
    return _save(fig, out)


def engine_state(results: dict[str, Any], out: Path) -> Path | None:
    """Debt, weight and burst per tenant over time under tokenpools."""
    pol = results["policies"].get("tokenpools")
    if pol is None:
        return None
    s = pol["series"]
    keys = [k for k in ("debt", "weight", "burst") if any(k in d for d in s["tenants"].values())]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 1.8 * len(keys) + 0.3), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        for i, (name, d) in enumerate(s["tenants"].items()):
            if k in d:
                ax.plot(s["t"], [v if v is not None else float("nan") for v in d[k]], label=name, color=COLORS[i], lw=1.2)
        if k == "debt":
            ax.axhspan(-0.05, 0.05, color="#dddddd", zorder=0)
        if k == "weight":
            ax.set_yscale("log")
        _phase_lines(ax, pol)
        ax.set_ylabel(k)
    axes[0, 0].legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("time (s)")
    return _save(fig, out)


def fairness(results: dict[str, Any], out: Path) -> Path:
    """Jain's index per phase, one bar per policy."""
    pols = list(results["policies"])
    phases = [p["name"] for p in results["policies"][pols[0]]["phases"]]
    fig, ax = plt.subplots(figsize=(7, 2.8))
    width = 0.8 / len(pols)
    for i, pol in enumerate(pols):
        vals = [results["policies"][pol]["jain"].get(ph) or 0 for ph in phases]
        ax.bar([j + i * width for j in range(len(phases))], vals, width, label=pol, color=COLORS[i % len(COLORS)])
    ax.set_xticks([j + width * (len(pols) - 1) / 2 for j in range(len(phases))])
    ax.set_xticklabels(phases, fontsize=8)
    ax.set_ylim(0.5, 1.02)
    ax.set_ylabel("Jain's index (service / baseline)")
    ax.legend(fontsize=7, ncol=len(pols))
    return _save(fig, out)


def ttft_scatter(results: dict[str, Any], requests: dict[str, list[tuple[str, float, float]]], out: Path) -> Path:
    """Every served request: arrival time vs TTFT, per policy (log scale)."""
    pols = list(requests)
    tenants = list(results["tenants"])
    fig, axes = plt.subplots(1, len(pols), figsize=(3.0 * len(pols), 2.8), sharey=True, squeeze=False)
    for ax, pol in zip(axes[0], pols):
        for i, name in enumerate(tenants):
            pts = [(a, t) for n, a, t in requests[pol] if n == name]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, color=COLORS[i], label=name, alpha=0.7, lw=0)
        ax.set_yscale("log")
        ax.set_title(pol, fontsize=9)
        ax.set_xlabel("arrival (s)")
        _phase_lines(ax, results["policies"][pol])
    axes[0, 0].set_ylabel("TTFT (s)")
    axes[0, -1].legend(fontsize=6, markerscale=3)
    return _save(fig, out)


def all_plots(results: dict[str, Any], requests: dict[str, list], outdir: Path) -> list[Path]:
    name = results["experiment"]
    made = [
        timeline(results, outdir / f"{name}-timeline.png"),
        ttft_bars(results, outdir / f"{name}-ttft-p99.png"),
        ttft_scatter(results, requests, outdir / f"{name}-ttft-scatter.png"),
    ]
    st = engine_state(results, outdir / f"{name}-engine-state.png")
    if st is not None:
        made.append(st)
    if any(v is not None for pol in results["policies"].values() for v in pol["jain"].values()):
        made.append(fairness(results, outdir / f"{name}-fairness.png"))
    return made
