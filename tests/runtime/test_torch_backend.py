"""The torch backend's static cache reproduces the reference forward, and opening it from paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codegen_deploy.errors import CheckpointError, InputError
from codegen_deploy.runtime.backends import available_backends, open_session
from codegen_deploy.runtime.backends.torch import TorchSession


def _reference_logits(model, ids, mask):
    with torch.inference_mode():
        logits, _ = model(torch.from_numpy(ids), torch.from_numpy(mask))
    return logits.numpy()


def test_prefill_and_steps_match_the_reference_forward(tiny_model):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2000, size=(2, 300)).astype(np.int64)  # 300 > 256: the cache regrows once
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded
    full = _reference_logits(tiny_model.float(), ids[:, :256], mask[:, :256])
    session = TorchSession(tiny_model)
    got = [session.prefill(ids[:, :200], mask[:, :200])]
    got += [session.step(ids[:, t]) for t in range(200, 256)]
    np.testing.assert_allclose(np.stack(got, 1), full[:, 199:256], atol=2e-5, rtol=1e-5)


def test_cache_grows_past_its_first_capacity(tiny_model):
    session = TorchSession(tiny_model)
    ids = np.arange(250, dtype=np.int64)[None] % 2000
    session.prefill(ids[:, :250])
    for t in range(6):
        logits = session.step(np.array([t]))
    assert session._keys[0].shape[2] == 256 and session.length == 256
    expected = _reference_logits(tiny_model, np.concatenate([ids, np.arange(6)[None]], 1), np.ones((1, 256), np.int64))
    np.testing.assert_allclose(logits, expected[:, -1], atol=2e-5, rtol=1e-5)
    with pytest.raises(InputError, match="context is full"):
        session.step(np.array([1]))


def test_open_session_from_checkpoint_and_unknown_backend(tiny_checkpoint):
    assert "torch" in available_backends()
    with open_session("torch", tiny_checkpoint, threads=1) as session:
        assert session.prefill(np.array([[1, 2, 3]])).shape == (1, session.config.vocab_size)
    with pytest.raises(InputError, match="choose one of torch, onnxruntime, tensorrt"):
        open_session("tflite", tiny_checkpoint)


def test_folder_without_weights_names_the_fix(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="--reference"):
        TorchSession(tmp_path)
