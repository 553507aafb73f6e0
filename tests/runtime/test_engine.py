"""The engine's plan, run and commit, with no model and no thread: a scripted slot session whose model counts (the
token after t is t + 1), plans checked as values, commits fed fabricated logits."""

from __future__ import annotations

import time

import numpy as np
import pytest

from codegen_deploy.config import ModelConfig
from codegen_deploy.runtime.engine import Plan, Row, RowSpec, SlotEngine
from codegen_deploy.runtime.sampling import SamplingConfig
from codegen_deploy.runtime.session import Session
from codegen_deploy.runtime.speculate import Acceptance, Drafter
from codegen_deploy.runtime.text import NoText

VOCAB = 64


class CountingSlots(Session):
    """Row slots whose model counts: the logits after token t are one-hot at (t + 1) % VOCAB. Each slot's cache
    is the list of tokens written to it, so a test can read what the engine left there."""

    name = "counting"
    supports_slots = True

    def __init__(self, n_positions: int = 128):
        config = ModelConfig(
            n_layer=1, n_embd=8, n_head=2, rotary_dim=2, n_positions=n_positions, n_inner=8, vocab_size=VOCAB
        )
        super().__init__(config)

    def _open_slots(self, rows: int) -> None:
        self.cache = [[0] * self.max_context for _ in range(rows)]

    @staticmethod
    def _after(tokens) -> np.ndarray:
        out = np.zeros((len(tokens), VOCAB), np.float32)
        out[np.arange(len(tokens)), (np.asarray(tokens) + 1) % VOCAB] = 10.0
        return out

    def _append_slot(self, slot, start, input_ids, keep):
        self.cache[slot][start : start + input_ids.shape[1]] = input_ids[0].tolist()
        return self._after(input_ids[0, -keep:])

    def _step_slots(self, first, tokens, lengths, active):
        for i in np.flatnonzero(active):
            at = int(lengths[i])
            self.cache[first + i][at : at + tokens.shape[1]] = tokens[i].tolist()
        return np.stack([self._after(row) for row in tokens])  # [n, k, V]

    def held(self, slot: int) -> list[int]:
        return self.cache[slot][: self.slot_length(slot)]

    def _prefill(self, *args):
        raise NotImplementedError

    def _step(self, *args):
        raise NotImplementedError


class Counting(Drafter):
    """Drafts the counting model's tokens, with `wrong_from` and later drafts off by one; records accept()."""

    name = "counting"

    def __init__(self, wrong_from: int = 99, trusted: bool = True):
        super().__init__()
        self.wrong_from, self.accepted = wrong_from, []
        for _ in range(20 if trusted else 0):
            Acceptance(history=self.history).update(4, 4)

    def propose(self, ids, k, row=0):
        return [(ids[-1] + 1 + j + (j >= self.wrong_from)) % VOCAB for j in range(k)]

    def accept(self, row, n):
        self.accepted.append((row, n))


def _row(prompt, max_tokens=20, **sampling) -> Row:
    return Row(RowSpec(tuple(prompt), max_tokens, SamplingConfig(**sampling)), NoText(), {VOCAB - 1})


def test_prompts_are_read_in_turns_within_the_budget_next_to_the_generating_rows():
    engine = SlotEngine(CountingSlots(), rows=3, prefill_chunk=4)
    short = _row([1, 2])
    engine.add(short)
    assert engine.plan() == Plan(reads=((short, 2),), budget=512)  # nobody generates: an idle piece
    engine.step()
    a, b = _row(range(10, 20)), _row(range(30, 36))
    engine.add(a)
    engine.add(b)
    assert engine.plan() == Plan(reads=((a, 4),), steps=(short,), budget=4)  # one row reads a piece
    engine.step()
    assert engine.plan() == Plan(reads=((b, 4),), steps=(short,), budget=4)  # then the other: turns
    engine.step()
    assert engine.plan() == Plan(reads=((a, 4),), steps=(short,), budget=4)
    engine.step()
    assert engine.plan() == Plan(reads=((b, 2), (a, 2)), steps=(short,), budget=4)  # b needs 2, a takes the rest
    engine.step()
    assert a.ids[-1] == 20 and b.ids[-1] == 36 and not a.reading and not b.reading  # the model counted on


def test_a_row_reads_only_what_a_free_slot_does_not_already_hold_as_a_prompt():
    """A slot's generated tokens were computed in one-token steps, which round otherwise than a prompt's
    pieces: a prompt that goes on with them reuses the last prompt and reads them again."""
    session = CountingSlots()
    engine = SlotEngine(session, rows=1, cache_memory=2**30)
    first = _row(range(1, 11), max_tokens=3)
    engine.add(first)
    while engine.has_work():
        engine.step()
    assert engine.cache_state().tokens == 12  # its prompt and the two tokens it fed back
    typed = _row([*range(1, 11), 11, 12, 40])
    engine.add(typed)
    assert typed.cached_tokens == typed.computed == 10
    assert engine.plan() == Plan(reads=((typed, 3),))  # whole prompts (prefill_chunk 0)
    engine.step()
    engine.remove(typed)
    again = _row([*range(1, 11), 11, 12, 40])  # the same prompt: all but its last piece
    engine.add(again)
    assert again.cached_tokens == 13 - session.min_piece and engine.plan() == Plan(reads=((again, session.min_piece),))


def test_a_row_drafts_when_it_beats_its_share_of_a_plain_step():
    """Alone, a trusted drafter's row drafts; next to two rows whose step is measured cheap per row, a drafter
    accepted half the time does not; sampled rows and rows reporting logprobs never draft."""
    session = CountingSlots()
    engine = SlotEngine(session, rows=3, drafter=Counting())
    alone = _row([5, 6])
    engine.add(alone)
    engine.step()
    (drafting,) = engine.plan().drafts
    assert drafting[0] is alone and drafting[1] > 1
    half = Counting(trusted=False)
    for _ in range(20):
        Acceptance(history=half.history).update(2, 1)
    engine = SlotEngine(CountingSlots(), rows=3, drafter=half)
    rows = [_row([5, 6]), _row([7, 8]), _row([9, 10])]
    for r in rows:
        engine.add(r)
    engine.step()
    engine.costs.record_step(1, 0.050)
    engine.costs.record_step(3, 0.060)  # a row's share: 0.4 of a one-row step
    plan = engine.plan()
    assert plan.drafts == () and plan.steps == tuple(rows)
    engine.costs.steps[3] = 0.150  # now stepping together saves nothing: a row drafts on its own
    assert [r for r, _ in engine.plan().drafts] == rows
    engine = SlotEngine(CountingSlots(), rows=2, drafter=Counting())
    sampled, reporting = _row([5, 6], temperature=0.7, seed=1), _row([5, 6])
    reporting.spec = RowSpec((5, 6), 20, logprobs=0)
    for r in (sampled, reporting):
        engine.add(r)
    engine.step()
    assert engine.plan() == Plan(steps=(sampled, reporting))


def test_commit_keeps_the_drafts_the_model_agrees_with_and_tells_the_drafter():
    session = CountingSlots()
    drafter = Counting(wrong_from=2)
    engine = SlotEngine(session, rows=1, drafter=drafter)
    row = _row([3, 4])
    engine.add(row)
    engine.step()
    assert row.ids == [3, 4, 5] and row.computed == 2
    plan = Plan(drafts=((row, 4),))
    out = engine.run(plan)
    assert out.checked[0][1] == [6, 7, 9, 10]  # the drafts: right, right, wrong, wrong
    assert session.slot_length(0) == 7  # the run wrote the last token and every draft
    (progress,) = engine.commit(plan, out)
    assert (progress.drafted, progress.accepted, progress.chosen) == (4, 2, 3)
    assert row.ids == [3, 4, 5, 6, 7, 8] and row.computed == 5  # two drafts and the model's own token
    assert session.held(0) == [3, 4, 5, 6, 7]  # the rejected drafts are cut from the cache
    assert drafter.accepted == [(0, 2)]


def test_a_row_that_ends_inside_its_accepted_drafts_keeps_only_its_ids():
    session = CountingSlots()
    engine = SlotEngine(session, rows=1, cache_memory=2**30, drafter=Counting())
    row = _row([VOCAB - 5], max_tokens=2)
    engine.add(row)
    engine.step()
    plan = Plan(drafts=((row, 2),))
    progress = engine.commit(plan, engine.run(plan))  # drafts VOCAB - 3, VOCAB - 2: both right
    assert progress[0].chosen == 1 and row.finish_reason == "length"  # max_tokens: the first draft was its last
    assert row.ids == [VOCAB - 5, VOCAB - 4, VOCAB - 3] and not engine.has_work()
    assert engine.cache_state().tokens == 3  # the slot keeps what the row computed of its ids, nothing beyond


@pytest.mark.parametrize("prefill_chunk", [0, 3])
def test_the_engine_decodes_what_the_model_says_with_and_without_drafts(prefill_chunk):
    for drafter in (None, Counting(), Counting(wrong_from=1)):
        engine = SlotEngine(CountingSlots(), rows=2, prefill_chunk=prefill_chunk, drafter=drafter)
        rows = [_row([1, 2, 3, 4, 5], max_tokens=7), _row([20], max_tokens=4)]
        for r in rows:
            engine.add(r)
        while engine.has_work():
            engine.step()
        assert rows[0].text.ids == list(range(6, 13)) and rows[1].text.ids == [21, 22, 23, 24]


def test_a_round_whose_row_a_client_cancels_is_not_timed_as_a_round():
    """A stream waits a whole round, start to start; but a round after which a client went away may be followed
    by a wait for new work, which is no round: it must not teach the cost model that rounds are slow."""
    engine = SlotEngine(CountingSlots(), rows=2)
    rows = [_row(range(1, 11), max_tokens=50), _row(range(20, 30), max_tokens=50)]
    for r in rows:
        engine.add(r)
    for _ in range(4):
        engine.step()
    engine.remove(rows[1])  # cancelled between two rounds
    time.sleep(1.0)  # the server waits for its next request
    engine.step()
    assert engine.costs.rounds[2] < 0.1 and engine.costs.rounds.get(1, 0.0) < 0.1  # not the 1 s wait


def test_a_round_after_which_a_row_joins_is_not_timed_as_a_round():
    """A row's admission may copy a cache into its slot: the round it follows is no plain round."""
    engine = SlotEngine(CountingSlots(), rows=2)
    first = _row(range(1, 11), max_tokens=50)
    engine.add(first)
    for _ in range(4):
        engine.step()
    add = engine.session.truncate_slot

    def slow_admission(*args):
        time.sleep(1.0)  # a large cache copied in
        return add(*args)

    engine.session.truncate_slot = slow_admission
    engine.add(_row(range(20, 30), max_tokens=50))
    engine.session.truncate_slot = add
    engine.step()
    assert engine.costs.rounds[1] < 0.1  # not the 1 s admission
