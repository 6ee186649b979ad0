"""The virtual-time scheduler: KV accounting, preemption, ordering, chunked prefill, timings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.sim.driver import Arrival, run_virtual
from extproc.sim.profiles import Profile, get_profile
from extproc.sim.scheduler import Scheduler, State, StepResult

BS = 16


def tiny(**kw: object) -> Profile:
    """A small engine where KV and budgets run out quickly; 1 ms per token, no floor."""
    base = dict(name="tiny", max_num_seqs=4, max_num_batched_tokens=64, kv_cache_tokens=256, max_model_len=256,
                block_size=BS, base_s=0.0, prefill_token_s=0.001, decode_token_s=0.001, resident_token_s=0.0,
                min_step_s=0.0)
    base.update(kw)
    return Profile(**base)  # type: ignore[arg-type]


def check_invariants(s: Scheduler, r: StepResult) -> None:
    p = s.profile
    used = sum(q.blocks for q in s.running)
    assert s.free_blocks >= 0
    assert used + s.free_blocks == s.total_blocks, "every block is free or held by a running request"
    assert used * BS <= p.kv_cache_tokens
    assert all(q.blocks == 0 and q.computed == 0 for q in s.waiting), "waiting requests hold no KV"
    assert all(q.blocks == -(-q.computed // BS) for q in s.running), "KV allocated in whole blocks, no more"
    assert s.kv_tokens == sum(q.computed for q in s.running)
    assert len(s.running) <= p.max_num_seqs
    assert r.num_tokens <= p.max_num_batched_tokens
    assert 0.0 <= s.kv_usage <= 1.0


request_mix = st.lists(
    st.tuples(st.integers(1, 120), st.integers(1, 100), st.integers(0, 30), st.booleans()),
    min_size=1, max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(mix=request_mix, kv_blocks=st.integers(14, 24), budget=st.integers(8, 96), seqs=st.integers(1, 6))
def test_kv_never_over_capacity_and_everything_completes(mix, kv_blocks, budget, seqs):
    prof = tiny(kv_cache_tokens=kv_blocks * BS, max_num_batched_tokens=budget, max_num_seqs=seqs,
                max_model_len=220)
    s = Scheduler(prof)
    added: dict[str, tuple[int, int]] = {}
    aborted: set[str] = set()
    arrivals = sorted(((at, i, p, o, ab) for i, (p, o, at, ab) in enumerate(mix)), key=lambda x: x[0])
    now, step_no, k = 0.0, 0, 0
    finished = []
    while k < len(arrivals) or s.has_work:
        while k < len(arrivals) and arrivals[k][0] <= step_no:
            _, i, p, o, _ = arrivals[k]
            s.add(f"r{i}", p, o, now)
            added[f"r{i}"] = (p, o)
            k += 1
        # Abort some requests part-way, wherever they are.
        for _, i, _, _, ab in arrivals[:k]:
            rid = f"r{i}"
            if ab and rid not in aborted and step_no % 7 == i % 7 and rid in s.requests:
                assert s.abort(rid)
                aborted.add(rid)
        running_before = {q.request_id for q in s.running}
        r = s.step(now)
        check_invariants(s, r)
        if r.preempted:
            assert {q.request_id for q in s.running} <= running_before, "no admissions in a step that preempts"
        assert r.num_tokens > 0 or not s.has_work, "work left but nothing scheduled"
        now = r.end
        finished += r.finished
        step_no += 1
        assert step_no < 5_000, "no progress"
    assert s.free_blocks == s.total_blocks and s.kv_tokens == 0
    assert {q.request_id for q in finished} == set(added) - aborted
    for q in finished:
        assert q.generated == q.max_tokens == added[q.request_id][1]
        assert q.arrival <= q.first_scheduled <= q.first_token <= q.finished
    assert s.request_success_total == len(finished)
    assert s.generation_tokens_total >= sum(q.max_tokens for q in finished)


def test_preemption_exactly_when_kv_runs_out_and_victim_finishes_with_full_usage():
    # 4 blocks of 16 tokens. Two requests of 16 prompt tokens each: one block each after prefill, two each
    # after 1 decode; the first decode that needs a third block for A finds none free.
    s = Scheduler(tiny(kv_cache_tokens=4 * BS, max_model_len=64))
    s.add("A", 16, 40, 0.0)
    s.add("B", 16, 40, 0.0)
    now, steps = 0.0, []
    first_preempt_step = None
    while s.has_work:
        free_before = s.free_blocks
        need = [q for q in s.running if q.computed + 1 > q.blocks * BS]  # decodes that need a new block
        r = s.step(now)
        steps.append(r)
        if r.preempted and first_preempt_step is None:
            first_preempt_step = len(steps)
            # Out of KV: the blocks needed exceeded those free, and the newest request was the victim.
            assert len(need) > free_before == 0
            assert [q.request_id for q in r.preempted] == ["B"]
            assert s.waiting[0].request_id == "B" and s.waiting[0].computed == 0
        elif first_preempt_step is None:
            assert len(need) <= free_before, "no preemption while free blocks suffice"
        now = r.end
    # Step 1 prefills both (16 tokens, 1 block each); decode step j computes position 16 + j - 2, so the
    # step that computes position 32 (A's 3rd block) is step 18, when no block is free.
    assert first_preempt_step == 18
    done = {q.request_id: q for r in steps for q in r.finished}
    b = done["B"]
    assert b.preemptions >= 1 and done["B"].generated == 40 and b.finished > done["A"].finished
    assert s.prompt_tokens_total == 32, "prompt tokens count once per request, not per recompute"
    assert s.generation_tokens_total == 80
    assert s.num_preemptions_total >= 1 and s.request_success_total == 2


def test_no_admission_in_a_step_that_preempts():
    # With a 9-token budget the victim's recompute chunk (8 tokens, one block) would fit in the block left
    # free after preemption; vLLM still admits nothing from the waiting queue in that step.
    s = Scheduler(tiny(kv_cache_tokens=4 * BS, max_model_len=64, max_num_batched_tokens=9))
    s.add("A", 16, 40, 0.0)
    s.add("B", 16, 40, 0.0)
    now = 0.0
    while True:
        before = {q.request_id for q in s.running}
        r = s.step(now)
        now = r.end
        if r.preempted:
            break
    assert [q.request_id for q in r.preempted] == ["B"] and s.free_blocks >= 1
    assert {q.request_id for q in s.running} <= before and s.waiting[0].request_id == "B"
    r = s.step(now)
    assert "B" in {q.request_id for q in s.running}, "re-admitted in the next step"


def test_recompute_includes_generated_tokens():
    s = Scheduler(tiny(kv_cache_tokens=4 * BS, max_model_len=64, max_num_batched_tokens=256))
    s.add("A", 16, 40, 0.0)
    s.add("B", 16, 40, 0.0)
    now = 0.0
    while not (r := s.step(now)).preempted:
        now = r.end
    b = r.preempted[0]
    g = b.generated
    assert g > 0
    now = r.end
    # B is re-admitted after A finishes and must recompute prompt + the tokens it already generated.
    while b.state is not State.RUNNING:
        r = s.step(now)
        now = r.end
    assert b in r.emitted and r.prefill_tokens == 16 + g
    assert b.generated == g + 1


def test_ttft_grows_with_queue_length():
    prof = tiny(max_num_seqs=2, kv_cache_tokens=1024, max_model_len=512)
    s = Scheduler(prof)
    for i in range(12):
        s.add(f"r{i}", 32, 8, 0.0)
    done, _ = run_virtual(s, [])
    ttft = [q.ttft for q in sorted(done, key=lambda q: int(q.request_id[1:]))]
    assert all(a <= b for a, b in zip(ttft, ttft[1:])), "FIFO: later in the queue, later first token"
    assert ttft[-1] > 4 * ttft[0]
    mean_ttft = {}
    for n in (1, 4, 16):
        s = Scheduler(prof)
        done, _ = run_virtual(s, [Arrival(0.0, f"r{i}", 32, 8) for i in range(n)])
        mean_ttft[n] = sum(q.ttft for q in done) / n
    assert mean_ttft[1] < mean_ttft[4] < mean_ttft[16]


def test_decodes_scheduled_before_prefills():
    s = Scheduler(tiny(max_num_batched_tokens=8, max_num_seqs=8))
    for i in range(3):
        s.add(f"d{i}", 4, 50, 0.0)
    r = s.step(0.0)  # 12 prompt tokens > budget 8: d2 waits a step
    while s.waiting or any(q.generated == 0 for q in s.running):
        r = s.step(r.end)
    s.add("p", 100, 5, r.end)
    r = s.step(r.end)
    assert r.decode_tokens == 3 and r.prefill_tokens == 5, "decodes first, the prefill gets what is left"
    # A request mid-prefill (admitted earlier) still does not starve the decodes.
    r = s.step(r.end)
    assert r.decode_tokens == 3 and r.prefill_tokens == 5


def test_decodes_first_even_with_a_budget_only_for_decodes():
    s = Scheduler(tiny(max_num_batched_tokens=2, max_num_seqs=4))
    s.add("a", 2, 20, 0.0)
    r = s.step(0.0)
    s.add("b", 2, 20, r.end)
    r = s.step(r.end)  # a decodes (1), b gets 1 prompt token
    assert (r.decode_tokens, r.prefill_tokens) == (1, 1)
    r = s.step(r.end)  # a decodes, b finishes its prefill
    assert (r.decode_tokens, r.prefill_tokens) == (1, 1)
    s.add("c", 5, 5, r.end)
    r = s.step(r.end)  # a and b decode: nothing left for c
    assert (r.decode_tokens, r.prefill_tokens) == (2, 0)
    assert s.waiting[0].request_id == "c"


def test_chunked_prefill_respects_budget():
    s = Scheduler(tiny(max_num_batched_tokens=32, max_model_len=256))
    s.add("long", 100, 3, 0.0)
    now, chunks = 0.0, []
    while True:
        r = s.step(now)
        now = r.end
        chunks.append(r.prefill_tokens)
        if r.first_tokens:
            break
    assert chunks == [32, 32, 32, 4]
    assert len(chunks) == math.ceil(100 / 32)


def test_abort_frees_kv_anywhere():
    s = Scheduler(tiny(max_num_seqs=1))
    s.add("run", 40, 50, 0.0)
    s.add("wait", 40, 50, 0.0)
    r = s.step(0.0)
    assert s.num_running == 1 and s.num_waiting == 1 and s.kv_usage > 0
    assert s.abort("wait") and s.num_waiting == 0
    assert s.abort("run")
    assert s.free_blocks == s.total_blocks and s.kv_usage == 0 and s.kv_tokens == 0 and not s.has_work
    assert not s.abort("run") and not s.abort("nope")
    assert s.aborted_total == 2
    assert s.step(r.end).duration == 0.0


def test_step_time_follows_profile():
    prof = tiny(base_s=0.002, prefill_token_s=0.0001, decode_token_s=0.00005, resident_token_s=1e-6, min_step_s=0.0)
    s = Scheduler(prof)
    s.add("a", 50, 5, 0.0)
    r = s.step(0.0)
    assert r.duration == pytest.approx(0.002 + 50 * 0.0001 + 50 * 1e-6)
    r = s.step(r.end)
    assert r.duration == pytest.approx(0.002 + 1 * 0.00005 + 51 * 1e-6)
    floor = Scheduler(tiny(min_step_s=0.5))
    floor.add("a", 50, 5, 0.0)
    assert floor.step(0.0).duration == pytest.approx(0.5)


def test_per_request_timings():
    s = Scheduler(tiny())
    s.add("a", 10, 4, 1.0)
    t = 2.0  # the first step starts one second after arrival
    ends = []
    while s.has_work:
        r = s.step(t)
        t = r.end
        ends.append(t)
    (a,) = r.finished
    assert a.queue_time == pytest.approx(1.0)
    assert a.ttft == pytest.approx(ends[0] - 1.0)
    assert a.e2e == pytest.approx(ends[-1] - 1.0)
    assert a.tpot == pytest.approx((ends[-1] - ends[0]) / 3)
    assert a.last_itl == pytest.approx(ends[-1] - ends[-2])


def test_deterministic():
    def run() -> list[tuple[str, float]]:
        s = Scheduler(tiny(kv_cache_tokens=8 * BS, max_model_len=128))
        arr = [Arrival(i * 0.01, f"r{i}", 10 + 7 * i % 50, 5 + 3 * i % 40) for i in range(30)]
        done, _ = run_virtual(s, arr)
        return [(q.request_id, q.finished) for q in done]

    assert run() == run()


def test_rejects_requests_that_can_never_fit():
    s = Scheduler(tiny())
    with pytest.raises(ValueError):
        s.add("x", 200, 100, 0.0)
    with pytest.raises(ValueError):
        s.add("y", 0, 1, 0.0)
    s.add("z", 1, 1, 0.0)
    with pytest.raises(ValueError):
        s.add("z", 1, 1, 0.0)


def test_profile_validation_and_builtins():
    with pytest.raises(ValueError):
        tiny(max_model_len=10_000)
    for name in ("paper-spark", "h100-llama3-8b"):
        p = get_profile(name)
        assert p.block_size == 16 and p.max_model_len <= p.kv_cache_tokens
    assert get_profile("h100-llama3-8b").kv_bytes_per_token == 128 * 1024
    with pytest.raises(ValueError):
        get_profile("nope")


def test_big_run_is_fast():
    # 320 concurrent requests on the H100 profile: the closed loop runs ~100 s of virtual time.
    import time

    s = Scheduler(get_profile("h100-llama3-8b"))
    n = [0]

    def again(q):
        n[0] += 1
        return [Arrival(q.finished, q.request_id + "+", 200, 200)] if n[0] < 3000 else []

    t0 = time.perf_counter()
    done, end = run_virtual(s, [Arrival(0.0, f"r{i}", 200, 200) for i in range(320)], on_finish=again)
    wall = time.perf_counter() - t0
    assert len(done) == 3000 + 319
    assert wall < 10 * end, "much faster than real time"
