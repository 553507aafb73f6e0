"""Row slots that grow by chunks and shrink: a prompt appended in pieces, or after a truncated cache, computes
what the whole sequence computes at once, on every slot backend, shape and dtype, against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codegen_deploy.errors import InputError
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.verify.tolerance import tolerance_for
from tests.runtime.conftest import slot_cases

SEQUENCE = 40
CHUNKS = [(0, 7), (7, 8), (8, 21), (21, SEQUENCE)]  # [start, end) pieces: one token, several, the rest


@pytest.fixture(scope="module", params=slot_cases())
def case(request, slot_session):
    """(reference model, a slot session over it with 3 slots, dtype)."""
    model, session, _ = slot_session(request.param, seed=11)
    session.open_slots(3)
    with session:
        yield model, session, request.param[1]


def _reference(model: CodeGen, ids: np.ndarray) -> np.ndarray:
    """Logits [T, V] float32 at every position of ids [T], all at once."""
    with torch.no_grad():
        logits, _ = model(torch.tensor(ids[None]))
    return logits[0].float().numpy()


def _close(got: np.ndarray, expected: np.ndarray, dtype: str) -> None:
    tol = tolerance_for(dtype)
    bound = tol.bound(float(np.abs(expected).max()))
    assert float(np.abs(got - expected).max()) <= bound


def test_a_prompt_in_chunks_computes_what_it_computes_at_once(case):
    model, session, dtype = case
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, SEQUENCE)
    expected = _reference(model, ids)
    session.truncate_slot(1, 0)
    whole = session.append_slot(1, ids)
    _close(whole, expected[-1], dtype)
    for start, end in CHUNKS:
        assert session.slot_length(2) == start
        got = session.append_slot(2, ids[start:end])
        _close(got, expected[end - 1], dtype)
    np.testing.assert_allclose(got, whole, atol=tolerance_for(dtype).atol, rtol=0)
    # Steps after the chunks go on from the last position, like steps after the whole prompt.
    more = np.random.default_rng(1).integers(0, model.config.vocab_size, 3)
    longer = _reference(model, np.concatenate([ids, more]))
    for k, token in enumerate(more):
        logits = session.step_slots([1, 2], [token, token])
        _close(logits[0], longer[SEQUENCE + k], dtype)
        _close(logits[1], longer[SEQUENCE + k], dtype)
    session.free_slot(1)
    session.free_slot(2)


def test_a_truncated_slot_continues_with_another_suffix(case):
    """The editor case: the cache of a file is cut back to the part the next prompt shares, and only the new
    tail is computed; the other slots' caches are untouched."""
    model, session, dtype = case
    rng = np.random.default_rng(2)
    first = rng.integers(0, model.config.vocab_size, SEQUENCE)
    other = rng.integers(0, model.config.vocab_size, 9)
    session.prefill_slot(0, other)
    session.prefill_slot(1, first)
    session.step_slots([1], [int(first[0])])  # a generated token that the next prompt does not share
    shared = 25
    second = np.concatenate([first[:shared], rng.integers(0, model.config.vocab_size, 10)])
    session.truncate_slot(1, shared)
    assert session.slot_length(1) == shared
    got = session.append_slot(1, second[shared:])
    _close(got, _reference(model, second)[-1], dtype)
    # The neighbour's cache still holds its prompt: its next step is the one it would take alone.
    token = int(rng.integers(0, model.config.vocab_size))
    _close(session.step_slots([0], [token])[0], _reference(model, np.append(other, token))[-1], dtype)
    for slot in range(3):
        session.free_slot(slot)


def test_bad_appends_and_truncations_leave_the_slot_as_it_was(case):
    model, session, dtype = case
    ids = np.arange(10) % model.config.vocab_size
    session.prefill_slot(0, ids)
    with pytest.raises(InputError, match="context holds"):
        session.append_slot(0, [1] * (session.max_context - 9))
    with pytest.raises(InputError, match="empty"):
        session.append_slot(0, [])
    with pytest.raises(InputError, match="cannot keep 11"):
        session.truncate_slot(0, 11)
    with pytest.raises(InputError, match="cannot keep -1"):
        session.truncate_slot(0, -1)
    assert session.slot_length(0) == 10
    token = 3
    _close(session.step_slots([0], [token])[0], _reference(model, np.append(ids, token))[-1], dtype)
    session.free_slot(0)
    assert session.slot_length(0) == 0


def test_several_tokens_per_slot_in_one_run_give_each_positions_logits(case):
    """A speculative step: k tokens appended to each of several slots at once give the logits after each;
    cutting a slot back (drafts rejected) and stepping on computes what the accepted sequence computes."""
    model, session, dtype = case
    vocab = model.config.vocab_size
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, vocab, 20), rng.integers(0, vocab, 9)
    session.prefill_slot(0, a)
    session.prefill_slot(2, b)  # slot 1 stays free: a dummy row inside the range
    drafts = rng.integers(0, vocab, (2, 4))
    got = session.extend_slots([0, 2], drafts)  # [2, 4, V]
    assert got.shape == (2, 4, vocab)
    for row, (prompt, extra) in enumerate(((a, drafts[0]), (b, drafts[1]))):
        expected = _reference(model, np.concatenate([prompt, extra]))[len(prompt) :]  # [4, V]
        for j in range(4):
            _close(got[row, j], expected[j], dtype)
    assert [session.slot_length(s) for s in range(3)] == [24, 0, 13]
    session.truncate_slot(0, 22)  # two drafts accepted
    token = int(rng.integers(0, vocab))
    after = session.step_slots([0], [token])[0]
    _close(after, _reference(model, np.concatenate([a, drafts[0, :2], [token]]))[-1], dtype)
    for slot in range(3):
        session.free_slot(slot)
