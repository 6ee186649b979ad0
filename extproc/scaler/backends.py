"""Backends of a pool: who is up, and what vLLM says it is doing (`/metrics`, Prometheus text format).

A backend is one vLLM replica, named by URL. `dns+http://NAME:PORT` stands for every address NAME resolves to
(a Kubernetes headless Service publishes one A record per ready pod), so the replica count follows the
Deployment without watching the API server. A backend counts as up from its first answered scrape and as down
after `DOWN_AFTER` scrapes in a row fail (one lost scrape must not take capacity away from entitlements).

Gauges read (vLLM v1 names; summed over the `engine` label when a server runs several):
    vllm:num_requests_running   vllm:num_requests_waiting   vllm:kv_cache_usage_perc (0-1, averaged)
`vllm:gpu_cache_usage_perc` (vLLM v0) is read when the v1 name is absent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

DOWN_AFTER = 2  # consecutive failed scrapes before a backend stops counting as a live replica
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
DNS_PREFIX = "dns+"


@dataclass
class Sample:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1


def parse_metrics(text: str) -> Sample:
    """The three gauges from Prometheus text exposition (0.0.4). Missing gauges read as 0; a line that does
    not parse is skipped (a scraper must not fail on a metric it does not use)."""
    sums: dict[str, float] = {}
    kv: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = len(line)
        for i, ch in enumerate(line):
            if ch == "{" or ch == " ":
                name_end = i
                break
        name = line[:name_end]
        if name != RUNNING and name != WAITING and name not in KV_USAGE:
            continue
        rest = line[name_end:]
        if rest.startswith("{"):
            close = rest.rfind("}")
            if close < 0:
                continue
            rest = rest[close + 1 :]
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        if math.isnan(value):
            continue
        if name in KV_USAGE:
            kv.setdefault(name, []).append(value)
        else:
            sums[name] = sums.get(name, 0.0) + value
    usage = next((kv[n] for n in KV_USAGE if n in kv), [])
    return Sample(sums.get(RUNNING, 0.0), sums.get(WAITING, 0.0), sum(usage) / len(usage) if usage else 0.0)


@dataclass
class Backend:
    url: str  # base URL, e.g. http://10.0.0.7:8000
    up: bool = False
    failures: int = 0
    sample: Sample = field(default_factory=Sample)
    scrapes: int = 0
    error: str | None = None

    def record(self, sample: Sample | None, error: str | None = None) -> None:
        self.scrapes += 1
        if sample is not None:
            self.sample = sample
            self.failures = 0
            self.up = True
            self.error = None
        else:
            self.failures += 1
            self.error = error
            if self.failures >= DOWN_AFTER:
                self.up = False

    @property
    def known(self) -> bool:
        """Answered once, or failed for good: until then it neither adds nor removes a replica."""
        return self.up or self.failures >= DOWN_AFTER

    def as_dict(self) -> dict:
        return {
            "url": self.url,
            "up": self.up,
            "running": self.sample.running,
            "waiting": self.sample.waiting,
            "kvCacheUsage": round(self.sample.kv_usage, 4),
            "error": self.error,
        }


def parse_backend_option(value: str, pools: list[str]) -> tuple[str, str]:
    """`POOL=URL`, or a bare URL when there is only one pool. Raises ValueError with the reason."""
    pool, sep, url = value.partition("=")
    if not sep or "://" in pool:
        if len(pools) != 1:
            raise ValueError(f"{value!r}: name the pool (POOL=URL); pools: {', '.join(pools) or 'none'}")
        pool, url = pools[0], value
    if pool not in pools:
        raise ValueError(f"{value!r}: no TokenPool named {pool!r}; pools: {', '.join(pools)}")
    scheme = urlsplit(url.removeprefix(DNS_PREFIX)).scheme
    if scheme not in ("http", "https") or not urlsplit(url.removeprefix(DNS_PREFIX)).hostname:
        raise ValueError(f"{value!r}: expected http(s)://HOST:PORT or dns+http(s)://NAME:PORT")
    return pool, url.rstrip("/")


async def expand(url: str) -> list[str] | None:
    """`dns+http://NAME:PORT` → one http://ADDRESS:PORT per resolved address (sorted, deduplicated);
    any other URL is itself. A name that does not exist means no replicas (a headless Service with no ready
    pod); a resolver failure (timeout, SERVFAIL) returns None: keep what was known."""
    if not url.startswith(DNS_PREFIX):
        return [url]
    parts = urlsplit(url[len(DNS_PREFIX) :])
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host)
        return [urlunsplit(parts)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        return None
    out = set()
    for family, _, _, _, sockaddr in infos:
        addr = sockaddr[0]
        netloc = f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"
        out.add(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))
    return sorted(out)


async def scrape(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[Sample | None, str | None]:
    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None, f"HTTP {resp.status}"
            return parse_metrics(await resp.text()), None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:200]


class BackendSet:
    """The backends configured for one pool (URLs, some of them DNS names standing for several)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self.backends: dict[str, Backend] = {}
        self._resolved: dict[str, list[str]] = {}
        self.refreshes = 0

    async def refresh(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Resolve names, scrape every backend once (concurrently), update up/down."""
        resolved: list[str] = []
        for url in self.urls:
            found = await expand(url)
            if found is None:  # resolver trouble: keep the last answer
                found = self._resolved.get(url, [])
            self._resolved[url] = found
            resolved.extend(u for u in found if u not in resolved)
        for gone in [u for u in self.backends if u not in resolved]:
            del self.backends[gone]  # no longer published: not a replica any more
        for u in resolved:
            self.backends.setdefault(u, Backend(u))
        results = await asyncio.gather(*(scrape(session, u, timeout) for u in self.backends))
        for backend, (sample, error) in zip(list(self.backends.values()), results):
            backend.record(sample, error)
        self.refreshes += 1

    @property
    def settled(self) -> bool:
        """Scraped, and every backend known: the live count can be trusted (a fresh start does not read as 0)."""
        return self.refreshes > 0 and all(b.known for b in self.backends.values())

    @property
    def live(self) -> int:
        return sum(1 for b in self.backends.values() if b.up)

    def totals(self) -> Sample:
        up = [b.sample for b in self.backends.values() if b.up]
        return Sample(
            sum(s.running for s in up),
            sum(s.waiting for s in up),
            sum(s.kv_usage for s in up) / len(up) if up else 0.0,
        )
