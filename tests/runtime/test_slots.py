"""Row slots (continuous batching): rows that start at different steps, each at its own length, compute
exactly what each prompt computes alone."""

from __future__ import annotations

import numpy as np
import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.runtime import open_session

PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2], [250, 31, 8, 64]]
STEPS = 6


def alone(session, prompt: list[int]) -> list[np.ndarray]:
    """Greedy logits of a prompt run alone with the batch API: prefill, then STEPS steps."""
    logits = [session.prefill(np.array([prompt]))[0]]
    for _ in range(STEPS):
        logits.append(session.step(np.array([logits[-1].argmax()]))[0])
    return logits


@pytest.fixture(params=["torch", "onnxruntime-fused"])
def session(request, fp32_export, tiny_checkpoint):
    if request.param == "torch":
        s = open_session("torch", tiny_checkpoint, threads=1)
    else:
        pytest.importorskip("onnxruntime")
        s = open_session("onnxruntime", fp32_export, threads=1)
    assert s.supports_slots
    with s:
        yield s


def test_rows_joining_and_leaving_match_each_prompt_alone(session):
    expected = [alone(session, p) for p in PROMPTS]
    session.open_slots(4)
    got: dict[int, list[np.ndarray]] = {}
    slot_of = {0: 2, 1: 0, 2: 1}  # prompt -> slot; slot 3 stays free, slot 2 is the highest
    start_at = {0: 0, 1: 2, 2: 3}  # prompt -> the step at which it joins
    for t in range(STEPS + 4):
        for p, s in slot_of.items():
            if start_at[p] == t:
                got[p] = [session.prefill_slot(s, PROMPTS[p])]
        running = [p for p in got if len(got[p]) <= STEPS]  # joined and not finished
        if running:
            ids = [int(got[p][-1].argmax()) for p in running]
            logits = session.step_slots([slot_of[p] for p in running], ids)
            for p, row in zip(running, logits, strict=True):
                got[p].append(row)
        for p in running:  # a finished row frees its slot; the others go on
            if len(got[p]) == STEPS + 1:
                session.free_slot(slot_of[p])
    for p in range(len(PROMPTS)):
        assert len(got[p]) == STEPS + 1
        np.testing.assert_allclose(np.stack(got[p]), np.stack(expected[p]), atol=1e-4, rtol=1e-4)
    assert [session.slot_length(s) for s in range(4)] == [0, 0, 0, 0]


def test_a_slot_reused_after_free_forgets_its_old_row(session):
    expected = alone(session, PROMPTS[1])
    session.open_slots(2)
    session.prefill_slot(0, PROMPTS[0])
    session.step_slots([0], [1])
    first = session.prefill_slot(0, PROMPTS[1])  # starts over in the same slot
    np.testing.assert_allclose(first, expected[0], atol=1e-4, rtol=1e-4)
    assert session.slot_length(0) == len(PROMPTS[1])


def test_slot_misuse_is_refused(session):
    with pytest.raises(InputError, match="open_slots"):
        session.prefill_slot(0, [1, 2])
    session.open_slots(2)
    with pytest.raises(InputError, match="does not exist"):
        session.prefill_slot(2, [1, 2])
    with pytest.raises(InputError, match="free slot"):
        session.step_slots([1], [3])
    with pytest.raises(InputError, match="empty"):
        session.prefill_slot(0, [])
    with pytest.raises(InputError, match="context holds"):
        session.prefill_slot(0, [1] * (session.max_context + 1))


def test_a_step_covers_only_the_range_of_the_slots_it_steps(session):
    """Idle slots below and above the stepped ones are not run (no dummy rows) and keep their caches."""
    expected = [alone(session, p) for p in PROMPTS]
    session.open_slots(4)
    for s, p in zip((0, 2, 3), PROMPTS, strict=True):
        session.prefill_slot(s, p)
    calls = []
    step = session._step_slots
    session._step_slots = lambda first, tokens, *rest: calls.append((first, len(tokens))) or step(first, tokens, *rest)
    got = session.step_slots([2], [int(expected[1][0].argmax())])
    np.testing.assert_allclose(got[0], expected[1][1], atol=1e-4, rtol=1e-4)
    assert calls == [(2, 1)]
    got = session.step_slots([3, 0], [int(expected[2][0].argmax()), int(expected[0][0].argmax())])
    np.testing.assert_allclose(got, np.stack([expected[2][1], expected[0][1]]), atol=1e-4, rtol=1e-4)
    assert calls[-1] == (0, 4)
    assert [session.slot_length(s) for s in range(4)] == [
        len(PROMPTS[0]) + 1,
        0,
        len(PROMPTS[1]) + 1,
        len(PROMPTS[2]) + 1,
    ]


def _numpy(arrays):
    return [np.asarray(a) for a in arrays]  # torch's CPU tensors too


def test_a_slot_saved_and_loaded_into_another_goes_on_as_the_first_would(session):
    session.open_slots(2)
    prompt = [5, 17, 3, 99, 42, 7, 11, 2, 250, 31]
    session.prefill_slot(0, prompt)
    saved = session.save_slot(0, 8)
    assert saved.tokens == 8 and saved.nbytes == 8 * session.kv_bytes_per_token
    session.prefill_slot(1, [1, 2, 3])  # whatever it held is dropped
    session.load_slot(1, saved, 8)
    assert session.slot_length(1) == 8
    session.truncate_slot(0, 8)
    for slot in (0, 1):  # both go on with the same tokens: bitwise the same logits
        session.append_slot(slot, prompt[8:])
    np.testing.assert_array_equal(*session.extend_slots([0, 1], [[64, 8], [64, 8]]))
    with pytest.raises(InputError, match="cannot fill"):
        session.load_slot(1, saved, 9)
    with pytest.raises(InputError, match="cannot save"):
        session.save_slot(1, session.slot_length(1) + 1)


def test_moving_a_run_turns_its_keys_for_the_new_positions_and_keeps_its_values(session):
    from codegen_deploy.runtime.session import move_positions

    session.open_slots(1)
    session.prefill_slot(0, list(range(1, 19)))  # runs of 5, 6 and 7 tokens
    before = session.save_slot(0, 18)
    session.move_slot_tokens(0, 11, 5, 7)  # the third run where the second was (the runs overlap)
    after = session.save_slot(0, 18)
    rotary = session.config.rotary_dim
    for old, new in zip(_numpy(before.keys), _numpy(after.keys), strict=True):
        np.testing.assert_array_equal(new[:, 5:12], move_positions(old[:, 11:18], -6, rotary))
        np.testing.assert_array_equal(new[:, :5], old[:, :5])  # what comes before stays
    for old, new in zip(_numpy(before.values), _numpy(after.values), strict=True):
        np.testing.assert_array_equal(new[:, 5:12], old[:, 11:18])
    assert session.slot_length(0) == 18  # cut by the caller
    with pytest.raises(InputError, match="earlier positions"):
        session.move_slot_tokens(0, 2, 4, 3)  # to later positions
    with pytest.raises(InputError, match="earlier positions"):
        session.move_slot_tokens(0, 12, 0, 7)  # beyond what the slot holds


@pytest.mark.parametrize("split", [None, 3])
def test_score_slot_gives_the_reference_logits_at_every_position(session, tiny_model, split):
    """score_slot returns the logits after each token, equal to the reference's over the whole sequence, whether
    the sequence is read at once or after a cached part."""
    import torch

    ids = [5, 17, 3, 99, 42, 7, 250, 31]
    with torch.no_grad():
        expected = tiny_model(torch.tensor([ids]))[0][0].numpy()  # [T, V]
    session.open_slots(2)
    if split is None:
        got = session.score_slot(1, ids)
    else:
        got = np.concatenate([session.score_slot(1, ids[:split]), session.score_slot(1, ids[split:])])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert session.slot_length(1) == len(ids)
    np.testing.assert_allclose(session.score_slot(0, ids[:1])[0], expected[0], atol=1e-4, rtol=1e-4)
