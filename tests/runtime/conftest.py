"""Slot sessions for the row-slot tests (chunks, truncation, multi-token runs, speculation): every slot backend
over a random model of each shape and dtype."""

from __future__ import annotations

import json

import pytest
import torch

from codegen_deploy.config import ModelConfig
from codegen_deploy.export.fused import fused_support, write_fused_graph
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.runtime.backends.torch import TorchSession
from codegen_deploy.runtime.speculate import Acceptance, DraftModel
from tests.conftest import TEST_CONFIGS

# odd-head: head_dim 20, which GroupQueryAttention refuses (torch only); wide: head_dim 256 as in 6B and 16B.
SLOT_CONFIGS = {
    "tiny": TEST_CONFIGS["tiny"],
    "odd-head": TEST_CONFIGS["odd-head"],
    "wide": ModelConfig(n_layer=2, n_embd=512, n_head=2, rotary_dim=64, n_positions=96, n_inner=128, vocab_size=300),
}


def slot_cases() -> list:
    """pytest params (shape, dtype, backend): torch on every shape, the fused graph where GQA runs it."""
    cases = []
    for name, config in SLOT_CONFIGS.items():
        for dtype in ("float32", "float16"):
            cases.append(pytest.param((name, dtype, "torch"), id=f"{name}-{dtype}-torch"))
            if fused_support(config) is None:
                cases.append(pytest.param((name, dtype, "fused"), id=f"{name}-{dtype}-fused"))
    return cases


@pytest.fixture(scope="module")
def slot_session(tmp_path_factory):
    """slot_session((shape, dtype, backend), seed) -> (reference model, a session over it, a function that
    opens another session over the same weights). Torch runs on one thread, fastest for tiny shapes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(case, seed: int):
        name, dtype, backend = case
        config = SLOT_CONFIGS[name]
        model = CodeGen.random(config, seed=seed, std=0.1, dtype=getattr(torch, dtype))
        if backend == "torch":
            return model, TorchSession(model), lambda: TorchSession(model)
        pytest.importorskip("onnxruntime")
        from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession

        folder = tmp_path_factory.mktemp(f"slots-{name}-{dtype}")
        write_fused_graph(model, folder)
        (folder / "config.json").write_text(json.dumps(config.to_hf_config()))
        return model, FusedOrtSession(folder, threads=1), lambda: FusedOrtSession(folder, threads=1)

    yield make
    torch.set_num_threads(threads)


class FreeDraft(DraftModel):
    """A draft model priced as free, and trusted from the start (its history: every draft accepted), so that
    it drafts every round it may: what the tests that use it check is exactness, not when drafting pays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trust(self)

    def cost_ratio(self, step_seconds):
        return 0.0

    def catch_up_cost(self, ids, row, step_seconds):
        return 0.0


def trust(drafter):
    """Give `drafter` a history of accepted drafts, so that new rows draft from their first round."""
    for _ in range(20):
        Acceptance(history=drafter.history).update(4, 4)
    return drafter
