"""Several tokenpools replicas sharing pools through Redis: short leases of capacity per replica.

Per request nothing touches Redis: each replica's engine admits locally from its *share* of every pool (and of
every entitlement's baseline and ceilings). Once per sync interval (default: the pools' control period) each
replica, in one Lua script call (atomic):
  - renews its lease (its record expires `lease` seconds after its last sync; expired records are removed, so
    a crashed replica's share returns to the others within one lease),
  - asks for its target share of every key (pool "" and constrained entitlements; see shares.targets) and is
    granted min(target, 1 − Σ other replicas' claims),
  - records its claim = max(share applied now, share granted, share in use), which bounds what its engine can
    hold until its next sync. So Σ claims ≤ 1 at every instant, even mid-rebalance: a replica only raises its
    share once the others' recorded claims leave room, and a replica that lowered its share keeps claiming what
    its in-flight requests still hold until they drain.
  - (re)joining replicas do not raise their share during their first lease ("probation"): by then every peer
    that can reach Redis has re-recorded its claim (this matters after a Redis restart, which loses records),
  - the holder of the leader lock (a key with the lease as TTL) also stores the pool-wide debt and burst it
    merged from every replica's values; every replica applies them, so priorities agree.

Redis unreachable (error or timeout): fail static. Shares drop at once to min(current, fail share) and rise to
the fail share (default 1 / the last known number of live replicas) one lease later, when every replica has
noticed; a log line and the `fail_static_total` counter mark it. When Redis answers again the replica re-joins
through probation and converges back to the shared split.

URL: redis://[:password@]HOST:PORT/DB[?interval=S&lease=S&fail_share=F&replicas=N&replica=ID&prefix=P&prior=B]
  interval    seconds between syncs (default: the smallest control.periodSeconds of the pools)
  lease       seconds a replica's claim lives without a sync (default 3 × interval)
  fail_share  share to hold while Redis is unreachable (default 1 / last known live replicas)
  replicas    live replicas to assume before Redis was ever reached (default 1)
  replica     this replica's id (default HOSTNAME-PID-random)
  prefix      key prefix (default "tokenpools"); replicas sharing pools must use the same one
  prior       weight of the equal split in the targets (default 0.1; the rest follows demand)
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import structlog
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..engine.decisions import Events
from .shares import MIN_SHARE, POOL, PRIOR, SLICE, Observer, PoolObs, expect_equal, merge_priorities_steps, targets_steps

log = structlog.get_logger("tokenpools.state")

# Shares that move by less than this are not re-applied (set_shares rebuilds the entitlements it changes, and
# every unnamed one when the pool share moves). Skipping is always safe: the claim is max(applied, granted, used).
TOLERANCE = 0.01
# A share move at least this large is not held back by the spacing of small ones (see _apply).
BIG_MOVE = 0.05
# Merged debt or burst is adopted only where it differs from the engine's own by more than this.
PRIO_APPLY_EPS = 0.01
# A replica out of probation counts as at least an equal part of the demand for this many leases (shares.expect_equal).
WARM_LEASES = 5
# Debt and burst smaller than this are not published (absent = 0 in the merge): keeps idle entitlements out.
PRIO_EPS = 1e-4

# KEYS: 1 claims hash, 2 info hash, 3 leader key, 4 priorities key
# ARGV: 1 replica id, 2 lease ms, 3 {"t": {pool: {key: [target, applied, used]}}}, 4 info JSON (stored verbatim),
#       5 merged priorities JSON to store if this replica is the leader ('' = nothing)
LEASE_LUA = """
local me, ttl = ARGV[1], tonumber(ARGV[2])
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local req = cjson.decode(ARGV[3])
local raw = redis.call('HGETALL', KEYS[1])
local others, mine = {}, nil
for i = 1, #raw, 2 do
  local id = raw[i]
  local rec = cjson.decode(raw[i + 1])
  if id == me then
    mine = rec
  elseif rec.exp <= now then
    redis.call('HDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    others[#others + 1] = rec
  end
end
local since = now
if mine and mine.exp > now then since = mine.since end
local probation = (now - since) < ttl
local grants, claims = {}, {}
for pool, keys in pairs(req.t) do
  local g, c = {}, {}
  for key, v in pairs(keys) do
    local taken = 0
    for _, o in ipairs(others) do
      local oc = o.c[pool]
      if oc then taken = taken + (oc[key] or oc[''] or 0) end
    end
    local room = 1 - taken
    if room < 0 then room = 0 end
    local grant = math.min(v[1], room)
    if probation and grant > v[2] then grant = v[2] end
    g[key] = grant
    c[key] = math.max(v[2], grant, v[3])
  end
  grants[pool] = g
  claims[pool] = c
end
redis.call('HSET', KEYS[1], me, cjson.encode({exp = now + ttl, since = since, c = claims, g = grants}))
redis.call('HSET', KEYS[2], me, ARGV[4])
local lead = 0
local holder = redis.call('GET', KEYS[3])
if (not holder) or holder == me then
  redis.call('SET', KEYS[3], me, 'PX', ttl)
  lead = 1
  if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5]) end
end
return cjson.encode({g = grants, n = #others + 1, lead = lead, now = now, probation = probation, since = since})
"""

_OPTIONS = {"interval", "lease", "fail_share", "replicas", "replica", "prefix", "prior"}


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """Split our options off a redis:// URL; return (the URL for redis-py, our options)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"state URL must be memory or redis://HOST:PORT/DB, got {url!r}")
    ours, theirs = {}, []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        (ours.__setitem__(k, v) if k in _OPTIONS else theirs.append((k, v)))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


class RedisStore:
    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        replica_id: str | None = None,
        interval: float | None = None,
        lease: float | None = None,
        fail_share: float | None = None,
        replicas_hint: int | None = None,
        prefix: str | None = None,
        prior: float | None = None,
        socket_timeout: float | None = None,
    ) -> None:
        clean, opts = parse_url(url)

        def opt(value, key, conv):
            return value if value is not None else (conv(opts[key]) if key in opts else None)

        self.url = clean
        self.replica_id = opt(replica_id, "replica", str) or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._interval = opt(interval, "interval", float)
        self._lease = opt(lease, "lease", float)
        self.fail_share = opt(fail_share, "fail_share", float)
        self.replicas_hint = opt(replicas_hint, "replicas", int) or 1
        self.prior = opt(prior, "prior", float)
        self.prior = PRIOR if self.prior is None else self.prior
        prefix = opt(prefix, "prefix", str) or "tokenpools"
        tag = "{" + prefix + "}"  # one hash slot for all keys (Redis Cluster)
        self.keys = [f"{tag}:claims", f"{tag}:info", f"{tag}:leader", f"{tag}:prio"]
        self._socket_timeout = socket_timeout
        self.engine: Any = None
        self.redis: aioredis.Redis | None = None
        self._script = None
        self.observer = Observer(prio_eps=PRIO_EPS)
        # What the last successful sync said.
        self.mode = "starting"  # redis | fail_static
        self.live = self.replicas_hint
        self.leader = False
        self.probation = True
        self.grants: dict[str, dict[str, float]] = {}
        self.targets: dict[str, dict[str, float]] = {}
        self._offset_ms: float | None = None  # Redis TIME − local monotonic, ms
        self._failed_at: float | None = None
        self._prio_key: str | None = None
        self._applied_at: dict[str, float] = {}
        self._replicas_changed_at = -1e9  # monotonic time the number of live replicas last changed
        self._since: float | None = None  # Redis ms when this replica (re)joined (its probation started)
        self._was_ready = False
        self._prio_seq = 0
        # Counters (exposed in status()).
        self.syncs = 0
        self.sync_errors = 0
        self.fail_static_total = 0
        self.recoveries = 0
        self.priorities_applied = 0
        self.last_error: str | None = None
        self.last_sync_ms = 0.0

    @property
    def interval(self) -> float:
        return self._interval if self._interval is not None else 1.0

    @property
    def lease(self) -> float:
        return self._lease if self._lease is not None else 3 * self.interval

    # ---- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, engine: Any, now: float) -> Events:
        self.engine = engine
        if self._interval is None:
            periods = [p.spec.control.period_seconds for p in engine.pools.values()]
            self._interval = min(periods) if periods else 1.0
        if self.lease <= self.interval:
            raise ValueError(f"lease ({self.lease}s) must be longer than the sync interval ({self.interval}s)")
        timeout = self._socket_timeout if self._socket_timeout is not None else min(0.5, self.interval)
        self.redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._script = self.redis.register_script(LEASE_LUA)
        # Hold nothing until Redis says what is ours: a new replica joins at a tiny share.
        events = Events()
        for pool in engine.pools:
            events.extend(engine.set_shares(pool, MIN_SHARE, {}, now))
        events.extend(await self.sync(now))
        return events

    async def close(self) -> None:
        """Leave cleanly: drop this replica's records so the others get its share now, not after a lease.
        Call it after in-flight requests have drained."""
        if self.redis is None:
            return
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hdel(self.keys[0], self.replica_id)
            pipe.hdel(self.keys[1], self.replica_id)
            await pipe.execute()
        except (RedisError, OSError):
            pass
        try:
            await self.redis.aclose()
        except (RedisError, OSError):
            pass
        self.redis = None

    # ---- one sync -------------------------------------------------------------------------------------------

    async def sync(self, now: float) -> Events:
        t0 = time.perf_counter()
        obs = await _sliced(self.observer.observe_steps(self.engine))  # requests go first between slices
        demand = self.observer.demand
        try:
            events = await self._sync(obs, demand, now)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            events = self._fail_static(obs, now, exc)
        self.last_sync_ms = (time.perf_counter() - t0) * 1000
        return events

    async def _sync(self, obs: dict[str, PoolObs], demand: dict, now: float) -> Events:
        me = self.replica_id
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys[0])
        pipe.hgetall(self.keys[1])
        pipe.get(self.keys[3])
        claims_raw, info_raw, prio_raw = await pipe.execute()

        horizon = self._redis_now()
        others: dict[str, dict] = {}
        for rid, raw in claims_raw.items():
            if rid == me:
                continue
            rec = orjson.loads(raw)
            if horizon is None or rec["exp"] > horizon:
                others[rid] = rec
            await asyncio.sleep(0)  # the sync's CPU in slices: requests go in between
        infos = {}
        for rid in others:
            if rid in info_raw:
                infos[rid] = orjson.loads(info_raw[rid])
                await asyncio.sleep(0)

        theirs = [infos[rid].get("d", {}) if rid in infos else {} for rid in others]
        asked: dict[str, set[str]] = {}
        for d in theirs:
            for pool, ents in d.items():
                asked.setdefault(pool, set()).update(ents)
        self.observer.include(self.engine, obs, asked)
        # My demand as the others see it (published last sync), not the fresh one: all replicas then split from
        # the same snapshot and their targets sum to 1 (fresh against stale would bias every replica downwards
        # while demand decays, upwards while it grows). The fresh one is published below.
        mine = demand
        if me in info_raw:
            mine = orjson.loads(info_raw[me]).get("d", demand)
        warming = False
        if horizon is not None:  # replicas just out of probation count as at least an equal part of the demand
            warming = self._warming(self._since, horizon)
            warm = [warming] + [self._warming(rec.get("since"), horizon) for rec in others.values()]
            mine, *theirs = expect_equal([mine, *theirs], warm)
        self.targets, follow = await _sliced(targets_steps(mine, theirs, obs, self.prior))
        request = {}
        for pool, po in obs.items():
            t = self.targets[pool]
            keys = {POOL: [t[POOL], _applied(po.applied), po.used]}
            for name, target in t.items():
                if name != POOL:
                    eo = po.ents[name]
                    keys[name] = [target, _applied(eo.applied), eo.used]
            request[pool] = keys
        mine_q = {
            pool: {n: [eo.debt, eo.burst] for n, eo in po.ents.items() if abs(eo.debt) > PRIO_EPS or eo.burst > PRIO_EPS}
            for pool, po in obs.items()
        }
        await asyncio.sleep(0)
        merged = ""
        if self.leader:
            recs = [(rec.get("g", {}), infos.get(rid, {}).get("q", {})) for rid, rec in others.items()]
            recs.append((self.grants, mine_q))
            self._prio_seq += 1
            merged = orjson.dumps({"k": f"{me}:{self._prio_seq}", "v": await _sliced(merge_priorities_steps(recs))}).decode()
            await asyncio.sleep(0)
        info = orjson.dumps({"d": demand, "q": mine_q}).decode()
        raw = await self._script(
            keys=self.keys, args=[me, int(self.lease * 1000), orjson.dumps({"t": request}).decode(), info, merged]
        )
        res = orjson.loads(raw)
        self._offset_ms = res["now"] - time.monotonic() * 1000
        if self.mode != "redis":
            if self.mode == "fail_static":
                self.recoveries += 1
                log.info("state: redis reachable again, re-joining", replica=me, down_s=round(time.monotonic() - self._failed_at, 2))
            self.mode = "redis"
            self._failed_at = None
        self.syncs += 1
        mono = time.monotonic()
        if self.syncs > 1 and int(res["n"]) != self.live:
            self._replicas_changed_at = mono
        self.live = int(res["n"])
        # A replica came or went: its share changes hands now. Moves apply at once, not at the next control period
        # or after the spacing of small moves, for two leases after the change (a joiner's probation and the start
        # of its warm-up), and for a joiner from the end of its probation until it is ready. That costs a control
        # step per sync on the admission loop, but only around a membership change.
        joined = self.probation and not res["probation"]  # out of probation: its first share may come now
        settling = mono - self._replicas_changed_at < 2 * self.lease or joined or (warming and not self._was_ready)
        self.leader = bool(res["lead"])
        self.probation = bool(res["probation"])
        self._since = res.get("since")
        self.grants = {pool: g for pool, g in res["g"].items() if isinstance(g, dict)}

        events = Events()
        for pool, g in self.grants.items():
            po = obs[pool]
            share = _pick(g.get(POOL, 0.0), po.applied)
            named = {}
            for name, grant in g.items():
                if name == POOL or name not in po.ents:
                    continue
                if name in follow[pool] and grant >= share - 1e-12:
                    named[name] = share  # back at the pool share: not named from the next sync on
                else:
                    named[name] = _pick(grant, po.ents[name].applied)
            events.extend(self._apply(pool, po, share, named, now, urgent=settling))
        if prio_raw:
            events.extend(await self._apply_priorities(orjson.loads(prio_raw), now))
        return events

    def _apply(
        self, pool: str, po: PoolObs, share: float, named: dict[str, float], now: float, urgent: bool = False
    ) -> Events:
        """Give the engine its shares (entitlements not named follow the pool share); skip when nothing moved.

        Small moves (< BIG_MOVE on every key) are applied at most once every two control periods of the pool.
        Every move but an urgent one (fail static; around a change of the live replicas, see _sync) takes effect
        at the pool's next control period rather than now:
        a control step costs O(entitlements) on the admission loop, and the period's own step runs anyway.
        Deferring and skipping are always safe: the claim covers both the applied and the pending share."""
        moves = [abs(share - po.applied)] + [abs(v - po.ents[n].applied) for n, v in named.items()]
        if max(moves) == 0.0:
            return Events()
        mono = time.monotonic()
        spacing = 2 * self.engine.pools[pool].spec.control.period_seconds
        if not urgent and max(moves) < BIG_MOVE and mono - self._applied_at.get(pool, -1e9) < spacing:
            return Events()
        self._applied_at[pool] = mono
        return self.engine.set_shares(pool, share, named, now, defer=not urgent)

    async def _apply_priorities(self, doc: dict, now: float) -> Events:
        if doc.get("k") == self._prio_key:
            return Events()
        self._prio_key = doc.get("k")
        events = Events()
        ents = self.engine.ents
        for pool, vals in doc.get("v", {}).items():
            if pool not in self.engine.pools:
                continue
            # Only what moved; weights follow at once, allocations at the pool's next control period. In slices
            # of SLICE entitlements (a weight each), so requests go in between.
            moved, any_moved = {}, False
            for i, (n, (debt, burst)) in enumerate(vals.items(), 1):
                e = ents.get(n)
                if e is not None and (abs(e.debt - debt) > PRIO_APPLY_EPS or abs(e.burst - burst) > PRIO_APPLY_EPS):
                    moved[n] = (debt, burst)
                    any_moved = True
                if i % SLICE == 0:
                    if moved:
                        events.extend(self.engine.set_priorities(pool, moved, now, defer=True))
                        moved = {}
                    await asyncio.sleep(0)
            if moved:
                events.extend(self.engine.set_priorities(pool, moved, now, defer=True))
            self.priorities_applied += any_moved
        return events

    def _fail_static(self, obs: dict[str, PoolObs], now: float, exc: BaseException) -> Events:
        self.sync_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        mono = time.monotonic()
        if self.mode != "fail_static":
            self.mode = "fail_static"
            self._failed_at = mono
            self.fail_static_total += 1
            self.leader = False
            log.warning(
                "state: redis unreachable, failing static", replica=self.replica_id, share=round(self.static_share(), 4),
                error=self.last_error,
            )  # fmt: skip
        fs = self.static_share()
        settled = mono - self._failed_at >= self.lease  # every replica has noticed by now: raise to the share
        events = Events()
        for pool, po in obs.items():
            if settled:  # everybody at the fail share, exactly (nobody coordinates now)
                share, named = fs, {}
            else:  # only ever lower, at once
                share = max(MIN_SHARE, min(po.applied, fs))
                named = {n: max(MIN_SHARE, min(eo.applied, fs)) for n, eo in po.ents.items() if eo.applied != po.applied}
            events.extend(self._apply(pool, po, share, named, now, urgent=True))
        return events

    def _redis_now(self) -> float | None:
        """Redis TIME in ms, from the local monotonic clock and the offset measured at the last sync."""
        return None if self._offset_ms is None else time.monotonic() * 1000 + self._offset_ms

    def _warming(self, since: float | None, now_ms: float) -> bool:
        """Out of probation less than WARM_LEASES leases ago: ready, and its demand still building up."""
        ttl = self.lease * 1000
        return since is not None and ttl <= now_ms - since < (1 + WARM_LEASES) * ttl

    def ready(self) -> bool:
        """False until this replica holds a share of some pool: a new replica during its probation (one lease,
        when it admits next to nothing). Readiness probes and Envoy's health check then keep traffic on the
        replicas that can admit it, so a rolling update does not send clients to an empty replica. A replica
        re-joining after a Redis outage keeps the share it holds, so it stays ready; failing static it admits
        from its fail share."""
        if self.engine is None or self.mode == "starting":
            return False
        pools = self.engine.pools
        if not pools:
            return True
        holds = any(p.share > MIN_SHARE for p in pools.values())
        now_ms = self._redis_now()
        if not self._was_ready and self.mode == "redis" and now_ms is not None and self._warming(self._since, now_ms):
            # The first time: once the share meant for an equal part of the traffic is (half) there. Then it stays
            # ready while it holds any share: a replica flapping between ready and not would make the load
            # balancer's view of the healthy replicas flap too (Envoy's panic routing, a Service's endpoints).
            holds = any(p.share >= 0.5 * self.targets.get(name, {}).get(POOL, 0.0) > 0 for name, p in pools.items())
        self._was_ready = self._was_ready or holds
        return holds

    def static_share(self) -> float:
        return self.fail_share if self.fail_share is not None else 1.0 / max(1, self.live)

    def status(self) -> dict:
        shares = {}
        if self.engine is not None:
            for name, p in self.engine.pools.items():
                shares[name] = round(p.share, 6)
        return {
            "kind": self.kind,
            "mode": self.mode,
            "replica": self.replica_id,
            "live_replicas": self.live,
            "leader": self.leader,
            "probation": self.probation,
            "interval_s": self.interval,
            "lease_s": self.lease,
            "fail_share": round(self.static_share(), 6),
            "share": shares,
            "grants": self.grants,
            "targets": {p: {k: round(v, 6) for k, v in t.items()} for p, t in self.targets.items()},
            "syncs": self.syncs,
            "sync_errors": self.sync_errors,
            "fail_static_total": self.fail_static_total,
            "recoveries": self.recoveries,
            "priorities_applied": self.priorities_applied,
            "last_error": self.last_error,
            "last_sync_ms": round(self.last_sync_ms, 3),
        }


async def _sliced(steps):
    """Run a *_steps generator, letting the event loop run between its slices; return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await asyncio.sleep(0)


def _pick(grant: float, applied: float) -> float:
    """The share to apply for a grant: moves smaller than TOLERANCE are skipped (always safe: the claim
    recorded is max(applied, granted, used)), except that a grant of nothing is applied as such."""
    want = max(MIN_SHARE, min(1.0, grant))
    if abs(want - applied) > TOLERANCE or (want == MIN_SHARE and applied != MIN_SHARE):
        return want
    return applied


def _applied(share: float) -> float:
    """The share an engine applies, as claimed in Redis (MIN_SHARE counts as nothing)."""
    return 0.0 if share <= MIN_SHARE else share
