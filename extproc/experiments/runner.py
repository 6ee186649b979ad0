"""Virtual-time runner: the real admission policy (the engine or a baseline) in front of the real simulator
scheduler (`extproc.sim.scheduler.Scheduler`, one per replica), clients per `client.py`, all in one
discrete-event loop. No sockets, no wall clock: 90 simulated seconds take about a second.

Event order at one instant: policy timers (tick) first, then everything queued for that time (step ends,
arrivals, retries, config and capacity changes, samples) in the order it was scheduled, and only then do idle
replicas start their next step, so requests that arrive together share a batch as in vLLM.

A step's work is computed when it starts (`Scheduler.step(now)`) and delivered at its end: first tokens,
streamed tokens (`policy.progress`), finished requests (`policy.finish`). A request evicted while its step runs
is aborted in the scheduler at once; what that step had produced for it is dropped.

Routing: an admitted request goes to the live replica with the fewest running + waiting sequences (Envoy's
least-request balancing). When the replica count drops, the removed replicas take no new requests and finish
what they hold (drain); when it rises they come back.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable

from extproc.config import from_objects
from extproc.engine import Engine
from extproc.engine.decisions import Decision, Events, Reason, Verdict
from extproc.sim.scheduler import Scheduler, StepResult

from .client import JITTER_S, retry_delay
from .policies import make_policy, static_limits, tenant_state
from .trace import Req, Trace
from .workload import Experiment, Load, Tenant, rng_for

SAMPLE_S = 0.5
# A closed-loop user's next request reaches the gateway this long after its previous answer ended (network and
# client turnaround). With 0 it would join the very engine step that starts at that instant, which no real
# client does: the simulator, like vLLM, starts its next step at once, so a new request waits for it.
TURNAROUND_S = 0.005
DRAIN_S = 120.0  # after the horizon: no new requests; what is outstanding may finish (for its TTFT)


class _Replica:
    __slots__ = ("idx", "sched", "busy", "alive")

    def __init__(self, idx: int, sched: Scheduler) -> None:
        self.idx = idx
        self.sched = sched
        self.busy = False
        self.alive = True


class _User:
    """A closed-loop user or an open-loop arrival stream of one tenant's load."""

    __slots__ = ("tenant", "load", "name", "rng", "retry_rng", "n", "closed")

    def __init__(self, tenant: Tenant, load: Load, name: str, seed: int) -> None:
        self.tenant = tenant
        self.load = load
        self.name = name
        self.rng = rng_for(seed, tenant.name, name)
        self.retry_rng = rng_for(seed, tenant.name, name, "retry")
        self.n = 0
        self.closed = load.kind == "closed"


class VirtualRunner:
    def __init__(
        self,
        exp: Experiment,
        policy: str,
        seed: int = 1,
        progress: Callable[[float], None] | None = None,
        check_invariants: bool = False,
    ) -> None:
        self.exp = exp
        self.policy_name = policy
        self.seed = seed
        self.progress = progress
        self.check = check_invariants
        # The static baseline is planned once for every tenant the experiment ever has.
        static = static_limits(from_objects(exp.all_docs())) if policy == "static" else None
        self.policy = make_policy(policy, from_objects(exp.docs_at(0.0)), 0.0, static)
        self.trace = Trace(exp, policy, "sim", seed)
        self.replicas = [_Replica(i, Scheduler(exp.profile)) for i in range(exp.max_replicas)]
        n0 = exp.replicas_at(0.0)
        for r in self.replicas:
            r.alive = r.idx < n0
        self.heap: list = []
        self._seq = itertools.count()
        self.now = 0.0
        self.by_attempt: dict[str, Req] = {}
        self.outstanding: dict[str, int] = {t.name: 0 for t in exp.tenants}  # admitted or queued, per tenant
        self.in_flight: dict[str, int] = {t.name: 0 for t in exp.tenants}
        self.pending: dict[str, int] = {t.name: 0 for t in exp.tenants}  # arrived, not yet done (incl. retry waits)
        self.pool = exp.pool_name
        self._users: dict[str, _User] = {}  # attempt id -> who sent it

    # ---- the event queue ----
    def _at(self, t: float, kind: str, data=None) -> None:
        heapq.heappush(self.heap, (t, next(self._seq), kind, data))

    def run(self) -> Trace:
        wall0 = time.perf_counter()
        exp = self.exp
        for tenant in exp.tenants:
            for li, load in enumerate(tenant.loads):
                if load.kind == "closed":
                    for u in range(load.users):
                        user = _User(tenant, load, f"L{li}u{u}", self.seed)
                        self._at(load.start + user.rng.uniform(0, load.stagger_s), "user", user)
                else:
                    stream = _User(tenant, load, f"L{li}", self.seed)
                    for t in load.arrivals(rng_for(self.seed, tenant.name, f"L{li}", "arrivals")):
                        self._at(t, "open", stream)
        for t in exp.config_changes():
            self._at(t, "config", None)
        for t, n in exp.replicas[1:]:
            self._at(t, "replicas", n)
        k = 0
        while k * SAMPLE_S <= exp.horizon + 1e-9:
            self._at(k * SAMPLE_S, "sample", None)
            k += 1

        end = exp.horizon + DRAIN_S
        last_tick = -1.0
        next_progress = 0.0
        while True:
            t_ev = self.heap[0][0] if self.heap else math.inf
            wake = self.policy.next_wakeup()
            if wake is not None and wake <= self.now and last_tick == self.now:
                wake = self.now + 1e-3  # ticked at this instant already
            t = min(t_ev, wake if wake is not None else math.inf)
            if t == math.inf or t > end:
                break
            if t > exp.horizon and not self._work_left():
                break
            self.now = max(self.now, t)
            if wake is not None and wake <= self.now:
                last_tick = self.now
                self._events(self.policy.tick(self.now))
            while self.heap and self.heap[0][0] <= self.now:
                _, _, kind, data = heapq.heappop(self.heap)
                getattr(self, "_on_" + kind)(data)
            self._kick()
            if self.check:
                self.policy.check_invariants()
            if self.progress is not None and self.now >= next_progress:
                self.progress(min(self.now, exp.horizon))
                next_progress = self.now + 1.0
        if self.progress is not None:
            self.progress(exp.horizon)
        tr = self.trace
        tr.info["wall_s"] = round(time.perf_counter() - wall0, 3)
        tr.info["end_s"] = round(self.now, 3)
        tr.info["preemptions"] = sum(r.sched.num_preemptions_total for r in self.replicas)
        if isinstance(self.policy, Engine):
            tr.info["duplicate_releases"] = self.policy.duplicate_releases
            tr.info["reserved_total"] = self.policy.reserved_total
            tr.info["released_total"] = self.policy.released_total
        return tr

    def _work_left(self) -> bool:
        return any(self.pending.values()) or any(r.sched.has_work for r in self.replicas)

    # ---- replicas ----
    def _kick(self) -> None:
        for rep in self.replicas:
            if rep.busy or not rep.sched.has_work:
                continue
            res = rep.sched.step(self.now)
            if res.num_tokens == 0:
                raise RuntimeError(f"replica {rep.idx} stalled at t={self.now}")
            rep.busy = True
            n_run = rep.sched.num_running + len(res.finished)
            self.trace.add_interval(self.trace.busy, res.start, res.end, n_run)
            self.trace.add_interval(self.trace.tokens, res.start, res.end, (res.prefill_tokens + len(res.emitted)) / res.duration)
            self._at(res.end, "step", (rep, res))

    def _route(self) -> _Replica:
        alive = [r for r in self.replicas if r.alive]
        return min(alive, key=lambda r: (r.sched.num_running + r.sched.num_waiting, r.idx))

    def _on_step(self, data: tuple[_Replica, StepResult]) -> None:
        rep, res = data
        rep.busy = False
        now = self.now
        tr = self.trace
        for sreq in res.emitted:
            req = self.by_attempt.get(sreq.request_id)
            if req is None or req.attempt_id != sreq.request_id:
                continue  # evicted while this step ran
            req.generated = sreq.generated
            if req.first_token is None:
                req.first_token = now
                tr.add_point(tr.tenant_tokens[req.tenant], now, req.input + 1)
                tr.add_point(tr.tenant_weighted[req.tenant], now, req.input + 2)
            else:
                req.itls.append(now - req.last_token)
                tr.add_point(tr.tenant_tokens[req.tenant], now, 1)
                tr.add_point(tr.tenant_weighted[req.tenant], now, 2)
            req.last_token = now
            if sreq.generated < sreq.max_tokens:
                self.policy.progress(sreq.request_id, sreq.generated, now)
        for sreq in res.finished:
            req = self.by_attempt.get(sreq.request_id)
            if req is None or req.attempt_id != sreq.request_id:
                continue
            req.finished = now
            del self.by_attempt[sreq.request_id]
            self.outstanding[req.tenant] -= 1
            self.in_flight[req.tenant] -= 1
            ev = self.policy.finish(sreq.request_id, req.input, sreq.generated, now)
            self._done(req)
            self._events(ev)

    # ---- clients ----
    def _on_user(self, user: _User) -> None:
        if self.now >= user.load.end or self.now >= self.exp.horizon:
            return
        self._new_request(user)

    def _on_open(self, user: _User) -> None:
        self._new_request(user)

    def _new_request(self, user: _User) -> None:
        tn = user.tenant
        inp, out = tn.input.sample(user.rng), tn.output.sample(user.rng)
        req = Req(f"{tn.name}/{user.name}/{user.n}", tn.name, user.name, self.now, inp, out)
        user.n += 1
        req.outstanding_at_arrival = self.outstanding[tn.name]
        self.trace.requests.append(req)
        self.pending[tn.name] += 1
        self._attempt(req, user)

    def _attempt(self, req: Req, user: _User) -> None:
        req.attempts += 1
        aid = f"{req.rid}#{req.attempts}"
        req.attempt_id = aid
        self.by_attempt[aid] = req
        self._users[aid] = user
        d: Decision = self.policy.admit(aid, req.tenant, req.input, req.output, self.now)
        for victim in d.evict:
            self._evict(victim)
        if d.verdict is Verdict.ADMIT:
            self.outstanding[req.tenant] += 1
            self._start(req)
        elif d.verdict is Verdict.QUEUE:
            self.outstanding[req.tenant] += 1
            req.queued += 1
        else:
            self._refused(req, d.reason, d.retry_after, counted=False)

    def _start(self, req: Req) -> None:
        rep = self._route()
        req.admitted = self.now
        req.replica = rep.idx
        req.first_token = None
        req.last_token = None
        req.itls = []
        self.in_flight[req.tenant] += 1
        rep.sched.add(req.attempt_id, req.input, req.output, self.now)

    def _refused(self, req: Req, reason: Reason | None, retry_after: float | None, counted: bool) -> None:
        """A 429/403 for the current attempt (counted: it was admitted or queued before)."""
        aid = req.attempt_id
        if counted:
            self.outstanding[req.tenant] -= 1
        user = self._users.pop(aid)
        self.by_attempt.pop(aid, None)
        req.reject(reason.value if reason is not None else "rejected")
        delay = retry_delay(reason, retry_after, user.retry_rng.uniform(0, JITTER_S))
        if delay is None or self.now + delay >= min(user.load.end, self.exp.horizon):
            req.gave_up = True
            self._done(req, user, leave=True)  # the user leaves: its load ends before it could retry
            return
        self._at(self.now + delay, "retry", (req, user))

    def _on_retry(self, data) -> None:
        req, user = data
        self._attempt(req, user)

    def _evict(self, aid: str) -> None:
        req = self.by_attempt.get(aid)
        if req is None:
            return
        rep = self.replicas[req.replica]
        rep.sched.abort(aid)
        req.evicted += 1
        self.in_flight[req.tenant] -= 1
        req.first_token = req.last_token = None
        req.itls = []
        self._refused(req, Reason.EVICTED, 1.0, counted=True)

    def _done(self, req: Req, user: _User | None = None, leave: bool = False) -> None:
        self.pending[req.tenant] -= 1
        if user is None:
            user = self._users.pop(req.attempt_id, None)
        if user is not None and user.closed and not leave:
            think = user.rng.expovariate(1.0 / user.load.think_s) if user.load.think_s > 0 else 0.0
            self._at(self.now + think + TURNAROUND_S, "user", user)

    def _events(self, ev: Events) -> None:
        if not ev:
            return
        for aid in ev.evicted:
            self._evict(aid)
        for aid in ev.admitted:
            req = self.by_attempt.get(aid)
            if req is None or req.attempt_id != aid:
                self._events(self.policy.release(aid, self.now))  # nobody waits for it any more
                continue
            self._start(req)
        for d in ev.rejected:
            req = self.by_attempt.get(d.request_id)
            if req is not None and req.attempt_id == d.request_id:
                self._refused(req, d.reason, d.retry_after, counted=True)

    # ---- scripted changes ----
    def _on_config(self, _data) -> None:
        docs = self.exp.docs_at(self.now)
        self.trace.events.append({"t": self.now, "kind": "config", "entitlements": [d["metadata"]["name"] for d in docs[1:]]})
        self._events(self.policy.apply(from_objects(docs), self.now))

    def _on_replicas(self, n: int) -> None:
        for r in self.replicas:
            r.alive = r.idx < n
        self.trace.events.append({"t": self.now, "kind": "replicas", "replicas": n})
        self._events(self.policy.set_replicas(self.pool, n, self.now))

    def _on_sample(self, _data) -> None:
        now = self.now
        alive = [r for r in self.replicas if r.alive]
        states = tenant_state(self.policy, now)
        tenants = {}
        for t in self.exp.tenants:
            s = dict(states.get(t.name, {}))
            s["in_flight"] = self.in_flight[t.name]
            s["outstanding"] = self.pending[t.name]
            tenants[t.name] = s
        self.trace.samples.append(
            {
                "t": round(now, 6),
                "running": sum(r.sched.num_running for r in self.replicas),
                "waiting": sum(r.sched.num_waiting for r in self.replicas),
                "kv": sum(r.sched.kv_usage for r in alive) / max(1, len(alive)),
                "replicas": len(alive),
                "tenants": tenants,
            }
        )


def run_virtual(exp: Experiment, policy: str, seed: int = 1, progress=None, check_invariants: bool = False) -> Trace:
    return VirtualRunner(exp, policy, seed, progress, check_invariants).run()
