"""The reference model equals transformers' CodeGenForCausalLM (the oracle) within 1e-4 in float32."""

from __future__ import annotations

import inspect

import pytest
import torch

from codegen_deploy.config import PUBLISHED_SHAPES
from codegen_deploy.model import CodeGen, load_checkpoint, save_checkpoint
from tests.conftest import TEST_CONFIGS

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle (pip install '.[test]')")

CONFIGS = {**TEST_CONFIGS, "350M": PUBLISHED_SHAPES["350M"]}
ATOL = 1e-4
# transformers 5 renamed past_key_values to cache; older releases know only past_key_values.
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(transformers.CodeGenForCausalLM.forward).parameters else ("past_key_values")
)


def hf_cache_of(output):
    return getattr(output, CACHE_ARG, None)


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=pytest.mark.slow) if name == "350M" else name for name in CONFIGS],
    ids=list(CONFIGS),
)
def pair(request, tmp_path_factory):
    """(ours, transformers') loaded from the same HF-layout checkpoint written by our converter."""
    config = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    # std 0.1 on the small shapes gives logits of several units, so a wrong rotary or mask shows up.
    save_checkpoint(CodeGen.random(config, seed=3, std=0.02 if request.param == "350M" else 0.1), folder)
    ours = load_checkpoint(folder)
    theirs = transformers.CodeGenForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return ours, theirs


def padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Left-padded ids, mask and position ids for rows of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, t - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def test_logits_equal_transformers(pair):
    ours, theirs = pair
    ids, _, _ = padded_batch(ours.config.vocab_size, [9, 9])
    expected = theirs(ids).logits
    got, _ = ours(ids)
    assert got.shape == expected.shape == (2, 9, ours.config.vocab_size)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_and_positions_equal_transformers(pair):
    ours, theirs = pair
    ids, mask, positions = padded_batch(ours.config.vocab_size, [10, 6, 3])
    expected = theirs(ids, attention_mask=mask, position_ids=positions).logits
    got, _ = ours(ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()  # padded query rows are undefined in both
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_steps_equal_transformers_and_uncached(pair):
    ours, theirs = pair
    ids, mask, positions = padded_batch(ours.config.vocab_size, [8, 5], seed=1)
    new = torch.randint(0, ours.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(2))

    _, past = ours(ids, attention_mask=mask, position_ids=positions)
    hf = theirs(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    hf_cache = hf_cache_of(hf)
    full_mask, full_pos = mask, positions
    for step in range(new.shape[1]):
        token = new[:, step : step + 1]
        full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
        pos = full_pos[:, -1:] + 1
        full_pos = torch.cat([full_pos, pos], dim=1)
        got, past = ours(token, attention_mask=full_mask, position_ids=pos, past_key_values=past)
        hf = theirs(token, attention_mask=full_mask, position_ids=pos, use_cache=True, **{CACHE_ARG: hf_cache})
        hf_cache = hf_cache_of(hf)
        torch.testing.assert_close(got, hf.logits, atol=ATOL, rtol=0)

    # The same tokens without a cache: every real position agrees with the cached run's last step.
    all_ids = torch.cat([ids, new], dim=1)
    uncached, _ = ours(all_ids, attention_mask=full_mask, position_ids=full_pos)
    torch.testing.assert_close(got[:, -1], uncached[:, -1], atol=ATOL, rtol=0)
    assert past[0][0].shape == (2, ours.config.n_head, all_ids.shape[1], ours.config.head_dim)


@torch.no_grad()
def test_padded_row_equals_row_alone(pair):
    ours, _ = pair
    ids, mask, positions = padded_batch(ours.config.vocab_size, [7, 4], seed=4)
    batch, _ = ours(ids, attention_mask=mask, position_ids=positions)
    alone, _ = ours(ids[1:, -4:])
    torch.testing.assert_close(batch[1, -4:], alone[0], atol=ATOL, rtol=0)


def test_default_positions_come_from_the_mask():
    model = CodeGen.random(TEST_CONFIGS["tiny"], seed=0, std=0.1)
    ids, mask, positions = padded_batch(model.config.vocab_size, [6, 2])
    with torch.no_grad():
        explicit, _ = model(ids, attention_mask=mask, position_ids=positions)
        derived, _ = model(ids, attention_mask=mask)
    torch.testing.assert_close(explicit, derived, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_float32_logits_and_cache_dtype(dtype):
    model32 = CodeGen.random(TEST_CONFIGS["tiny"], seed=0, std=0.1)
    half = CodeGen.random(TEST_CONFIGS["tiny"], dtype=dtype, seed=0, std=0.1)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model32(ids)
        got, present = half(ids)
    assert got.dtype == torch.float32 and present[0][0].dtype == dtype
    # Same random draws cast to half: logits close, greedy choices mostly the same.
    assert (got - ref).abs().max() < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
