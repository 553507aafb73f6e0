"""The fused graph's check: the reference's logits are recorded first (so the reference can be freed before
ONNX Runtime loads a second copy of the weights), then replayed against the fused session by parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..runtime.session import Session
from .parity import compare_sessions
from .tolerance import tolerance_for

# Fused-graph check: two prompts (one shorter, so positions differ) and a few greedy steps.
_FUSED_CHECK_PROMPT_LENGTHS, _FUSED_CHECK_NEW_TOKENS = (9, 3), 4


def _fused_check_prompts(config: ModelConfig) -> list[list[int]]:
    return [[(7 * i + 3) % config.vocab_size for i in range(n)] for n in _FUSED_CHECK_PROMPT_LENGTHS]


def record_reference(reference) -> list[list]:
    """The reference's logits for the fused check: per prompt, prefill then its own greedy steps."""
    from ..runtime.backends.torch import TorchSession

    session, recorded = TorchSession(reference), []
    for ids in _fused_check_prompts(reference.config):
        steps = [session.prefill(np.array([ids]))]
        for _ in range(_FUSED_CHECK_NEW_TOKENS - 1):
            steps.append(session.step(steps[-1].argmax(-1)))
        recorded.append(steps)
    return recorded


class RecordedSession(Session):
    """Replays recorded reference logits, so parity can compare them with a live session."""

    name = "reference (recorded)"

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

    tolerance = tolerance_for(entry["fused_dtype"], weights=entry["fused_weights"])
    with FusedOrtSession(folder, config=config, max_context=64, low_memory=True) as fused:
        prompts = _fused_check_prompts(config)
        report = compare_sessions(
            RecordedSession(config, recorded), fused, prompts, new_tokens=_FUSED_CHECK_NEW_TOKENS, tolerance=tolerance
        )
    progress(report.table())
    report.check()
    return report.to_dict()
