"""The reference side of export validation: a left-padded batch of 2 through the reference model, one prompt
step and several greedy one-token decode steps, each step's inputs and outputs kept as numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..dtypes import to_numpy
from ..model.reference import CodeGen

PROMPT_LENGTHS = (7, 4)  # the second row is left-padded to the first's length
DECODE_STEPS = 4


@dataclass
class _Step:
    """One step's inputs and the reference's outputs, as numpy arrays."""

    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    logits: np.ndarray  # [B, T, V], float32
    present: list[np.ndarray]  # io_spec.present_names order
    real: np.ndarray  # [B, T] bool: which query positions are real tokens (left padding is not)


def reference_steps(model: CodeGen, steps: int = DECODE_STEPS, seed: int = 0) -> list[_Step]:
    """Run the reference on a left-padded batch of 2: one prompt step, then `steps` greedy decode steps."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    length = max(PROMPT_LENGTHS)
    ids = torch.randint(0, config.vocab_size, (len(PROMPT_LENGTHS), length), generator=generator)  # [B, T]
    mask = torch.zeros(len(PROMPT_LENGTHS), length, dtype=torch.int64)  # [B, T]
    for row, n in enumerate(PROMPT_LENGTHS):
        mask[row, length - n :] = 1
    cache, past_len, out = None, 0, []
    with torch.no_grad():
        for _ in range(steps + 1):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # [B, T]
            logits, cache = model(ids, mask, positions, cache)
            present = [t for key_value in cache for t in key_value]
            real = mask[:, past_len:].bool().numpy()
            arrays = (ids.numpy(), mask.numpy(), positions.numpy(), logits.numpy())
            out.append(_Step(*arrays, [to_numpy(t) for t in present], real))
            past_len = mask.shape[1]
            ids = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            mask = torch.cat((mask, torch.ones_like(ids)), dim=1)  # [B, total + 1]
    return out


def free_weights(model: torch.nn.Module) -> None:
    """Free the storage of every parameter and buffer in place; the model is unusable afterwards.

    In place, because the exporter's leftovers (onnxscript's rewriter caches) may still reference the
    parameter objects: `model.to("meta")` would leave their storage alive.
    """
    for t in [*model.parameters(), *model.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype)
