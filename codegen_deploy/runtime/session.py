"""The Session interface that every backend implements: token ids in, last-position logits out.

A Session owns its KV cache in the backend's own memory. The generation loop, parity checks and
benchmarks see only this interface, so they work unchanged on every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..dtypes import numpy_dtype
from ..errors import InputError


def piece_size(need: int, offer: int, least: int) -> int:
    """Tokens to read now of a prompt that needs `need` more, offered `offer` (a budget; 0: none): the offer,
    but never a piece of fewer than `least` tokens (Session.min_piece), nor fewer than `least` left for a later
    piece (a prompt shorter than that is read whole), so up to `least` more than the offer."""
    if offer <= 0 or need <= 0:
        return 0
    n = max(min(need, offer), min(least, need))
    return need if need - n < least else n


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading ids `a` and `b` share: how much of a slot's cache another sequence can keep."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return int(np.argmin(np.asarray(a[:n]) == np.asarray(b[:n])))


@dataclass(frozen=True)
class SavedSlot:
    """A copy of the first `tokens` tokens of a slot's cache, held outside the slots (an idle prompt in the
    prompt cache): keys and values per layer, each [heads, tokens, head_dim] in the backend's own arrays."""

    keys: tuple
    values: tuple
    tokens: int

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(a) for a in (*self.keys, *self.values))


def move_positions(keys: np.ndarray, offset: int, rotary_dim: int) -> np.ndarray:
    """Cached keys [..., D] rotated for positions p -> the same keys for positions p + offset (computed in float32,
    returned in keys' dtype). CodeGen's rotary embedding turns each pair (x[2i], x[2i + 1]) of a key's first
    rotary_dim dims by the position's angle, p / 10000^(2i / rotary_dim), and turns compose: one more turn by the
    offset's angle moves a key, exactly up to rounding. int8 keys (a quantized cache whose two channels of a pair
    share one scale, so a turn commutes with the scaling) are rounded back to [-127, 127]."""
    angle = offset / 10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim)  # [R/2], float64
    sin, cos = np.sin(angle).astype(np.float32), np.cos(angle).astype(np.float32)
    turned = keys[..., :rotary_dim].astype(np.float32)
    even, odd = turned[..., 0::2], turned[..., 1::2]  # each [..., R/2]
    out = keys.copy()
    store = (lambda x: np.clip(np.rint(x), -127, 127)) if np.issubdtype(keys.dtype, np.integer) else (lambda x: x)
    out[..., 0:rotary_dim:2] = store(even * cos - odd * sin)
    out[..., 1:rotary_dim:2] = store(odd * cos + even * sin)
    return out


def _nbytes(array) -> int:
    return array.nbytes if isinstance(array, np.ndarray) else array.numel() * array.element_size()  # torch


def _numpy(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.float().cpu().numpy()  # torch (bfloat16, GPU)


def _like(array: np.ndarray, like):
    import torch

    return torch.from_numpy(array).to(like.device, like.dtype)


def _copy(array):
    return array.copy() if isinstance(array, np.ndarray) else array.clone()  # torch


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
        self._slot_lengths: np.ndarray | None = None  # [slots] int64 tokens in each slot's cache (0 = free)

    cache_dtype = None  # the KV cache's numpy dtype (or name), where the backend knows it
    # What the weights compute in ("float32", "float16", "int8", "int4"...; "-kv8" added over an int8 KV cache),
    # if known.
    export_kind: str | None = None
    # The fewest tokens per row in a run whose numbers do not depend on how many tokens the run has: ONNX
    # Runtime's CPU kernels compute a run of one token per row with other code than a run of two or more (the
    # attention's one-row GEMM, MatMulNBits' one-row kernel) and the two round differently; runs of two or more
    # compute each position alike however a prompt is split. A prompt read in pieces of at least this many
    # tokens gets the same logits, keys and values whole, in chunks or after a reused prefix read that way.
    min_piece = 2
    prompt_chunk: int | None = None  # the piece size in which this backend reads a long prompt fastest (None: whole)

    @property
    def kv_bytes_per_token(self) -> int | None:
        """Bytes one token's keys and values take in the cache (every layer), None where the dtype is unknown."""
        if self.cache_dtype is None:
            return None
        c = self.config
        return 2 * c.n_layer * c.n_head * c.head_dim * numpy_dtype(self.cache_dtype).itemsize

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

    # -- row slots: independent rows for continuous batching ----------------------------------------------
    #
    # A session with slots holds `rows` cache regions side by side; each slot has its own length (and so
    # its own positions). A slot grows by append_slot() (a prompt, or a chunk of one, after whatever the
    # slot holds) and by step_slots() (one token in each of several slots at once, each at its own
    # length), and shrinks by truncate_slot(), which keeps a prefix of its cache for the next prompt that
    # shares it. Slots are independent of the batch API above (prefill/step), which keeps its own cache.

    supports_slots = False

    def open_slots(self, rows: int) -> None:
        """Allocate `rows` row slots, all free (each slot's cache region is reserved, filled lazily)."""
        if not self.supports_slots:
            raise InputError(f"the {self.name} session has no row slots: run requests with prefill()/step()")
        if int(rows) != rows or rows < 1:
            raise InputError(f"the number of row slots must be a whole number >= 1, got {rows}")
        if self.max_batch is not None and rows > self.max_batch:
            raise InputError(f"{rows} row slots exceed this session's maximum batch {self.max_batch}")
        self._open_slots(int(rows))
        self._slot_lengths = np.zeros(int(rows), np.int64)

    @property
    def slot_count(self) -> int:
        """Row slots opened by open_slots() (0 before)."""
        return 0 if self._slot_lengths is None else len(self._slot_lengths)

    def slot_length(self, slot: int) -> int:
        """Tokens in a slot's cache (0: free)."""
        return int(self._slot_lengths[self._check_slot(slot)])

    def append_slot(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Run tokens `ids` after what `slot` holds (all of a prompt, or a chunk of one); return the logits
        of the last one [vocab].

        Positions continue from the slot's length, so a prompt appended in chunks computes what it computes
        in one piece. The other slots keep their caches. A failed append leaves the slot as it was.
        """
        return self._append(slot, ids, every=False)

    def score_slot(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """append_slot() that returns the logits after every one of `ids` [T, vocab] (row j: the distribution
        of the token after ids[j]): what perplexity and a prompt's log-probabilities need."""
        return self._append(slot, ids, every=True)

    def _append(self, slot: int, ids: Sequence[int], every: bool) -> np.ndarray:
        slot = self._check_slot(slot)
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # [1, T]
        start = int(self._slot_lengths[slot])
        if ids.shape[1] == 0:
            raise InputError("the prompt is empty: give at least one token")
        if start + ids.shape[1] > self.max_context:
            raise InputError(
                f"the prompt has {start + ids.shape[1]} tokens but the context holds {self.max_context}: "
                "shorten the prompt"
            )
        if every and ids.shape[1] > 1 and not self.multi_token_steps:
            raise InputError(
                f"this {self.name} session returns the last position's logits only (a fused graph exported "
                "before multi-token steps): export it again with codegen-export"
            )
        logits = self._append_slot(slot, start, ids, ids.shape[1] if every else 1)
        self._slot_lengths[slot] = start + ids.shape[1]
        return logits if every else logits[-1]

    def truncate_slot(self, slot: int, length: int) -> None:
        """Keep the first `length` tokens of a slot's cache (0 frees the slot); what follows is overwritten
        by the next append or step."""
        slot = self._check_slot(slot)
        if int(length) != length or not 0 <= length <= self._slot_lengths[slot]:
            raise InputError(f"slot {slot} holds {self._slot_lengths[slot]} tokens: cannot keep {length}")
        self._slot_lengths[slot] = int(length)

    def prefill_slot(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Start a sequence in `slot` (whatever it held is dropped): run its prompt; return logits [vocab]."""
        self.truncate_slot(slot, 0)
        return self.append_slot(slot, ids)

    def free_slot(self, slot: int) -> None:
        """Mark a slot free; its cache region is reused by the next append."""
        self.truncate_slot(slot, 0)

    def step_slots(self, slots: Sequence[int], ids: Sequence[int]) -> np.ndarray:
        """Append one token to each listed slot, each after its own cache; return logits [len(slots), vocab].

        Slots not listed keep their cache, except that one filled to max_context loses its last token (the
        step writes a placeholder just past each slot's length). The step runs over the slots
        min(slots)..max(slots), so keeping the busy slots together keeps the step small.
        """
        return self.extend_slots(slots, np.asarray(ids, dtype=np.int64).reshape(-1, 1))[:, 0]

    # Backends whose slot steps take several tokens per slot (extend_slots with k > 1).
    multi_token_steps = True

    def extend_slots(self, slots: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """Append k tokens to each listed slot (ids [len(slots), k]), each after its own cache, in one run;
        return the logits at every appended position [len(slots), k, vocab] (position j: the logits after
        the slot's cache and ids[:, :j + 1]).

        What a speculative step needs: the token it knows and k - 1 drafted ones go in at once, and
        truncate_slot() drops the drafts the model does not agree with. Slots not listed keep their cache,
        except that one filled beyond max_context - k loses its last tokens (the run writes placeholders just
        past each slot's length).
        """
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or len(slots) == 0 or ids.shape[0] != len(slots) or len(np.unique(slots)) != len(slots):
            raise InputError("extend_slots() takes ids [slots, k] for one or more distinct slots")
        k = ids.shape[1]
        if k < 1:
            raise InputError("extend_slots() takes at least one token per slot")
        if k > 1 and not self.multi_token_steps:
            raise InputError(
                f"this {self.name} session runs one token per slot step (a fused graph exported before "
                "multi-token steps): export it again with codegen-export"
            )
        for s in slots.tolist():
            self._check_slot(s)
        lengths = self._slot_lengths[slots]
        if (lengths == 0).any():
            raise InputError("step_slots() on a free slot: run append_slot() first")
        if (lengths + k > self.max_context).any():
            raise InputError(f"the context is full ({self.max_context} tokens): generate fewer new tokens")
        first, n = int(slots.min()), int(slots.max() - slots.min()) + 1
        rows = slots - first  # positions in the stepped range
        tokens = np.zeros((n, k), np.int64)
        tokens[rows] = ids
        active = np.zeros(n, bool)
        active[rows] = True
        span = self._slot_lengths[first : first + n]  # a view
        logits = self._step_slots(first, tokens, span.copy(), active)  # [n, k, V]
        span[~active & (span > self.max_context - k)] = self.max_context - k  # placeholders overwrote the rest
        self._slot_lengths[slots] += k
        return logits[rows]

    # -- a slot's cache moved: saved out of a slot and loaded into another (the prompt cache), or a run of it
    # moved to other positions (chunks reused where they moved) -------------------------------------------

    def save_slot(self, slot: int, length: int) -> SavedSlot:
        """A copy of the first `length` tokens of a slot's cache (the slot keeps its own)."""
        slot = self._check_slot(slot)
        if int(length) != length or not 0 < length <= self._slot_lengths[slot]:
            raise InputError(f"slot {slot} holds {self._slot_lengths[slot]} tokens: cannot save {length}")
        keys, values = self._slot_parts(slot)
        return SavedSlot(
            tuple(_copy(k[:, :length]) for k in keys), tuple(_copy(v[:, :length]) for v in values), int(length)
        )

    def load_slot(self, slot: int, saved: SavedSlot, length: int) -> None:
        """Make `slot` hold the first `length` tokens of `saved` (whatever it held is dropped)."""
        slot = self._check_slot(slot)
        if int(length) != length or not 0 < length <= min(saved.tokens, self.max_context):
            raise InputError(f"a saved cache of {saved.tokens} tokens cannot fill {length} of slot {slot}")
        keys, values = self._slot_parts(slot)
        for into, part in zip((*keys, *values), (*saved.keys, *saved.values), strict=True):
            into[:, :length] = part[:, :length]
        self._slot_lengths[slot] = int(length)

    def move_slot_tokens(self, slot: int, source: int, target: int, count: int) -> None:
        """Move the `count` tokens a slot's cache holds at positions source.. to positions target.. (target <=
        source: a run reused after what was before it shrank), their keys turned for the new positions
        (model.reference.move_positions). The slot's length stays: cut it with truncate_slot() when done.

        Approximate where the text before the run changed: its keys and values were computed after the old
        text. Exact (up to rounding) for the rotation itself."""
        slot = self._check_slot(slot)
        if not (0 <= target <= source and count > 0 and source + count <= self._slot_lengths[slot]):
            raise InputError(
                f"cannot move {count} tokens of slot {slot} ({self._slot_lengths[slot]} tokens) from {source} to "
                f"{target}: only runs inside the slot, to earlier positions"
            )
        keys, values = self._slot_parts(slot)
        run, to = slice(source, source + count), slice(target, target + count)
        for k in keys:
            turned = move_positions(_numpy(k[:, run]), target - source, self.config.rotary_dim)  # [H, count, D]
            k[:, to] = turned if isinstance(k, np.ndarray) else _like(turned, k)
        for v in values:
            v[:, to] = _copy(v[:, run])  # a copy: the two runs may overlap

    saves_slots = False  # whether save_slot(), load_slot() and move_slot_tokens() work (_slot_parts)

    def _slot_parts(self, slot: int) -> tuple[list, list]:
        """One slot's keys and values, per layer: views [heads, max_context, head_dim] of the slot cache that
        can be read and written (numpy or torch)."""
        raise InputError(f"the {self.name} session cannot save or move a slot's cache")

    def _check_slot(self, slot: int) -> int:
        if self.slot_count == 0:
            raise InputError("no row slots: call open_slots(rows) first")
        if int(slot) != slot or not 0 <= slot < self.slot_count:
            raise InputError(f"slot {slot} does not exist: this session has slots 0..{self.slot_count - 1}")
        return int(slot)

    def _open_slots(self, rows: int) -> None:
        """Allocate the slots' cache (backends with supports_slots = True implement the three slot methods)."""
        raise NotImplementedError

    def _append_slot(self, slot: int, start: int, input_ids: np.ndarray, keep: int) -> np.ndarray:
        """Run input_ids [1, T] at positions start..start+T-1 of `slot`, after its first `start` cached
        tokens; write their keys and values there; return the last `keep` positions' logits [keep, vocab]
        float32."""
        raise NotImplementedError

    def _step_slots(self, first: int, tokens: np.ndarray, lengths: np.ndarray, active: np.ndarray) -> np.ndarray:
        """k tokens per slot first..first+n-1 (tokens [n, k]) written at indexes lengths[i]..lengths[i]+k-1 of
        slot first + i; return logits at each [n, k, vocab] (it may be a buffer the next step overwrites:
        extend_slots() copies out the rows it returns).

        Only rows with active[i] count: the others (free slots, or slots not stepped now) may be run as
        dummies writing at min(lengths[i], max_context - k), but must keep the cache below that.
        """
        raise NotImplementedError

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
