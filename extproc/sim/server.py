"""OpenAI-compatible HTTP front of the simulator: the Scheduler driven in (scaled) real time.

One asyncio task steps the scheduler and sleeps until each step's end (duration / time_scale of wall
time), then delivers the step's tokens to the waiting HTTP handlers. Simulated time is
`(wall - start) * time_scale`. While busy, steps run back to back in simulated time and small delivery
jitter (timer overshoot) is absorbed; when the process falls more than LAG_TOLERANCE_S (wall) behind
its own clock, the next step starts at the current simulated time instead, so the simulated GPU loses
that time. The lag is measured for every step and reported (GET /sim/stats, tokenpools_sim_lag_* on
/metrics). New requests wait in a pending list stamped with their simulated arrival time and join the
scheduler at the first step that starts after it, so no request is scheduled before it arrived.
All times reported by the server (metrics, stats) are simulated seconds; the lag is given in both.

Start it from another asyncio program:

    server = SimServer(SimConfig(profile=get_profile("h100-llama3-8b"), model="m", time_scale=10))
    port = await server.start("127.0.0.1", 0)    # 0: pick a free port
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from extproc.sim.metrics import EngineMetrics
from extproc.sim.profiles import Profile
from extproc.sim.scheduler import Request, Scheduler, StepResult
from extproc.sim.sse import DONE, ChunkEncoder
from extproc.sim.tokens import PromptError, chat_prompt_tokens, completion_prompt_tokens, filler_text


# Lag (wall seconds) absorbed by running steps back to back; beyond it the simulated clock jumps ahead.
LAG_TOLERANCE_S = 0.02


@dataclass(frozen=True, slots=True)
class SimConfig:
    profile: Profile
    model: str = "sim-model"
    time_scale: float = 1.0  # K: run K times faster than real time
    stream_interval: int = 1  # tokens per SSE chunk after the first (vLLM --stream-interval)
    default_max_tokens: int = 256  # when the request gives neither max_tokens nor max_completion_tokens

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        if self.stream_interval < 1 or self.default_max_tokens < 1:
            raise ValueError("stream_interval and default_max_tokens must be >= 1")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return web.Response(body=_dumps(body), status=self.status, content_type="application/json")


class _Handle:
    """A request as its HTTP handler sees it: tokens delivered so far (not the scheduler's count,
    which runs one step ahead of delivery)."""

    __slots__ = ("rid", "prompt_tokens", "max_tokens", "arrival", "req", "delivered", "finished", "aborted", "event")

    def __init__(self, rid: str, prompt_tokens: int, max_tokens: int, arrival: float) -> None:
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.req: Request | None = None  # set when it joins the scheduler
        self.delivered = 0
        self.finished = False
        self.aborted = False
        self.event = asyncio.Event()


class LagStats:
    """How late step deliveries are relative to the server's own clock, in wall seconds."""

    def __init__(self) -> None:
        self.steps = 0
        self.total = 0.0
        self.max = 0.0
        self.recent: deque[float] = deque(maxlen=4096)

    def record(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.steps += 1
        self.total += lag
        self.max = max(self.max, lag)
        self.recent.append(lag)

    def summary(self, time_scale: float) -> dict[str, float]:
        recent = sorted(self.recent)
        p99 = recent[min(len(recent) - 1, int(0.99 * len(recent)))] if recent else 0.0
        mean = self.total / self.steps if self.steps else 0.0
        return {"lag_samples": self.steps, "lag_mean_wall_s": mean, "lag_p99_recent_wall_s": p99,
                "lag_max_wall_s": self.max, "lag_mean_sim_s": mean * time_scale, "lag_max_sim_s": self.max * time_scale}


class SimServer:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.scheduler = Scheduler(config.profile)
        self.metrics = EngineMetrics()
        self.lag = LagStats()
        self._handles: dict[str, _Handle] = {}
        self._pending: deque[_Handle] = deque()  # arrived, not yet handed to the scheduler
        self._wake = asyncio.Event()
        self._paused = False
        self._parked = asyncio.Event()  # set while the engine loop is held by pause()
        self._resume = asyncio.Event()
        self._wall0 = 0.0
        self._sim_end = 0.0  # end of the last step, simulated seconds
        self._engine: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = web.Application()
        self.app.add_routes([
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/completions", self._completions),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
            web.get("/metrics", self._metrics),
            web.get("/sim/stats", self._stats),
        ])

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen and start the engine loop; returns the bound port."""
        self._wall0 = asyncio.get_running_loop().time()
        self._engine = asyncio.create_task(self._engine_loop(), name="sim-engine")
        # handler_cancellation: a client that goes away cancels its handler, which aborts its request.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[-1][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._engine is not None:
            self._engine.cancel()
            try:
                await self._engine
            except asyncio.CancelledError:
                pass

    async def pause(self) -> None:
        """Hold the engine between steps (for tests and inspection): state stops changing once this
        returns. The held time counts as lag-free idle time after resume()."""
        self._paused = True
        self._resume.clear()
        self._wake.set()
        await self._parked.wait()

    def resume(self) -> None:
        self._paused = False
        self._resume.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sim_now(self) -> float:
        return (asyncio.get_running_loop().time() - self._wall0) * self.config.time_scale

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "model": self.config.model, "profile": self.config.profile.name, "time_scale": self.config.time_scale,
            "sim_now_s": self.sim_now(), "running": s.num_running, "waiting": s.num_waiting,
            "kv_usage": s.kv_usage, "steps": s.steps_total, "prompt_tokens_total": s.prompt_tokens_total,
            "generation_tokens_total": s.generation_tokens_total, "preemptions_total": s.num_preemptions_total,
            "request_success_total": s.request_success_total, "aborted_total": s.aborted_total,
            **self.lag.summary(self.config.time_scale),
        }

    # -- the engine loop -------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.config.time_scale
        sched = self.scheduler
        while True:
            if self._paused:
                self._parked.set()
                await self._resume.wait()
                self._parked.clear()
            if not sched.has_work and not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue  # re-check pause
            now = self.sim_now()
            # Busy and roughly on time: the next step follows the last one. Idle, or too far behind:
            # start now (the lost time is the lag).
            if sched.has_work and now - self._sim_end <= LAG_TOLERANCE_S * scale:
                start = self._sim_end
            else:
                start = now
            while self._pending and self._pending[0].arrival <= start:
                h = self._pending.popleft()
                if not h.aborted:
                    h.req = sched.add(h.rid, h.prompt_tokens, h.max_tokens, h.arrival)
            if not sched.has_work:
                continue
            result = sched.step(start)
            self._sim_end = result.end
            deadline = self._wall0 + result.end / scale
            delay = deadline - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)  # sleep(0) still lets handlers run
            self.lag.record(loop.time() - deadline)
            self._deliver(result)

    def _deliver(self, result: StepResult) -> None:
        metrics, handles = self.metrics, self._handles
        for req in result.emitted:
            h = handles.get(req.request_id)
            if h is None:
                continue  # aborted while the step ran
            metrics.on_token(req)
            h.delivered += 1
            h.event.set()
        for req in result.finished:
            h = handles.get(req.request_id)
            if h is not None:
                metrics.on_finish(req)
                h.finished = True

    # -- OpenAI endpoints ----------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await self._parse(request)
            prompt_tokens = chat_prompt_tokens(body.get("messages")) if chat else \
                completion_prompt_tokens(body.get("prompt"))
            max_tokens = self._max_tokens(body, prompt_tokens)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise HTTPError(400, "'stream' must be a boolean")
            options = body.get("stream_options")
            if options is not None and not stream:
                raise HTTPError(400, "Stream options can only be defined when `stream=True`.")
            include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        except PromptError as e:
            return HTTPError(400, str(e)).response()
        except HTTPError as e:
            return e.response()

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        handle = _Handle(rid, prompt_tokens, max_tokens, self.sim_now())
        self._handles[rid] = handle
        self._pending.append(handle)
        self._wake.set()
        try:
            if stream:
                return await self._stream(request, handle, chat, include_usage)
            while not handle.finished:
                await handle.event.wait()
                handle.event.clear()
            return web.Response(body=_dumps(self._full_response(handle, chat)), content_type="application/json")
        finally:
            # Disconnect (cancellation or a failed write) before the end: free the KV now.
            if not handle.finished:
                handle.aborted = True
                if handle.req is not None:
                    self.scheduler.abort(rid)
            del self._handles[rid]

    async def _parse(self, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            raise HTTPError(400, f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        model = body.get("model", self.config.model)
        if model != self.config.model:
            raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        n = body.get("n", 1)
        if n != 1:
            raise HTTPError(400, "only n=1 is supported by the simulator", param="n")
        return body

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int) -> int:
        limit = self.config.profile.max_model_len
        value = body.get("max_completion_tokens")
        if value is None:
            value = body.get("max_tokens")
        if value is None:
            value = min(self.config.default_max_tokens, limit - prompt_tokens)
            if value < 1:
                raise HTTPError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                     f"request has {prompt_tokens} input tokens.")
            return value
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HTTPError(400, "max_tokens must be an integer >= 1", param="max_tokens")
        if prompt_tokens + value > limit:
            raise HTTPError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                 f"{prompt_tokens + value} tokens ({prompt_tokens} in the messages, {value} in "
                                 f"the completion). Please reduce the length of the messages or completion.",
                            param="max_tokens")
        return value

    @staticmethod
    def _usage(h: _Handle) -> dict[str, int]:
        return {"prompt_tokens": h.prompt_tokens, "total_tokens": h.prompt_tokens + h.max_tokens,
                "completion_tokens": h.max_tokens}

    def _full_response(self, h: _Handle, chat: bool) -> dict[str, Any]:
        text = filler_text(0, h.max_tokens)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length", "stop_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
        return {"id": h.rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.config.model, "choices": [choice],
                "usage": self._usage(h)}

    async def _stream(self, request: web.Request, h: _Handle, chat: bool, include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        interval = self.config.stream_interval
        enc = ChunkEncoder(h.rid, int(time.time()), self.config.model, chat)
        sent = 0
        while True:
            await h.event.wait()
            h.event.clear()
            ready, done = h.delivered, h.finished
            out: list[bytes] = []
            # Like vLLM's --stream-interval: the first token at once, then every `interval` tokens,
            # and whatever is left when the request finishes.
            while sent < ready:
                n = 1 if sent == 0 else min(interval, ready - sent)
                if sent > 0 and n < interval and not done:
                    break
                if chat and sent == 0:
                    out.append(enc.role())
                out.append(enc.tokens(sent, sent + n, last=done and sent + n == ready))
                sent += n
            if done:
                if include_usage:
                    out.append(enc.usage(self._usage(h)))
                out.append(DONE)
            if out:
                await resp.write(b"".join(out))
            if done:
                break
        await resp.write_eof()
        return resp

    # -- the rest -----------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        m = self.config.model
        data = [{"id": m, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": m,
                 "parent": None, "max_model_len": self.config.profile.max_model_len}]
        return web.Response(body=_dumps({"object": "list", "data": data}), content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        # Like vLLM: 200 while the engine runs, 503 once it is dead.
        alive = self._engine is not None and not self._engine.done()
        return web.Response(status=200 if alive else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        lag = self.lag.summary(self.config.time_scale)
        extra = {"tokenpools_sim_lag_mean_seconds": lag["lag_mean_wall_s"],
                 "tokenpools_sim_lag_max_seconds": lag["lag_max_wall_s"]}
        text = self.metrics.render(self.scheduler, self.config.model, extra)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps(self.stats()), content_type="application/json")


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8100,
                stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or the task is cancelled); prints one line when listening."""
    server = SimServer(config)
    bound = await server.start(host, port)
    print(f"sim-backend listening on http://{host}:{bound} model={config.model} "
          f"profile={config.profile.name} time_scale={config.time_scale}", flush=True)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await server.stop()


__all__ = ["HTTPError", "SimConfig", "SimServer", "serve"]
