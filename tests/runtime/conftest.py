"""Fixtures for runtime tests: a scripted Session that plays back chosen tokens, and tiny checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from codegen_deploy.config import ModelConfig
from codegen_deploy.runtime.session import Session


class ScriptedSession(Session):
    """A Session whose greedy output is fixed: row i emits scripts[i][0], scripts[i][1], ...

    Logits are one-hot (10 at the scripted id), so the loop's stopping and decoding logic is tested
    on exactly chosen tokens (multi-byte characters split across tokens, stop strings, eos).
    Records every id fed to it in `fed`.
    """

    name = "scripted"

    def __init__(self, scripts: list[list[int]], vocab_size: int, n_positions: int = 512):
        config = ModelConfig(n_layer=1, n_embd=8, n_head=2, rotary_dim=2, n_positions=n_positions, n_inner=8,
                             vocab_size=vocab_size)  # fmt: skip
        super().__init__(config)
        self.scripts = scripts
        self.fed: list[np.ndarray] = []

    def _logits(self) -> np.ndarray:
        out = np.zeros((len(self.scripts), self.config.vocab_size), np.float32)
        for i, s in enumerate(self.scripts):
            out[i, s[min(self.n, len(s) - 1)]] = 10.0
        return out

    def _prefill(self, input_ids, attention_mask, position_ids):
        assert input_ids.shape[0] == len(self.scripts)
        self.n = 0
        self.fed = [input_ids]
        return self._logits()

    def _step(self, input_ids, attention_mask, position_ids):
        self.n += 1
        self.fed.append(input_ids)
        return self._logits()


@pytest.fixture
def scripted_session():
    """ScriptedSession(scripts, vocab_size) constructor."""
    return ScriptedSession


@pytest.fixture(scope="session")
def real_tokenizer(real_tokenizer_dir):
    from codegen_deploy.tokenizer import load_tokenizer

    return load_tokenizer(real_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from codegen_deploy.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from codegen_deploy.reference.model import CodeGen

    return CodeGen.from_pretrained(tiny_checkpoint)
