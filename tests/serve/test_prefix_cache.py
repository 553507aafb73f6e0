"""Prefix reuse and chunked prompts in the scheduler: which slot a row takes, what it reuses, what is computed,
how prompts share the chunk budget, and that none of it changes a row's output."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import pytest

from codegen_deploy.memory import available_memory_bytes
from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.runtime import generate
from codegen_deploy.runtime.engine import (
    FIRST_CHUNK,
    GAP_STEPS,
    IDLE_CHUNK,
    MIN_CHUNK,
    Plan,
    Row,
    RowSpec,
    SlotEngine,
    take_turns,
)
from codegen_deploy.runtime.generate import GenerationConfig
from codegen_deploy.runtime.prompt_cache import reusable
from codegen_deploy.runtime.sampling import SamplingConfig
from codegen_deploy.runtime.session import common_prefix
from codegen_deploy.runtime.text import NoText
from codegen_deploy.serve.batcher import Batcher
from codegen_deploy.serve.metrics import Metrics


class Collector:
    def __init__(self):
        self.text, self.tokens, self.finish, self.error, self.cached = "", [], None, None, None
        self.done = threading.Event()

    def __call__(self, update):
        self.text += update.text
        self.tokens += update.tokens
        if update.cached_tokens is not None:
            assert self.cached is None, "cached_tokens comes once, on the first update"
            self.cached = update.cached_tokens
        if update.finish_reason or update.error:
            self.finish, self.error = update.finish_reason, update.error
            self.done.set()


class Recording:
    """Wraps a session's slot methods to record what the scheduler asks for: ("append", slot, n) and
    ("step", slots)."""

    def __init__(self, session):
        self.calls: list[tuple] = []
        append, step = session.append_slot, session.step_slots

        def append_slot(slot, ids):
            self.calls.append(("append", slot, len(ids)))
            return append(slot, ids)

        def step_slots(slots, ids):
            self.calls.append(("step", tuple(slots)))
            return step(slots, ids)

        session.append_slot, session.step_slots = append_slot, step_slots

    def appended(self) -> list[int]:
        return [c[2] for c in self.calls if c[0] == "append"]


@pytest.fixture
def session(slot_session):
    return slot_session


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def _row(ids, max_tokens=4) -> Row:
    return Row(RowSpec(tuple(ids), max_tokens), NoText(), {0})


ROOMY = 2**30  # a prompt cache that never evicts in these tests


def held(engine) -> tuple[int, int]:
    """Idle prompts the engine keeps (in free slots and its prompt cache) and their tokens."""
    state = engine.cache_state()
    return state.entries, state.tokens


def admit(engine, waiting: deque) -> list:
    """Move rows from the front of `waiting` into `engine` while it takes them (as the Batcher does)."""
    taken = []
    while waiting and engine.add(waiting[0]):
        taken.append(waiting.popleft())
    return taken


def _serve(engine, ids) -> Row:
    """Run one row alone to its end; return it."""
    row = _row(ids)
    assert admit(engine, deque([row])) == [row]
    while engine.has_work():
        engine.step()
    return row


def test_common_prefix_and_turns():
    assert common_prefix([1, 2, 3, 4], (1, 2, 9)) == 2
    assert common_prefix([1, 2], (1, 2, 3)) == 2
    assert common_prefix([], (1,)) == 0
    assert common_prefix([5], (4,)) == 0
    assert take_turns([100, 100], 10) == [10, 0]  # one row per round: one run of the weights
    assert take_turns([3, 100, 100], 10) == [3, 7, 0]  # what the first leaves goes to the next
    assert take_turns([3, 4], 100) == [3, 4]  # never more than a row needs
    assert take_turns([5], 0) == [0]
    # Never a piece of one token, nor one token left for later (a one-token run rounds otherwise)
    assert take_turns([11, 100], 10) == [11, 0]  # the last token goes with the piece before it
    assert take_turns([3, 100], 4) == [3, 2]  # the next row gets two, not one
    assert take_turns([1], 4) == [1]  # a one-token prompt is read whole
    assert take_turns([40], 4, least=16) == [16]  # torch's pieces: at least 16
    assert take_turns([20], 4, least=16) == [20]  # 4 would leave 16, 16 would leave 4: all of it


def test_a_cache_is_reused_as_far_as_it_was_read_as_a_prompt_leaving_a_last_piece():
    cached = list(range(30))  # a 20-token prompt and 10 generated tokens
    assert reusable(cached, 20, tuple(range(40)), least=2) == 20  # not the generated tokens
    assert reusable(cached, 20, tuple(range(20)), least=2) == 18  # the same prompt: all but its last piece
    assert reusable(cached, 20, (0, 1, 2, 99, 99), least=2) == 3  # what they share
    assert reusable([7], 1, (7, 8, 9), least=2) == 0  # a one-token prompt was a one-token run
    assert reusable(cached, 20, tuple(range(25)), least=16) == 9  # the last piece has at least 16 tokens


def test_a_row_takes_the_slot_sharing_its_prefix_and_computes_only_the_rest(session):
    engine = SlotEngine(session, rows=2, cache_memory=ROOMY)
    rng = np.random.default_rng(0)
    file = rng.integers(0, 300, 40).tolist()
    other = rng.integers(0, 300, 30).tolist()
    a, b = _row(file), _row(other)
    assert admit(engine, deque([a, b])) == [a, b] and (a.slot, b.slot) == (0, 1)
    assert a.cached_tokens == b.cached_tokens == 0
    engine.step()  # whole prompts (prefill_chunk 0), and a first token each
    engine.remove(a)
    engine.remove(b)
    assert held(engine) == (2, 70)
    # The same file with a few more tokens typed goes to slot 0 and computes only the new tokens (at least a
    # whole piece: Session.min_piece).
    typed = _row([*file, *range(7, 7 + session.min_piece)])
    admit(engine, deque([typed]))
    assert typed.slot == 0 and typed.cached_tokens == 40 and session.slot_length(0) == 40
    # The identical prompt reuses all but its last piece (whose last logits give the first new token).
    again = _row(other)
    admit(engine, deque([again]))
    assert (
        again.slot == 1
        and again.cached_tokens == 30 - session.min_piece
        and session.slot_length(1) == 30 - session.min_piece
    )


def test_a_few_shared_tokens_never_cost_another_prompts_cache(session):
    engine = SlotEngine(session, rows=1, cache_memory=ROOMY)
    file = list(range(1, 41))
    _serve(engine, file)
    stranger = _serve(engine, file[:3] + [200] * 20)  # shares 3 of the file's 40 tokens: reuses them, copied
    assert stranger.cached_tokens == 3 and [e.cached for e in engine.store.entries] == [file]
    typed = _serve(engine, [*file, *[7] * session.min_piece])  # the file's own user still finds all of it
    assert typed.cached_tokens == 40


def test_a_long_completion_does_not_hide_its_prompt(session):
    """What counts is the prompt a cache was made for: after a long completion, the same prompt (a little
    longer) still reuses it."""
    engine = SlotEngine(session, rows=2, cache_memory=ROOMY)
    prompt = list(range(1, 21))
    row = _row(prompt, max_tokens=61)
    admit(engine, deque([row]))
    for _ in range(61):  # the prompt, then a 60-token completion that stays in the slot's cache
        engine.step()
    assert not engine.has_work() and held(engine) == (1, 80)
    again = _row([*prompt, *[7] * session.min_piece])
    admit(engine, deque([again]))
    assert again.slot == 0 and again.cached_tokens == 20


def test_the_prompt_cache_keeps_what_fits_in_its_bytes_and_evicts_the_least_recently_used(session):
    n = 8 + session.min_piece
    per_prompt = n * session.kv_bytes_per_token
    engine = SlotEngine(session, rows=1, cache_memory=2 * per_prompt)  # room for two idle prompts
    files = [[i + 1] * n for i in range(4)]
    for ids in files:  # one slot: each file moves the one before it into the prompt cache
        _serve(engine, ids)
    # Files 2 and 3 in the prompt cache (file 1 evicted first, the least recently used), file 4 in the slot.
    assert [e.cached for e in engine.store.entries] == [files[1], files[2]]
    state = engine.cache_state()
    assert (state.entries, state.evictions) == (3, 1) and engine.store.nbytes == 2 * per_prompt
    assert (
        _serve(engine, [*files[1], *[9] * session.min_piece]).cached_tokens == n
    )  # kept: read back from the prompt cache
    assert _serve(engine, [*files[0], *[9] * session.min_piece]).cached_tokens == 0  # evicted: computed again
    assert engine.store.nbytes <= engine.store.capacity
    off = SlotEngine(session, rows=1, cache_memory=0)  # reuse off: nothing is kept
    _serve(off, files[0])
    assert held(off) == (0, 0) and _serve(off, [*files[0], *[9] * session.min_piece]).cached_tokens == 0


def test_one_row_slot_keeps_many_editors_files_and_reading_one_back_changes_no_logit(session):
    engine = SlotEngine(session, rows=1, cache_memory=ROOMY)
    assert session.slot_count >= 1
    rng = np.random.default_rng(1)
    files = [rng.integers(1, 300, 20 + 7 * i).tolist() for i in range(3)]
    for ids in files:
        _serve(engine, ids)
    assert held(engine) == (3, sum(map(len, files)) + 3)  # stashed: prompts; the slot: and what it generated
    typed = [*files[0], *range(5, 5 + session.min_piece)]
    row = _row(typed)
    admit(engine, deque([row]))
    assert row.cached_tokens == len(files[0]) and not any(e.cached == files[0] for e in engine.store.entries)
    (read,) = engine.run(engine.plan()).read
    session.truncate_slot(0, 0)
    cold = session.append_slot(0, typed)
    np.testing.assert_array_equal(read[1], cold)


def test_a_prompt_cut_off_mid_way_leaves_what_it_computed(session):
    """A cancelled request's prompt stays for the next one: what the chunks computed is reused."""
    engine = SlotEngine(session, rows=1, cache_memory=ROOMY)
    prompt = list(range(1, 31))
    first = _row(prompt)
    admit(engine, deque([first]))
    plan = Plan(reads=((first, 12),), budget=12)
    progress = engine.commit(plan, engine.run(plan))
    assert [p.chosen for p in progress] == [0] and first.computed == 12 and first.reading
    engine.remove(first)  # cancelled
    second = _row(prompt)
    admit(engine, deque([second]))
    assert second.cached_tokens == 12
    assert engine.plan() == Plan(reads=((second, 18),))
    (progress,) = engine.step()
    assert progress.chosen == 1 and second.computed == 30 and not second.reading


def test_chunked_prompts_interleave_with_the_running_rows_and_take_turns(session, tokenizer):
    chunk = max(4, session.min_piece)
    recording = Recording(session)
    batcher = Batcher(session, tokenizer, max_batch=3, max_queue=4, prefill_chunk=chunk)
    short = tuple(range(1, 4))
    long_a, long_b = tuple(range(10, 10 + 10 * chunk)), tuple(range(200, 200 + 9 * chunk))
    # The short row generates (eos out of reach) until well after both long prompts are read, however late the
    # test sees its first token.
    endless = SamplingConfig(logit_bias=((tokenizer.eos_token_id, -100.0),))
    specs = [RowSpec(short, 100, endless), RowSpec(long_a, 4), RowSpec(long_b, 4)]
    sinks = [Collector() for _ in range(3)]
    batcher.submit(specs[:1], sinks[:1])
    batcher.start()
    try:
        while not sinks[0].tokens:  # the short row is generating
            threading.Event().wait(0.005)
        batcher.submit(specs[1:], sinks[1:])
        for s in sinks:
            assert s.done.wait(60)
    finally:
        batcher.stop()
    # While the short row generated, each round computed at most `chunk` prompt tokens (a few more where
    # fewer than a piece would be left: Session.min_piece), then stepped; the two long prompts took turns.
    calls = recording.calls[recording.calls.index(("step", (0,))) :]
    rounds, current = [], []
    for c in calls:
        if c[0] == "append":
            current.append((c[1], c[2]))
        else:
            rounds.append(current)
            current = []
    reading = [r for r in rounds if r]
    assert sum(n for r in reading for _, n in r) == len(long_a) + len(long_b)
    assert all(sum(n for _, n in r) <= chunk + session.min_piece - 1 for r in reading)
    slots = [r[0][0] for r in reading[:6]]
    assert slots == [1, 2, 1, 2, 1, 2]  # turns
    assert batcher.engine.budget(generating=1) == chunk
    for spec, sink in zip(specs, sinks, strict=True):
        config = GenerationConfig(max_new_tokens=spec.max_tokens, sampling=spec.sampling)
        assert sink.tokens == generate(session, tokenizer, list(spec.prompt_ids), config).ids


def test_auto_chunks_follow_the_measured_costs(session, tokenizer):
    batcher = Batcher(session, tokenizer, max_batch=2)
    engine = batcher.engine
    assert engine.budget(generating=1) == FIRST_CHUNK
    assert engine.budget(generating=0) == (session.prompt_chunk or IDLE_CHUNK)
    engine.costs.record_step(1, 0.050)  # a 50 ms step, 2 ms per prompt token
    engine.costs.token_s = 0.002
    assert engine.budget(generating=1) == int((GAP_STEPS - 2) * 0.050 / 0.002)
    engine.costs.token_s = 1.0  # a very slow prompt path: never below MIN_CHUNK
    assert engine.budget(generating=1) == MIN_CHUNK
    assert Batcher(session, tokenizer, prefill_chunk=0).engine.budget(generating=1) is None
    # Measured while serving: after a long prompt next to a stream, both costs are known.
    sinks = [Collector(), Collector()]
    batcher.submit([RowSpec((1, 2, 3), 40)], sinks[:1])
    engine.costs.steps.clear()
    engine.costs.token_s = None
    batcher.start()
    try:
        while not sinks[0].tokens:
            threading.Event().wait(0.005)
        batcher.submit([RowSpec(tuple(range(5, 100)), 2)], sinks[1:])
        for s in sinks:
            assert s.done.wait(60)
    finally:
        batcher.stop()
    assert engine.costs.steps[1] > 0 and engine.costs.token_s > 0
    assert engine.costs.rounds[1] > 0  # whole rounds, as the stream saw them
    assert MIN_CHUNK <= engine.budget(generating=1) <= (session.prompt_chunk or IDLE_CHUNK)


def test_reuse_and_chunks_never_change_a_result(session, tokenizer):
    """Greedy and seeded sampled rows give what each gives alone, whether its prompt came from a cache, in
    chunks, or whole; n > 1 rows of one prompt too."""
    base = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    prompts = [base, base + "    return fib", base + "    return fibonacci(n - 1)", "x = 1\n" + base]
    greedy = SamplingConfig()
    sampled = [SamplingConfig(temperature=0.9, top_p=0.95, seed=s) for s in (3, 4)]

    def alone(prompt, sampling):
        return generate(session, tokenizer, prompt, GenerationConfig(max_new_tokens=8, sampling=sampling)).text

    expected = {(p, s): alone(p, s) for p in prompts for s in [greedy, *sampled]}
    metrics = Metrics()
    batcher = Batcher(session, tokenizer, max_batch=2, max_queue=8, metrics=metrics, prefill_chunk=5)
    batcher.start()
    try:
        cached = []
        for p in prompts:
            ids = tuple(tokenizer.encode(p))
            specs = [RowSpec(ids, 8, greedy), *(RowSpec(ids, 8, s) for s in sampled)]  # one prompt, n = 3
            sinks = [Collector() for _ in specs]
            batcher.submit(specs, sinks)
            for s, spec in zip(sinks, specs, strict=True):
                assert s.done.wait(60)
                assert s.text == expected[(p, spec.sampling)]
            cached.append([s.cached for s in sinks])
    finally:
        batcher.stop()
    assert min(cached[0]) == 0  # the first rows found nothing (the third, waiting for a slot, may reuse)
    for typed in (1, 2):  # the typed continuations reused the file (up to their last piece)
        reuse = min(len(tokenizer.encode(base)) - 1, len(tokenizer.encode(prompts[typed])) - session.min_piece)
        assert max(cached[typed]) >= reuse > 0
    hit = metrics.prompt_cache_tokens.labels(result="hit")._value.get()
    miss = metrics.prompt_cache_tokens.labels(result="miss")._value.get()
    total = sum(len(tokenizer.encode(p)) for p in prompts) * 3
    assert hit == sum(map(sum, cached)) and hit + miss == total


def test_reuse_and_chunks_are_off_where_this_machines_kernels_split_a_prompt_otherwise(session, tokenizer, monkeypatch):
    """The rule that makes reuse and chunks exact rests on the kernels computing a prompt in pieces as whole: the
    scheduler checks that at start and turns both off, saying why, where it does not hold."""
    assert Batcher(session, tokenizer, max_batch=2, prefill_chunk=5).pieces_agree  # the real kernels agree
    append = session.append_slot
    monkeypatch.setattr(session, "append_slot", lambda slot, ids: append(slot, ids) + 1e-6 * len(ids))
    batcher = Batcher(session, tokenizer, max_batch=2, prefill_chunk=5)
    assert not batcher.pieces_agree and not batcher.engine.caching and batcher.engine.prefill_chunk == 0
    assert "otherwise than whole" in batcher.describe_cache() and "otherwise than whole" in batcher.describe_chunks()
    off = Batcher(session, tokenizer, max_batch=2, cache_memory=0, prefill_chunk=0)  # nothing to check
    assert off.pieces_agree


def test_with_chunk_reuse_a_rotated_ring_reads_only_the_new_chunk_and_the_file(session):
    """llama.vim's /infill: a ring of extra chunks before the file; when it rotates (the oldest chunk out, a new
    one in), the chunks it kept move to earlier positions. With --cache-reuse they are moved (keys turned), and
    only the new chunk and the file are read; without, nothing is shared and all of it is read."""
    ring = [t for c in range(1, 6) for t in range(100 * c, 100 * c + 12)]  # 5 chunks of 12 tokens
    file = list(range(1000, 1000 + 20 + session.min_piece))
    before, after = [*ring[:48], *file], [*ring[12:], *file]
    for least_run, reused in ((0, 0), (8, 36)):
        engine = SlotEngine(session, rows=1, cache_memory=ROOMY, cache_reuse=least_run)
        _serve(engine, before)
        _serve(engine, list(range(1, 30)))  # another request: the ring goes to the prompt cache and back
        recording = Recording(session)
        row = _serve(engine, after)
        assert row.cached_tokens == reused
        assert sum(recording.appended()) == len(after) - reused  # the new chunk and the file
        del session.append_slot, session.step_slots  # the recording's wrappers


def test_the_start_up_line_states_the_prompt_cache_in_bytes_and_tokens(session, tokenizer):
    batcher = Batcher(session, tokenizer, max_batch=2, cache_memory=2**30, cache_reuse=64)
    per_token = session.kv_bytes_per_token
    line = batcher.describe_cache()
    assert line.startswith("prefix cache: 1.00 GiB of idle prompts") and f"{2**30 // per_token:,} tokens" in line
    assert "approximate" in line  # chunk reuse says what it costs
    auto = Batcher(session, tokenizer, max_batch=2).engine.store.capacity  # a quarter of what is available
    assert 0.1 * available_memory_bytes() < auto < 0.4 * available_memory_bytes()
    assert Batcher(session, tokenizer, max_batch=2, cache_memory=0).describe_cache() == "prefix cache: off"
