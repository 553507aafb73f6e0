"""The fused ONNX Runtime session against the reference CodeGen: logits, greedy tokens, padding, in-place cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codegen_deploy.config import ModelConfig
from codegen_deploy.errors import InputError
from codegen_deploy.export.fused import write_fused_graph
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession, cuda_unsupported_reason

pytest.importorskip("onnxruntime")

# GQA on CPU needs head_dim % 8 == 0; rotary 8 exercises the padded rotary table, 16 the native one.
FUSED_CONFIGS = {
    "rotary-8": ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=48, n_inner=256, vocab_size=320),
    "rotary-16-gelu": ModelConfig(
        n_layer=2,
        n_embd=64,
        n_head=2,
        rotary_dim=16,
        n_positions=48,
        n_inner=128,
        vocab_size=200,
        activation="gelu",
        layer_norm_epsilon=1e-6,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny reference forwards are fastest on one thread (no thread handoff on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Each config with the rotary inside GQA (the CPU graph) and by plain ops before it (the CUDA graph).
@pytest.fixture(scope="module", params=[(c, r) for c in FUSED_CONFIGS for r in ("gqa", "graph")], ids=str)
def fused(request, tmp_path_factory):
    """(reference model, export folder with the fused graph and a config.json)."""
    name, rotary = request.param
    config = FUSED_CONFIGS[name]
    model = CodeGen.random(config, seed=3, std=0.1)
    folder = tmp_path_factory.mktemp(f"fused-{name}-{rotary}")
    write_fused_graph(model, folder, rotary=rotary)
    (folder / "config.json").write_text(json.dumps(config.to_hf_config()))
    return model, folder


def test_prompt_and_every_step_to_the_full_context_match_the_reference(fused):
    model, folder = fused
    config = model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (1, config.n_positions))
    prompt = 7
    with torch.no_grad():
        full, _ = model(torch.tensor(ids))  # [1, P, V]: position t's logits given tokens 0..t
    with FusedOrtSession(folder, threads=1) as session:
        got = [session.prefill(ids[:, :prompt])]
        for t in range(prompt, config.n_positions):
            got.append(session.step(ids[:, t]))
        with pytest.raises(InputError, match="context is full"):
            session.step(ids[:, 0])
    expected = full[0, prompt - 1 :].numpy()  # [steps, V]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_equal_the_reference(fused):
    model, folder = fused
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, 5))
    ref_ids = ids.copy()
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor(ref_ids))
            ref_ids = np.concatenate([ref_ids, logits[:, -1].argmax(-1, keepdim=True).numpy()], axis=1)
    with FusedOrtSession(folder, threads=1) as session:
        tokens = [int(session.prefill(ids).argmax(-1)[0])]
        for _ in range(11):
            tokens.append(int(session.step(np.array([tokens[-1]])).argmax(-1)[0]))
    assert tokens == ref_ids[0, 5:].tolist()


def test_left_padded_batch_rows_equal_each_row_alone(fused):
    model, folder = fused
    rng = np.random.default_rng(2)
    lengths = [6, 3, 1]
    rows = [rng.integers(0, model.config.vocab_size, n) for n in lengths]
    width = max(lengths)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    steps = rng.integers(0, model.config.vocab_size, (4, len(rows)))
    with FusedOrtSession(folder, threads=1) as session:
        batch = [session.prefill(ids, mask)] + [session.step(s) for s in steps]
    for i, r in enumerate(rows):
        with FusedOrtSession(folder, threads=1) as alone:
            single = [alone.prefill(r[None])] + [alone.step(s[i : i + 1]) for s in steps]
        seq = np.concatenate([r, steps[:, i]])[None]
        with torch.no_grad():
            ref, _ = model(torch.tensor(seq))
        for k, (b, s) in enumerate(zip(batch, single, strict=True)):
            np.testing.assert_allclose(b[i], s[0], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(b[i], ref[0, len(r) - 1 + k].numpy(), atol=1e-4, rtol=1e-4)


def test_cache_is_written_in_place(fused):
    """The bound buffer stays the same memory across steps, and the graph fills it position by position."""
    model, folder = fused
    ids = np.arange(4)[None] % model.config.vocab_size
    with FusedOrtSession(folder, threads=1, max_context=16) as session:
        session.prefill(ids)
        key = session.cache_buffer(0, "key")
        address = key.__array_interface__["data"][0]
        assert key.shape == (1, model.config.n_head, 16, model.config.head_dim)
        assert np.abs(key[:, :, :4]).sum() > 0 and not key[:, :, 4:].any()
        session.step(np.array([1]))
        session.step(np.array([2]))
        key = session.cache_buffer(0, "key")
        assert key.__array_interface__["data"][0] == address
        assert np.abs(key[:, :, 5]).sum() > 0 and not key[:, :, 6:].any()


def test_padding_in_the_middle_is_refused(fused):
    _, folder = fused
    with FusedOrtSession(folder, threads=1) as session, pytest.raises(InputError, match="left padding"):
        session.prefill(np.array([[1, 2, 3]]), np.array([[1, 0, 1]]))


def test_context_is_bounded_by_the_graphs_rotary_tables(tmp_path):
    config = FUSED_CONFIGS["rotary-8"]
    write_fused_graph(CodeGen.random(config, seed=0), tmp_path, max_context=10)
    with FusedOrtSession(tmp_path, config=config, max_context=30) as session:
        assert session.max_context == 10
        with pytest.raises(InputError, match="context holds 10"):
            session.prefill(np.zeros((1, 11), np.int64))


def test_cuda_graphs_need_the_cuda_provider(fused):
    _, folder = fused
    with pytest.raises(InputError, match="CUDA graphs need the CUDA execution provider"):
        FusedOrtSession(folder, cuda_graph=True)


def test_graph_records_where_its_rotary_runs(fused):
    _, folder = fused
    with FusedOrtSession(folder, threads=1) as session:
        assert session.rotary in ("gqa", "graph")
        assert session.device == "cpu"
        assert cuda_unsupported_reason("float16", session.rotary) == (
            None if session.rotary == "graph" else cuda_unsupported_reason("float16", "gqa")
        )


def test_which_fused_graphs_run_on_cuda():
    assert cuda_unsupported_reason("float16", "graph") is None
    assert cuda_unsupported_reason("bfloat16", "graph") is None
    assert "float32" in cuda_unsupported_reason("float32", "graph")
    assert "rotary" in cuda_unsupported_reason("float16", "gqa")


def test_a_prompt_read_in_pieces_equals_the_reference(fused):
    """One row's prompt runs in pieces of prompt_chunk tokens (GQA then skips most of the causal half); its
    logits and the steps after it are the reference's. Batches with padding are read whole."""
    model, folder = fused
    rng = np.random.default_rng(4)
    ids = rng.integers(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        full, _ = model(torch.tensor(ids))  # [1, 30, V]
    with FusedOrtSession(folder, threads=1) as session:
        session.prompt_chunk = 7  # 30 tokens: pieces of 7, 7, 7, 7 and 2
        got = [session.prefill(ids[:, :23])] + [session.step(ids[:, t]) for t in range(23, 30)]
        np.testing.assert_allclose(np.concatenate(got), full[0, 22:].numpy(), atol=1e-4, rtol=1e-4)
        padded = np.zeros((2, 23), np.int64)
        padded[0], padded[1, 10:] = ids[0, :23], ids[0, :13]
        mask = (np.arange(23)[None, :] >= np.array([[0], [10]])).astype(np.int64)
        batch = session.prefill(padded, mask)
        np.testing.assert_allclose(batch, full[0, [22, 12]].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache, itemsize", [("float32", 4), ("float16", 2), ("int8", 1)])
def test_a_saved_prompt_takes_the_bytes_of_its_cache_dtype(tmp_path, cache, itemsize):
    """The prompt cache's budget is in bytes of saved slots: a float16 cache keeps twice the prompts of a float32
    one, an int8 cache four times; a saved slot loads back into another slot bit for bit."""
    config = ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=48, n_inner=128, vocab_size=96)
    write_fused_graph(CodeGen.random(config, seed=1, std=0.1), tmp_path, cache=cache)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, 20).tolist()
    with FusedOrtSession(tmp_path, config=config) as session:
        session.open_slots(2)
        first = session.append_slot(0, prompt)
        saved = session.save_slot(0, len(prompt))
        assert saved.nbytes == len(prompt) * session.kv_bytes_per_token
        assert session.kv_bytes_per_token == 2 * config.n_layer * config.n_embd * itemsize
        session.load_slot(1, saved, len(prompt) - 2)
        again = session.append_slot(1, prompt[-2:])  # runs of min_piece (2) tokens compute alike however split
    np.testing.assert_array_equal(again[-1], first[-1])
