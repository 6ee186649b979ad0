"""The experiments: the paper's two (§5.2, §5.3), the 3× overload variant, and the service-class one.

Numbers the paper gives are used as given; what it leaves open is chosen here and stated in
docs/experiments.md (closed-loop users with no think time, users starting within the first second of their
load, fixed 64/64 lengths in Exp 1, U[32, 176] prompt and output lengths in Exp 2, capacity loss as a drained
replica).
"""

from __future__ import annotations

from extproc.sim.profiles import get_profile

from .workload import Experiment, Phase, Tenant, closed, fixed, uniform

SPARK = get_profile("paper-spark")  # 16 slots, ~240 output tok/s at 16 × (64 in, 64 out)
# One paper-spark replica: 16 sequences. The paper's nominal ~480 input + output tokens/s is the simulator's
# rate when 16 requests start together (a 276 ms prefill step each wave); with arrivals spread out a 64/64
# request takes 4.0 s (32 tok/s per sequence, 512 per replica, measured). The pool is configured 3 % above
# that, so the token-rate ceiling the engine derives for a concurrency-only entitlement (6/16 of the pool's
# rate for guaranteed-a) never binds before its concurrency does. With 480 it does: see docs/experiments.md.
SPARK_TPS = 528
SPARK_POOL = {"tokensPerSecond": SPARK_TPS, "concurrency": 16, "kvCacheTokens": SPARK.kv_cache_tokens}


def exp1(spot_overload_users: int = 0, name: str = "exp1") -> Experiment:
    b_loads = [closed(0, 90, 10)]
    if spot_overload_users:
        b_loads.append(closed(30, 60, spot_overload_users))
    demand = 6 + 6 + 10 + spot_overload_users
    return Experiment(
        name=name,
        title=f"Exp 1{' (3× overload)' if spot_overload_users else ''}: guaranteed latency under overload (paper §5.2)",
        description=(
            "One paper-spark replica (16 slots, ~240 output tok/s). guaranteed-a (6 slots, SLO 500 ms) and spot-b "
            "(burst ceiling 10 slots) run 0-90 s; guaranteed-c (6 slots) exists and sends only during 30-60 s. "
            "Closed-loop users, 64 prompt + 64 output tokens, no think time: a 6 users, b "
            f"{10}{f' (+{spot_overload_users} during 30-60 s)' if spot_overload_users else ''}, c 6. "
            f"Demand in the overload phase: {demand} sequences for 16 slots ({demand / 16:.2f}×)."
        ),
        horizon=90.0,
        phases=[Phase("steady", 0, 30), Phase("overload", 30, 60), Phase("recovery", 60, 90)],
        tenants=[
            Tenant("guaranteed-a", "guaranteed", 500, (closed(0, 90, 6),), resources={"concurrency": 6}),
            Tenant("spot-b", "spot", 5000, tuple(b_loads), burst={"concurrency": 10}),
            Tenant(
                "guaranteed-c", "guaranteed", 500, (closed(30, 60, 6),), resources={"concurrency": 6},
                present=((30.0, 60.0),),
            ),  # fmt: skip
        ],
        profile=SPARK,
        per_replica=SPARK_POOL,
        queue={"maxQueued": 512, "maxQueuedPerEntitlement": 128, "timeoutSeconds": 10},
        paper={
            "claim": "guaranteed P99 latency stays bounded during overload while spot is throttled; without "
            "admission control latency degrades without bound for every workload",
        },
        checks=["guaranteed_p99_bound", "no_guaranteed_rejects", "none_p99_growth", "utilization"],
        notes=[
            "guaranteed-c's entitlement is created at 30 s (Engine.apply) while spot-b holds the 10 slots that were "
            "unallocated until then; spot never borrows an existing entitlement's reserved capacity, but c's capacity "
            "is occupied when c appears, so c's first requests wait for spot requests to drain (about one request "
            "time, ~4 s). The 1.25× bound is checked for guaranteed tenants present in both phases (guaranteed-a); "
            "c's numbers are reported beside it.",
            "While spot drains, the engine also holds guaranteed-a's freed slots for c's unbacked headroom, so a few "
            "of a's requests right after 30 s wait too (docs/experiments.md, engine findings).",
        ],
    )


def exp1_3x() -> Experiment:
    # 3 × 16 = 48 sequences wanted during 30-60 s: a 6 + c 6 + spot-b 36.
    return exp1(spot_overload_users=26, name="exp1-3x")


EXP2_SPARK = SPARK.replace(name="paper-spark-8", max_num_seqs=8, kv_cache_tokens=SPARK.kv_cache_tokens // 2)


def exp2() -> Experiment:
    lengths = uniform(32, 176)
    return Experiment(
        name="exp2",
        title="Exp 2: debt-based fair share among elastic tenants under capacity loss (paper §5.3)",
        description=(
            "Two 8-slot replicas (16 slots); one is lost during 30-120 s (8 slots; it drains what it holds). Elastic "
            "entitlements of 5 slots each: copilot (SLO 500 ms), synth (SLO 30 s), reports (SLO 5 s, sends from "
            "210 s). Closed-loop users, 5 per tenant, prompt and output lengths U[32, 176], no think time."
        ),
        horizon=300.0,
        phases=[Phase("normal", 0, 30), Phase("outage", 30, 120), Phase("recovery", 120, 210), Phase("join", 210, 300)],
        tenants=[
            Tenant("copilot", "elastic", 500, (closed(0, 300, 5),), lengths, lengths, resources={"concurrency": 5}),
            Tenant("synth", "elastic", 30000, (closed(0, 300, 5),), lengths, lengths, resources={"concurrency": 5}),
            Tenant("reports", "elastic", 5000, (closed(210, 300, 5),), lengths, lengths, resources={"concurrency": 5}),
        ],
        profile=EXP2_SPARK,
        # Measured: ~31 tok/s per sequence for U[32, 176] requests (249 per 8-slot replica); 3 % margin as above.
        per_replica={"tokensPerSecond": 256, "concurrency": 8, "kvCacheTokens": EXP2_SPARK.kv_cache_tokens},
        replicas=[(0.0, 2), (30.0, 1), (120.0, 2)],
        paper={"debt_recovery_s": 50},
        checks=["debt_rises_and_recovers"],
        live_ok=False,
    )


def classes() -> Experiment:
    return Experiment(
        name="classes",
        title="Service classes: dedicated bursts into idle capacity, preemptible evicted when guaranteed returns",
        description=(
            "One paper-spark replica (16 slots). dedicated-d: 4 slots, may burst to 12; 4 users, 10 during 30-60 s. "
            "guaranteed-g: 6 slots, 6 users during 0-30 s and 60-90 s (idle in between). preemptible-p: no "
            "baseline, 12 users all along. 64 + 64 tokens, no think time. 6 slots are allocated to nobody."
        ),
        horizon=90.0,
        phases=[Phase("all", 0, 30), Phase("g-idle-d-bursts", 30, 60), Phase("g-returns", 60, 90)],
        tenants=[
            Tenant(
                "dedicated-d", "dedicated", 1000, (closed(0, 90, 4), closed(30, 60, 6)),
                resources={"concurrency": 4}, burst={"concurrency": 12},
            ),  # fmt: skip
            Tenant("guaranteed-g", "guaranteed", 500, (closed(0, 30, 6), closed(60, 90, 6)), resources={"concurrency": 6}),
            Tenant("preemptible-p", "preemptible", 30000, (closed(0, 90, 12),)),
        ],
        profile=SPARK,
        per_replica=SPARK_POOL,
        queue={"maxQueued": 512, "maxQueuedPerEntitlement": 128, "timeoutSeconds": 10},
        checks=["returning_guaranteed_bound", "preemptible_evicted", "dedicated_bursts"],
        notes=[
            "While guaranteed-g is idle its 6 slots stay reserved (lendReserved: preemptible): only preemptible work "
            "may borrow them, and it is evicted when g comes back.",
            "The engine counts preemptible work that borrows g's idle headroom against dedicated-d's burst as well, "
            "so slots can sit idle while d's burst waits (docs/experiments.md, engine findings).",
        ],
    )


EXPERIMENTS = {"exp1": exp1, "exp1-3x": exp1_3x, "exp2": exp2, "classes": classes}
SKIPPED = {
    "autoscale": "needs the controller and KEDA scaler (extproc/scaler/), which another issue is still building",
}


def get(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]()
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}") from None
