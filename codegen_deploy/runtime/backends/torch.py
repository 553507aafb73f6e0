"""The PyTorch backend: the reference CodeGen with a static, preallocated KV cache (gpt-fast style).

The reference model's forward grows its cache with torch.cat, which copies the whole cache on every
step. Here each layer owns one [B, H, capacity, D] key and value buffer (capacity doubles when full);
new keys and values are written in place and attention reads a view of the filled part. The math
is the reference's own (its projections, rotary, float32 islands and mask), so logits match
CodeGen.forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...dtypes import dtype_name
from ...errors import CheckpointError
from ...memory import lazy_zeros
from ..session import Session


def _checkpoint_of_export(folder: Path) -> str | None:
    """The source checkpoint an export folder's manifest records, if it records one that still exists."""
    from ...artifacts.io_spec import MANIFEST_FILE
    from ...artifacts.manifest import read_manifest

    if not (folder / MANIFEST_FILE).is_file():
        return None
    source = read_manifest(folder, verify="none").get("source")  # a checkpoint folder or a hub id
    if isinstance(source, str) and (Path(source).is_dir() or "/" in source):
        return source
    return None


def resolve_checkpoint(path: str | Path) -> str | Path:
    """A checkpoint folder or hub id as given; for an export folder, the checkpoint its manifest records."""
    folder = Path(path)
    if not folder.is_dir():
        return path  # a hub id
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        source = _checkpoint_of_export(folder)
        if source is None:
            raise CheckpointError(
                f"{folder} holds no PyTorch weights: the torch backend needs the checkpoint the export was made "
                "from (pass it with --reference CHECKPOINT)"
            )
        return source
    return path


class TorchSession(Session):
    """A Session over the reference CodeGen in PyTorch.

    `model` is a CodeGen already loaded, a checkpoint folder, a hub id, or an export folder whose
    manifest records its checkpoint. dtype: torch dtype for loading (ignored for a loaded model).
    threads: torch's intra-op thread count (a process-wide setting in PyTorch).
    """

    name = "torch"
    # PyTorch's float32 CPU matmul rounds runs of fewer than 16 rows otherwise than longer ones (measured: pieces
    # of 2 to 8 tokens differ in the last bits from the prompt read whole; 16 and more do not).
    min_piece = 16
    supports_slots = True

    def __init__(
        self,
        model,
        dtype=None,
        threads: int | None = None,
        max_context: int | None = None,
        max_batch: int | None = None,
        device: str | None = None,
    ):
        import torch

        from ...model.reference import CodeGen
        from ...model.weights import load_checkpoint

        if threads:
            torch.set_num_threads(int(threads))
        if not isinstance(model, CodeGen):
            model = load_checkpoint(resolve_checkpoint(model), dtype=dtype or torch.float32)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = model.wte.weight.device
        self.cache_dtype = self.export_kind = dtype_name(model.dtype)
        super().__init__(model.config, max_context=max_context, max_batch=max_batch)
        self._keys: list = []  # per layer [B, H, capacity, D]
        self._values: list = []

    def _reserve(self, batch: int, total: int) -> None:
        """Make the cache hold `total` tokens of `batch` rows.

        Capacity doubles when it runs out (capped at max_context), so a long generation reallocates
        a handful of times instead of copying the cache on every step, and a short one never holds
        a max_context-sized cache.
        """
        import torch

        capacity = self._keys[0].shape[2] if self._keys else 0
        if self._keys and self._keys[0].shape[0] == batch and total <= capacity:
            return
        if not self._keys or self._keys[0].shape[0] != batch:
            capacity, old = 0, None
        else:
            old = (self._keys, self._values)
        new_capacity = min(self.max_context, max(total, 2 * capacity, 256))
        c = self.model.config
        shape = (batch, c.n_head, new_capacity, c.head_dim)
        kw = {"dtype": self.model.dtype, "device": self.device}
        self._keys = [torch.zeros(shape, **kw) for _ in range(c.n_layer)]
        self._values = [torch.zeros(shape, **kw) for _ in range(c.n_layer)]
        if old is not None:
            for new_buf, old_buf in zip(self._keys + self._values, old[0] + old[1], strict=True):
                new_buf[:, :, :capacity] = old_buf

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run T new tokens after the cached ones, writing their keys and values in place."""
        import torch

        from ...model.reference import attention_bias

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            pos = torch.from_numpy(position_ids).to(self.device)
            b, t = ids.shape
            total = mask.shape[1]
            start = total - t
            self._reserve(b, total)

            def store(layer, k, v):
                k_cache, v_cache = self._keys[layer], self._values[layer]
                k_cache[:, :, start:total] = k
                v_cache[:, :, start:total] = v
                return k_cache[:, :, :total], v_cache[:, :, :total]  # views [B, H, total, D]

            return self._run_layers(ids, pos, attention_bias(mask, t), store)  # bias [B, 1, T, total]

    def _prefill(self, input_ids, attention_mask, position_ids):
        return self._forward(input_ids, attention_mask, position_ids)

    # -- row slots: one [slots, H, max_context, D] buffer per layer and kind, each row at its own length ------

    def _open_slots(self, rows: int) -> None:
        import torch

        c = self.model.config
        shape = (rows, c.n_head, self.max_context, c.head_dim)
        name = dtype_name(self.model.dtype)

        def buffer():
            if self.device.type == "cpu" and name != "bfloat16":  # resident as it fills (numpy has no bfloat16)
                return torch.from_numpy(lazy_zeros(shape, np.dtype(name)))
            return torch.zeros(shape, dtype=self.model.dtype, device=self.device)

        self._slot_keys = [buffer() for _ in range(c.n_layer)]
        self._slot_values = [buffer() for _ in range(c.n_layer)]

    saves_slots = True

    def _slot_parts(self, slot: int) -> tuple[list, list]:
        return [k[slot] for k in self._slot_keys], [v[slot] for v in self._slot_values]  # each [H, max_context, D]

    def _run_layers(self, ids, pos, bias, store, keep: int = 1):
        """The blocks over new tokens ids [B, T] at positions pos [B, T]; store(layer, k, v) writes the new keys
        and values into the cache and returns the (keys, values) to attend over. Returns the logits of the
        last position [B, V], or of the last `keep` positions [B, keep, V] when keep > 1."""
        from ...model.reference import layer_norm_fp32

        m = self.model
        sin, cos = m.rotary_sin[pos], m.rotary_cos[pos]  # [B, T, R/2]
        x = m.wte(ids)  # [B, T, E]
        for layer, block in enumerate(m.blocks):
            h = layer_norm_fp32(block.ln_1, x)
            q, k, v = block.attn.project(h, sin, cos)  # each [B, H, T, D]
            keys, values = store(layer, k, v)
            x = x + block.attn.attend(q, keys, values, bias) + block.mlp(h)
        x = layer_norm_fp32(m.ln_f, x[:, -keep:])
        logits = m.lm_head(x).float().cpu().numpy()  # [B, keep, V]
        return logits[:, -1] if keep == 1 else logits

    def _append_slot(self, slot: int, start: int, input_ids: np.ndarray, keep: int) -> np.ndarray:
        import torch

        from ...model.reference import attention_bias

        total = start + input_ids.shape[1]
        keys = [k[slot : slot + 1] for k in self._slot_keys]  # views [1, H, max_context, D]
        values = [v[slot : slot + 1] for v in self._slot_values]

        def store(layer, k, v):
            keys[layer][:, :, start:total] = k
            values[layer][:, :, start:total] = v
            return keys[layer][:, :, :total], values[layer][:, :, :total]  # views [1, H, total, D]

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            pos = torch.arange(start, total, device=self.device)[None, :]  # [1, T]
            mask = torch.ones((1, total), dtype=torch.int64, device=self.device)
            bias = attention_bias(mask, input_ids.shape[1])  # [1, 1, T, total]: causal after the cache
            return self._run_layers(ids, pos, bias, store, keep=keep).reshape(keep, -1)  # [keep, V]

    def _step_slots(self, first: int, tokens: np.ndarray, lengths: np.ndarray, active: np.ndarray) -> np.ndarray:
        import torch

        n, k = tokens.shape
        at = np.minimum(lengths, self.max_context - k)  # [n]: where each row's k tokens go
        total = int(at[active].max()) + k
        query = at[:, None] + np.arange(k)[None, :]  # [n, k] positions of the new tokens
        rows = np.flatnonzero(active)
        # Active rows see their cache and their new tokens up to each one; the others only column 0 (their
        # output is dropped and they write nothing).
        seen = np.where(active[:, None], query, 0)  # [n, k]
        allowed = np.arange(total)[None, None, :] <= seen[:, :, None]  # [n, k, total]
        slot_rows = torch.from_numpy(rows[:, None] + np.zeros((1, k), np.int64)).to(self.device)  # [m, k]
        slot_pos = torch.from_numpy(query[rows]).to(self.device)  # [m, k]

        def store(layer, kk, vv):
            keys = self._slot_keys[layer][first : first + n]  # views [n, H, max_context, D]
            values = self._slot_values[layer][first : first + n]
            keys[slot_rows, :, slot_pos] = kk[rows].transpose(1, 2)  # [m, k, H, D] at each row's positions
            values[slot_rows, :, slot_pos] = vv[rows].transpose(1, 2)
            return keys[:, :, :total], values[:, :, :total]  # views [n, H, total, D]

        with torch.inference_mode():
            ids = torch.from_numpy(tokens).to(self.device)  # [n, k]
            pos = torch.from_numpy(np.minimum(query, self.max_context - 1)).to(self.device)  # [n, k]
            zero = torch.zeros((), dtype=torch.float32, device=self.device)
            bias = torch.where(torch.from_numpy(allowed)[:, None].to(self.device), zero, torch.finfo(torch.float32).min)
            logits = self._run_layers(ids, pos, bias, store, keep=k)  # [n, V] or [n, k, V]
        return logits if k > 1 else logits[:, None]

    def _step(self, input_ids, attention_mask, position_ids):
        return self._forward(input_ids, attention_mask, position_ids)

    def close(self) -> None:
        self._keys, self._values = [], []
        self._slot_keys, self._slot_values = [], []
