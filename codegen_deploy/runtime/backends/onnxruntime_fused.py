"""ONNX Runtime over the fused decoder graph (build/fused.py): the cache is written in place.

Each layer's key and value cache is one preallocated [batch, heads, max_context, head_dim] OrtValue,
bound as both the graph's past input and its present output, so GroupQueryAttention appends the new
token's key/value where it belongs and a step copies nothing that grows with the context. Every input
and output is bound once to a numpy-backed OrtValue; a step updates those arrays in place and runs.

Left padding: GQA keeps each row's tokens at the start of its buffer (row b: [0, seqlens_k[b] + 1)),
with rotary positions counted from there. prefill() moves each left-padded row to the left edge
(right padding), so every row computes exactly what it would alone, and tracks each row's length.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...artifacts import io_spec
from ...config import ModelConfig
from ...errors import ArtifactError, InputError
from ..session import Session
from .onnxruntime import import_onnxruntime


def _read_config(folder: Path, verify: str) -> ModelConfig:
    """The model config of an export folder: its manifest's (checked: verify "none" | "size" | "sha256"),
    else a config.json next to the graph."""
    from ...artifacts.manifest import manifest_config, read_manifest

    if (folder / io_spec.MANIFEST_FILE).is_file():
        return manifest_config(read_manifest(folder, verify=verify))
    if (folder / "config.json").is_file():
        return ModelConfig.from_file(folder)
    raise ArtifactError(f"{folder} has neither {io_spec.MANIFEST_FILE} nor config.json: export the model again")


class FusedOrtSession(Session):
    """A Session over FUSED_GRAPH_FILE in an export folder (or a path to the .onnx file itself).

    threads: intra-op threads (default: ONNX Runtime's choice); providers: execution providers
    (names or cpu/cuda; default CPU); max_context: cache capacity in tokens (default n_positions);
    max_batch: the most rows allowed (buffers are sized by the first prompt's batch, reallocated when it
    changes).
    session_options: extra onnxruntime.SessionOptions config entries. verify: how to check the
    manifest's files ("none", "size", "sha256"). low_memory: no graph optimisation, priority order, no
    arena: on CPU, ONNX Runtime's constant folding would otherwise keep a float32 copy of every fp16 weight
    (used by the export's check, where speed does not matter).
    """

    name = "onnxruntime-fused"

    def __init__(self, path: str | Path, config: ModelConfig | None = None, threads: int | None = None,
                 providers: list[str] | str | None = None, max_context: int | None = None, max_batch: int | None = None,
                 session_options: dict[str, str] | None = None, verify: str = "size",
                 low_memory: bool = False):  # fmt: skip
        ort = import_onnxruntime()
        path = Path(path)
        graph = path / io_spec.FUSED_GRAPH_FILE if path.is_dir() else path
        if not graph.is_file():
            raise ArtifactError(
                f"no fused graph at {graph}: export with the fused graph (export.optimize.write_fused_graph)"
            )
        config = config or _read_config(graph.parent, verify)
        super().__init__(config, max_context=max_context, max_batch=max_batch)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if low_memory:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            options.enable_cpu_mem_arena = False
        for key, value in (session_options or {}).items():
            options.add_session_config_entry(key, value)
        if providers:
            from .onnxruntime import choose_providers

            self.providers = choose_providers(providers)
        else:
            self.providers = ["CPUExecutionProvider"]  # GQA's CPU kernel is the one this graph was checked on
        self._ort = ort
        self._session = ort.InferenceSession(os.fspath(graph), options, providers=self.providers)
        graph_context = self._session.get_modelmeta().custom_metadata_map.get("max_context")
        if graph_context:  # the graph's rotary tables end there
            self.max_context = min(self.max_context, int(graph_context))
        cache_type = next(i.type for i in self._session.get_inputs() if i.name == io_spec.past_name(0, "key"))
        self.cache_dtype = np.float16 if "float16" in cache_type else np.float32
        self._names = io_spec.past_names(config.n_layer)
        self._present = io_spec.present_names(config.n_layer)
        self._binding = self._session.io_binding()
        self._rows = 0
        self._bound_ids = None  # the OrtValue bound as input_ids
        self._lengths: np.ndarray | None = None  # [B] real tokens in each row's cache

    # -- buffers -------------------------------------------------------------------------------------------

    def _allocate(self, rows: int) -> None:
        """(Re)allocate the cache buffers and the small step buffers for `rows` rows; bind them."""
        c = self.config
        ort = self._ort
        # np.zeros maps untouched pages lazily: memory grows with the filled part, not max_context.
        shape = (rows, c.n_head, self.max_context, c.head_dim)
        self._cache = [np.zeros(shape, self.cache_dtype) for _ in self._names]
        self._cache_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._cache]
        self._seqlens = np.zeros(rows, np.int32)
        self._total = np.zeros((), np.int32)
        self._step_ids = np.zeros((rows, 1), np.int64)
        self._step_ids_value = ort.OrtValue.ortvalue_from_numpy(self._step_ids)
        self._logits = np.zeros((rows, c.vocab_size), np.float32)
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for past, present, value in zip(self._names, self._present, self._cache_values, strict=True):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)  # the same buffer: GQA writes the new positions in place
        b.bind_ortvalue_input(io_spec.SEQLENS_K, ort.OrtValue.ortvalue_from_numpy(self._seqlens))
        b.bind_ortvalue_input(io_spec.TOTAL_SEQUENCE_LENGTH, ort.OrtValue.ortvalue_from_numpy(self._total))
        b.bind_ortvalue_output(io_spec.LOGITS, ort.OrtValue.ortvalue_from_numpy(self._logits))
        self._rows = rows

    def cache_buffer(self, layer: int, kind: str) -> np.ndarray:
        """The numpy array behind one layer's bound cache (for inspection and tests)."""
        return self._cache[io_spec.KV_KINDS.index(kind) + 2 * layer]

    # -- Session -------------------------------------------------------------------------------------------

    def _run(self, input_ids) -> np.ndarray:
        """Bind `input_ids` (an OrtValue) unless it is bound already, run, return a copy of the logits."""
        if input_ids is not self._bound_ids:
            self._binding.bind_ortvalue_input(io_spec.INPUT_IDS, input_ids)
            self._bound_ids = input_ids
        self._session.run_with_iobinding(self._binding)
        return self._logits.copy()

    def _prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        b, t = input_ids.shape
        lengths = attention_mask.sum(axis=1)
        expected = np.arange(t)[None, :] >= (t - lengths)[:, None]  # left padding only
        if not np.array_equal(attention_mask.astype(bool), expected):
            raise InputError("the fused ONNX Runtime session takes left padding only (mask 0...0 1...1 per row)")
        if b != self._rows:
            self._allocate(b)
        # GQA's layout: each row's tokens start at index 0 (right padding), so move them there.
        ids = np.zeros_like(input_ids)
        for row in range(b):
            ids[row, : lengths[row]] = input_ids[row, t - lengths[row] :]
        self._seqlens[:] = lengths - 1
        self._total[...] = t
        self._lengths = lengths.astype(np.int64)
        return self._run(self._ort.OrtValue.ortvalue_from_numpy(ids))

    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self._step_ids[:] = input_ids
        self._seqlens[:] = self._lengths  # the new token goes at index `length` of each row
        self._lengths += 1
        self._total[...] = self._lengths.max()
        return self._run(self._step_ids_value)  # bound once after a prefill, then reused every step

    def close(self) -> None:
        self._binding = None
        self._session = None
        self._cache = []
        self._cache_values = []
