"""The Session interface that every backend implements: token ids in, last-position logits out.

A Session owns its KV cache in the backend's own memory. The generation loop, parity checks and
benchmarks see only this interface, so they work unchanged on every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..config import ModelConfig
from ..errors import InputError


class Session(ABC):
    """One model instance with one KV cache for a batch of rows.

    Subclasses implement `_prefill` and `_step`; this class keeps the attention mask and position
    ids, which are the same bookkeeping on every backend, and checks inputs.
    """

    name = "abstract"

    def __init__(self, config: ModelConfig, max_context: int | None = None, max_batch: int | None = None):
        self.config = config
        self.max_context = min(max_context or config.n_positions, config.n_positions)
        self.max_batch = max_batch
        self._mask_buffer: np.ndarray | None = None  # [B, max_context] int64; the first `length` columns are used
        self._length = 0
        self._next_position: np.ndarray | None = None  # [B, 1] int64

    @property
    def length(self) -> int:
        """Tokens in the cache (past + the last input), padding included."""
        return self._length

    @property
    def attention_mask(self) -> np.ndarray | None:
        """The mask of everything in the cache, [B, length] (a view: a step writes one column, copies nothing)."""
        return None if self._mask_buffer is None else self._mask_buffer[:, : self._length]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Start a new sequence: run the prompt [B, T] (left-padded, mask 0 on padding); return logits [B, vocab].

        Position ids count real tokens only, so a left-padded row sees the same positions as alone.
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise InputError("the prompt is empty: give at least one token")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}")
        if not attention_mask[:, -1].all():
            raise InputError("padding must be on the left: every row's last token must be real")
        if t > self.max_context:
            raise InputError(f"the prompt has {t} tokens but the context holds {self.max_context}: shorten the prompt")
        if self.max_batch is not None and b > self.max_batch:
            raise InputError(f"batch {b} exceeds this session's maximum {self.max_batch}: send fewer prompts")
        position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)  # [B, T]
        self._mask_buffer = np.zeros((b, self.max_context), np.int64)
        self._mask_buffer[:, :t] = attention_mask
        self._length = t
        self._next_position = position_ids[:, -1:] + 1  # [B, 1]
        return self._prefill(input_ids, attention_mask, position_ids)

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """Append one token per row [B] or [B, 1] to the cache; return logits [B, vocab]."""
        if self._mask_buffer is None:
            raise InputError("step() before prefill(): run the prompt first")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64).reshape(-1, 1)  # [B, 1]
        if input_ids.shape[0] != self._mask_buffer.shape[0]:
            raise InputError(f"step() got {input_ids.shape[0]} rows, the prompt had {self._mask_buffer.shape[0]}")
        if self.length >= self.max_context:
            raise InputError(f"the context is full ({self.max_context} tokens): generate fewer new tokens")
        self._mask_buffer[:, self._length] = 1
        self._length += 1
        position_ids = self._next_position
        self._next_position = position_ids + 1
        return self._step(input_ids, self.attention_mask, position_ids)

    @abstractmethod
    def _prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Reset the cache, run the prompt, keep its cache; return the last position's logits [B, vocab] float32."""

    @abstractmethod
    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run one token per row after the cache ([B, 1] ids and positions, mask [B, total]); return [B, vocab]."""

    def close(self) -> None:
        """Free the backend's memory (device buffers, sessions)."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
