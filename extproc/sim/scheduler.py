"""A vLLM-like engine scheduler that runs in virtual time.

Pure and deterministic: no wall clock, no I/O, no randomness. The caller owns the clock: it calls
`step(now)` and advances its clock by the returned `duration`; everything the step produced (tokens,
finishes) happens at `now + duration`. The same object drives the real-time HTTP server and
discrete-event experiments.

Policy (vLLM v1, with the V0-style "decodes first" order the design asks for):
  1. running sequences that are decoding get one token each (admission order);
  2. running sequences still in (chunked) prefill get chunks from the remaining token budget;
  3. if nothing was preempted, waiting sequences are admitted FIFO while the budget, max_num_seqs and
     free KV blocks allow (head-of-line blocking, like vLLM).
KV is allocated in blocks of `block_size` tokens for exactly the tokens computed. When a running
sequence needs a block and none is free, the most recently admitted running sequence is preempted:
its blocks are freed and it goes back to the front of the waiting queue; on re-admission it recomputes
its prompt plus the tokens it had already generated (vLLM's recompute preemption).

Token positions: to emit output token g+1 a sequence must have computed (holds KV for) prompt + g tokens.
A prefill computes the prompt and emits token 1; each decode computes the last token and emits the next.
Output length is exactly max_tokens (no EOS).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from extproc.sim.profiles import Profile


class State(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class Request:
    """One sequence. Times are the caller's virtual seconds."""

    __slots__ = (
        "request_id", "prompt_tokens", "max_tokens", "arrival", "state", "generated", "computed",
        "blocks", "preemptions", "first_scheduled", "first_token", "prev_token", "last_token", "finished",
    )

    def __init__(self, request_id: str, prompt_tokens: int, max_tokens: int, arrival: float) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.state = State.WAITING
        self.generated = 0  # output tokens emitted so far
        self.computed = 0  # tokens whose KV is computed; freed on preemption
        self.blocks = 0  # KV blocks held
        self.preemptions = 0
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.prev_token: float | None = None  # emission time of the token before the last one
        self.last_token: float | None = None
        self.finished: float | None = None

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled (vLLM's request_queue_time)."""
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def last_itl(self) -> float | None:
        """Gap between the two most recent tokens (one inter-token-latency sample)."""
        return None if self.prev_token is None else self.last_token - self.prev_token  # type: ignore[operator]

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, as vLLM's benchmark reports it."""
        if self.finished is None or self.first_token is None or self.generated < 2:
            return None
        return (self.last_token - self.first_token) / (self.generated - 1)  # type: ignore[operator]

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.state.value}, prompt={self.prompt_tokens}, "
                f"gen={self.generated}/{self.max_tokens}, computed={self.computed}, blocks={self.blocks})")


@dataclass(slots=True)
class StepResult:
    """What one step did. Each request in `emitted` produced exactly one token at `end`."""

    start: float
    duration: float
    prefill_tokens: int = 0
    decode_tokens: int = 0
    emitted: list[Request] = field(default_factory=list)
    first_tokens: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


class Scheduler:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.block_size = profile.block_size
        self.total_blocks = profile.kv_blocks
        self.free_blocks = self.total_blocks
        self.running: list[Request] = []  # admission order; the last one is preempted first
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}  # live (waiting or running) requests
        self.kv_tokens = 0  # computed tokens held by running requests (the step model's R)
        # Counters, named after their vLLM metrics.
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_preemptions_total = 0
        self.request_success_total = 0
        self.aborted_total = 0
        self.steps_total = 0
        self._budget = 0  # token budget left in the step being planned

    # -- gauges ---------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, 0..1 (vllm:kv_cache_usage_perc)."""
        return 1.0 - self.free_blocks / self.total_blocks

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- requests -------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_tokens: int, max_tokens: int, now: float) -> Request:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        if prompt_tokens + max_tokens > self.profile.max_model_len:
            raise ValueError(f"prompt_tokens + max_tokens = {prompt_tokens + max_tokens} exceeds "
                             f"max_model_len {self.profile.max_model_len}")
        req = Request(request_id, prompt_tokens, max_tokens, now)
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its KV. False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req.state is State.RUNNING:
            self.running.remove(req)
            self._free(req)
        else:
            self.waiting.remove(req)
        req.state = State.ABORTED
        self.aborted_total += 1
        return True

    # -- the step -------------------------------------------------------------------------------
    def step(self, now: float) -> StepResult:
        """Schedule and run one engine step starting at `now`. Idle engine: duration 0, nothing done."""
        bs = self.block_size
        self._budget = self.profile.max_num_batched_tokens  # an attribute: preemption gives tokens back
        decodes: list[Request] = []
        chunks: list[tuple[Request, int]] = []
        preempted: list[Request] = []

        # 1. decodes. Iterate over a snapshot: preemption pops from the end of self.running.
        for req in list(self.running):
            if req.state is not State.RUNNING or self._budget == 0:
                continue
            if req.generated == 0 or req.prompt_tokens + req.generated - req.computed != 1:
                continue  # still in prefill: phase 2
            if req.computed + 1 > req.blocks * bs and not self._grow(req, 1, decodes, chunks, preempted):
                continue
            decodes.append(req)
            self._budget -= 1

        # 2. running sequences in (chunked) prefill, including re-admitted preempted ones.
        for req in list(self.running):
            if self._budget == 0:
                break
            if req.state is not State.RUNNING:
                continue
            need = req.prompt_tokens + req.generated - req.computed
            if req.generated > 0 and need == 1:
                continue  # decoding: scheduled in phase 1 (or left out for lack of budget)
            n = min(need, self._budget)
            if not self._grow(req, n, decodes, chunks, preempted):
                continue
            chunks.append((req, n))
            self._budget -= n

        # 3. admit from the waiting queue, FIFO, unless this step had to preempt.
        if not preempted:
            while self.waiting and self._budget > 0 and len(self.running) < self.profile.max_num_seqs:
                req = self.waiting[0]
                n = min(req.prompt_tokens + req.generated, self._budget)
                need_blocks = -(-n // bs)
                if need_blocks > self.free_blocks:
                    break
                self.waiting.popleft()
                self.free_blocks -= need_blocks
                req.blocks = need_blocks
                req.state = State.RUNNING
                if req.first_scheduled is None:
                    req.first_scheduled = now
                self.running.append(req)
                chunks.append((req, n))
                self._budget -= n

        # Apply: KV grows, then the step's duration depends on what is resident.
        prefill_tokens = 0
        for req, n in chunks:
            req.computed += n
            prefill_tokens += n
        for req in decodes:
            req.computed += 1
        self.kv_tokens += prefill_tokens + len(decodes)
        duration = 0.0
        if decodes or chunks:
            duration = self.profile.step_time(prefill_tokens, len(decodes), self.kv_tokens)
            self.steps_total += 1
        end = now + duration
        result = StepResult(now, duration, prefill_tokens, len(decodes), preempted=preempted)

        # Emit: every decode and every prefill that reached its last position produces one token.
        emitted = result.emitted
        emitted.extend(decodes)
        for req, _ in chunks:
            if req.computed == req.prompt_tokens + req.generated:
                emitted.append(req)
        any_finished = False
        for req in emitted:
            req.generated += 1
            req.prev_token = req.last_token
            req.last_token = end
            if req.generated == 1:
                req.first_token = end
                self.prompt_tokens_total += req.prompt_tokens
                result.first_tokens.append(req)
            if req.generated == req.max_tokens:
                req.finished = end
                req.state = State.FINISHED
                self._free(req)
                del self.requests[req.request_id]
                result.finished.append(req)
                any_finished = True
        self.generation_tokens_total += len(emitted)
        self.request_success_total += len(result.finished)
        if any_finished:
            self.running = [r for r in self.running if r.state is State.RUNNING]
        return result

    # -- KV helpers ----------------------------------------------------------------------------
    def _grow(self, req: Request, n: int, decodes: list[Request], chunks: list[tuple[Request, int]],
              preempted: list[Request]) -> bool:
        """Allocate blocks so `req` can compute n more tokens, preempting newest-first if needed.

        False when `req` itself had to be preempted (it was the newest running sequence)."""
        need = -(-(req.computed + n) // self.block_size) - req.blocks
        while need > self.free_blocks:
            victim = self.running.pop()
            # The victim is the newest running request, so if it was already scheduled in this step
            # it is the last entry of its list: un-schedule it.
            if decodes and decodes[-1] is victim:
                decodes.pop()
                self._budget += 1
            elif chunks and chunks[-1][0] is victim:
                self._budget += chunks.pop()[1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        self.free_blocks -= need
        req.blocks += need
        return True

    def _preempt(self, req: Request) -> None:
        self._free(req)
        req.state = State.WAITING
        req.preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        self.free_blocks += req.blocks
        self.kv_tokens -= req.computed
        req.blocks = 0
        req.computed = 0
