"""The fused graph's check: the reference's logits are recorded first (so the reference can be freed before
ONNX Runtime loads a second copy of the weights), then replayed against the fused session by parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts.manifest import FusedGraph
from ..config import ModelConfig
from ..runtime.session import Session
from .parity import compare_sessions
from .tolerance import LOSSY_WEIGHTS, tolerance_for

# Fused-graph check, float weights: two prompts (one shorter, so positions differ) and a few greedy steps;
# the graph computes what the plain graph does, so a few positions show any difference.
# Quantized weights: 4 prompts x 8 steps (32 positions, each with every vocabulary entry), so the spread
# error (tolerance.py) is measured, not sampled.
_FUSED_CHECK_PROMPT_LENGTHS = {"float": (9, 3), "lossy": (9, 3, 14, 6)}
_FUSED_CHECK_NEW_TOKENS = {"float": 4, "lossy": 8}


def _plan(weights: str) -> tuple[tuple[int, ...], int]:
    """(prompt lengths, new tokens) of the fused check of a graph with `weights` ("float", "int8", "int4")."""
    kind = "lossy" if weights in LOSSY_WEIGHTS else "float"
    return _FUSED_CHECK_PROMPT_LENGTHS[kind], _FUSED_CHECK_NEW_TOKENS[kind]


def _fused_check_prompts(config: ModelConfig, weights: str = "float") -> list[list[int]]:
    return [[(7 * i + 3 + 11 * k) % config.vocab_size for i in range(n)] for k, n in enumerate(_plan(weights)[0])]


def record_reference(reference, weights: str = "float") -> list[list]:
    """The reference's logits for the fused check of a graph with `weights`: per prompt, prefill then its own
    greedy steps."""
    from ..runtime.backends.torch import TorchSession

    session, recorded = TorchSession(reference), []
    for ids in _fused_check_prompts(reference.config, weights):
        steps = [session.prefill(np.array([ids]))]
        for _ in range(_plan(weights)[1] - 1):
            steps.append(session.step(steps[-1].argmax(-1)))
        recorded.append(steps)
    return recorded


class RecordedSession(Session):
    """Replays recorded reference logits, so parity can compare them with a live session."""

    name = "torch (recorded)"  # record_reference's TorchSession, replayed

    def __init__(self, config: ModelConfig, recorded: list[list]):
        super().__init__(config)
        self._runs, self._steps = iter(recorded), iter(())

    def _prefill(self, input_ids, attention_mask, position_ids):
        self._steps = iter(next(self._runs))
        return next(self._steps)

    def _step(self, input_ids, attention_mask, position_ids):
        return next(self._steps)


def check_fused(folder: Path, config: ModelConfig, recorded: list[list], entry: dict, progress) -> dict:
    """Compare the fused graph with the recorded reference; raise ValidationError over tolerance."""
    from ..runtime.backends.onnxruntime_fused import FusedOrtSession

    graph = FusedGraph.of(entry)
    weights = graph.lossy
    tolerance = tolerance_for(graph.check_dtype, weights=weights)
    with FusedOrtSession(folder, config=config, max_context=64, low_memory=True) as fused:
        prompts, new_tokens = _fused_check_prompts(config, weights), _plan(weights)[1]
        report = compare_sessions(
            RecordedSession(config, recorded), fused, prompts, new_tokens=new_tokens, tolerance=tolerance
        )
    report.advice = (
        f"the {weights} weights are broken or too lossy for this model: export without --quantize, or with "
        "--no-validate and judge the export with codegen-parity (--max-spread-error, --atol, --rtol)"
        if weights in LOSSY_WEIGHTS
        else "see the report above; export with --no-fused (ONNX Runtime then runs the plain graph) or report a bug"
    )
    progress(report.table())
    report.check()
    return report.to_dict()
