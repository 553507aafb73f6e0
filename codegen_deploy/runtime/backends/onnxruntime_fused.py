"""ONNX Runtime over the fused decoder graph (export/fused.py): the cache is written in place.

Each layer's key and value cache is one preallocated [batch, heads, max_context, head_dim] OrtValue on the
provider's device, bound as both the graph's past input and its present output, so GroupQueryAttention
appends the new token's key/value where it belongs and a step copies nothing that grows with the context.
Every input and output is bound once to a buffer on the device; a step writes the new token ids and
sequence lengths into those buffers (a few bytes) and runs, and only the last position's logits
[batch, vocab] come back to the host. On the CPU provider the buffers are numpy arrays seen in place.

CUDA graphs (cuda_graph=True, CUDA provider): because a step's inputs and outputs keep their shapes and
addresses, ONNX Runtime captures the whole decode step once per batch size (run option gpu_graph_id) and
replays it with one launch; the prompt runs uncaptured (gpu_graph_id -1). total_sequence_length stays a
host scalar: GroupQueryAttention reads it on the CPU, and a replayed step takes each row's length from the
device-resident seqlens_k.

Left padding: GQA keeps each row's tokens at the start of its buffer (row b: [0, seqlens_k[b] + 1)),
with rotary positions counted from there. prefill() moves each left-padded row to the left edge
(right padding), so every row computes exactly what it would alone, and tracks each row's length.

Row slots (continuous batching): one more [slots, heads, max_context, head_dim] buffer per layer and
kind. Since the slot is the outer dimension, a range of slots is one contiguous block that a step binds by
address, without a copy, each row at its own seqlens_k. A slot's first tokens run at batch 1 in a buffer
of their own length, copied into the slot's region; later chunks (the rest of a long prompt, or a prompt
after a reused prefix) run in place on the slot's region, GQA reading the cached positions and writing the
new ones after them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...artifacts import io_spec
from ...config import ModelConfig
from ...errors import ArtifactError, InputError
from ...memory import lazy_zeros
from ..ort import create_session, import_onnxruntime
from ..ort import session_options as _session_options
from ..session import Session, piece_size
from .onnxruntime import choose_providers, device_of

# The fused graph's cache input types (ONNX Runtime's names) and the numpy dtype of the buffers bound to them.
CACHE_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def cuda_unsupported_reason(cache_dtype: str, rotary: str) -> str | None:
    """Why a fused graph cannot run on ONNX Runtime's CUDA provider, or None if it can.

    GroupQueryAttention's CUDA kernel is registered for float16 and bfloat16 only (a float32 graph would
    run it on the CPU, copying the cache every step), and with the rotary inside GQA it gave wrong logits
    for CodeGen's partial interleaved rotary on an H200 (exact on CPU): such graphs need the rotary
    applied by plain ops before GQA (the builder's rotary="graph").
    """
    if cache_dtype not in ("float16", "bfloat16"):
        return f"GroupQueryAttention has no {cache_dtype} CUDA kernel (float16 and bfloat16 only)"
    if rotary != "graph":
        return "its rotary runs inside GroupQueryAttention, whose CUDA kernel gave wrong logits for CodeGen"
    return None


class _Buffer:
    """One bound tensor: an OrtValue on `device`, and a host array that the session writes into (inputs) or
    that receives copies (outputs). On the CPU the OrtValue wraps the host array itself, so nothing is copied."""

    def __init__(self, ort, shape: tuple, dtype, device: str, device_id: int, host: bool = True):
        self.on_device = device != "cpu"
        if self.on_device:
            self.host = np.zeros(shape, dtype) if host else None
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, device_id)
        else:
            # np.zeros maps untouched pages lazily, but numpy asks for 2 MB huge pages on large arrays, so
            # this cache becomes resident in 2 MB steps (the row slots use memory.lazy_zeros, 4 KB steps).
            self.host = np.zeros(shape, dtype)
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)

    def push(self) -> None:
        """Copy the host array into the device buffer (same address: a captured CUDA graph still sees it)."""
        if self.on_device:
            self.value.update_inplace(self.host)

    def pull(self) -> np.ndarray:
        """A host copy of the buffer."""
        return self.value.numpy() if self.on_device else self.host.copy()


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
    (names or cpu/cuda; default CPU); device_id: the GPU of the CUDA provider; tf32: allow TF32 for float32
    MatMul on CUDA; cuda_graph: capture and replay the decode step as a CUDA graph (CUDA provider only);
    max_context: cache capacity in tokens (default n_positions); max_batch: the most rows allowed (buffers
    are sized by the first prompt's batch, reallocated when it changes).
    session_options: extra onnxruntime.SessionOptions config entries. verify: how to check the
    manifest's files ("none", "size", "sha256"). low_memory: no graph optimisation, priority order, no
    arena: on CPU, ONNX Runtime's constant folding would otherwise keep a float32 copy of every fp16 weight
    (used by the export's check, where speed does not matter).
    """

    name = "onnxruntime-fused"
    # GroupQueryAttention's CPU kernel scores a prompt against all of itself, the causal half included, so a
    # long prompt read in pieces of this many tokens (each after the cache of the ones before) does less work:
    # measured on the 350M shape, 2 threads, 1,024 tokens: fp32 3.10 -> 2.57 s, int8 1.52 -> 0.98 s; 2,000
    # tokens: fp32 6.61 -> 5.84 s, int8 3.43 -> 2.48 s (128 and 512 were no better).
    prompt_chunk = 256

    @property
    def supports_slots(self) -> bool:
        """Row slots bind host arrays by address: on the CPU provider (a GPU session serves with the batch API)."""
        return self.device == "cpu"

    def __init__(
        self,
        path: str | Path,
        config: ModelConfig | None = None,
        threads: int | None = None,
        providers: list[str] | str | None = None,
        max_context: int | None = None,
        max_batch: int | None = None,
        session_options: dict[str, str] | None = None,
        verify: str = "size",
        low_memory: bool = False,
        device_id: int = 0,
        tf32: bool = False,
        cuda_graph: bool = False,
    ):
        ort = import_onnxruntime()
        path = Path(path)
        graph = path / io_spec.FUSED_GRAPH_FILE if path.is_dir() else path
        if not graph.is_file():
            raise ArtifactError(
                f"no fused graph at {graph}: export it with codegen-export (which writes the fused graph by default)"
            )
        config = config or _read_config(graph.parent, verify)
        super().__init__(config, max_context=max_context, max_batch=max_batch)
        options = _session_options(ort, threads, session_options, low_memory=low_memory)
        # GQA's CPU kernel is the one every graph variant was checked on: CPU unless asked otherwise.
        self.providers = choose_providers(providers) if providers else ["CPUExecutionProvider"]
        self.device = device_of(self.providers)
        self.device_id = device_id
        if cuda_graph and self.providers[0] != "CUDAExecutionProvider":
            raise InputError("CUDA graphs need the CUDA execution provider: add --providers cuda or drop --cuda-graph")
        self._ort = ort
        provider_kwargs = {"device_id": device_id, "tf32": tf32, "cuda_graph": cuda_graph}
        self._session = create_session(graph, options, self.providers, **provider_kwargs)
        names_in, names_out = (
            [v.name for v in values] for values in (self._session.get_inputs(), self._session.get_outputs())
        )
        io_spec.check_decoder_io(names_in, names_out, config.n_layer, str(graph), fused=True)
        self.multi_token_steps = io_spec.LOGITS_TO_KEEP in names_in  # older graphs: one logits row per row
        self._keep_one = np.ones(1, np.int64)  # logits_to_keep for everything but a multi-token slot step
        meta = self._session.get_modelmeta().custom_metadata_map
        if meta.get(io_spec.FUSED_MAX_CONTEXT_KEY):  # the graph's rotary tables end there
            self.max_context = min(self.max_context, int(meta[io_spec.FUSED_MAX_CONTEXT_KEY]))
        # Graphs written before the rotary variant existed apply it inside GQA.
        self.rotary = meta.get(io_spec.FUSED_ROTARY_KEY, "gqa")
        cache_type = next(i.type for i in self._session.get_inputs() if i.name == io_spec.past_name(0, "key"))
        if cache_type not in CACHE_NUMPY_DTYPES:
            raise ArtifactError(f"{graph} has a {cache_type} cache: the fused session runs float32, float16 and int8")
        self.cache_dtype = CACHE_NUMPY_DTYPES[cache_type]
        weights = meta.get(io_spec.FUSED_WEIGHTS_KEY, "float")
        dtype = meta.get(io_spec.FUSED_DTYPE_KEY, np.dtype(self.cache_dtype).name)  # older graphs: the cache's
        self.export_kind = weights if weights != "float" else dtype
        if self.cache_dtype == np.int8:  # its keys and values rounded too: not the kind plain exports check as
            self.export_kind += "-kv8"
        if self.providers[0] == "CUDAExecutionProvider":
            reason = cuda_unsupported_reason(np.dtype(self.cache_dtype).name, self.rotary)
            if reason:
                raise InputError(
                    f"{graph} cannot run on the CUDA provider: {reason}: rebuild it with "
                    "codegen_deploy.pipeline.add_fused_graph(folder, rotary='graph') from a float16 export, "
                    "or use --graph plain"
                )
        self.cuda_graph = cuda_graph
        self._prefill_options = ort.RunOptions()
        if cuda_graph:
            self._prefill_options.add_run_config_entry("gpu_graph_id", "-1")  # the prompt is never captured
        self._step_options = self._prefill_options
        self._graph_ids = 0  # one CUDA graph per buffer allocation (0 is reserved by ONNX Runtime)
        self._names = io_spec.past_names(config.n_layer)
        self._present = io_spec.present_names(config.n_layer)
        self._binding = self._session.io_binding()
        self._rows = 0
        self._bound_ids = None  # the OrtValue bound as input_ids
        self._lengths: np.ndarray | None = None  # [B] real tokens in each row's cache

    # -- buffers -------------------------------------------------------------------------------------------

    def _allocate(self, rows: int) -> None:
        """(Re)allocate the cache buffers and the small step buffers for `rows` rows on the device; bind them.

        The host arrays _seqlens, _total, _step_ids and _logits are what the session writes and reads;
        _run() copies them to and from the device buffers around each run.
        """
        c = self.config
        ort, device, device_id = self._ort, self.device, self.device_id
        shape = (rows, c.n_head, self.max_context, c.head_dim)
        # On a GPU the cache is not zeroed: GQA reads each row's first seqlens_k + 1 positions only.
        self._cache_buffers = [
            _Buffer(ort, shape, self.cache_dtype, device, device_id, host=False) for _ in self._names
        ]
        self._seqlens_buffer = _Buffer(ort, (rows,), np.int32, device, device_id)
        self._step_ids_buffer = _Buffer(ort, (rows, 1), np.int64, device, device_id)
        self._logits_buffer = _Buffer(ort, (rows, c.vocab_size), np.float32, device, device_id)
        # total_sequence_length is a host scalar on every provider (GQA's CUDA kernel reads it on the CPU).
        self._total_buffer = _Buffer(ort, (), np.int32, "cpu", 0)
        self._seqlens, self._total = self._seqlens_buffer.host, self._total_buffer.host
        self._step_ids, self._logits = self._step_ids_buffer.host, self._logits_buffer.host
        self._step_ids_value = self._step_ids_buffer.value
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for past, present, cache in zip(self._names, self._present, self._cache_buffers, strict=True):
            b.bind_ortvalue_input(past, cache.value)
            b.bind_ortvalue_output(present, cache.value)  # the same buffer: GQA writes the new positions in place
        b.bind_ortvalue_input(io_spec.SEQLENS_K, self._seqlens_buffer.value)
        b.bind_ortvalue_input(io_spec.TOTAL_SEQUENCE_LENGTH, self._total_buffer.value)
        if self.multi_token_steps:  # read on the CPU, like total_sequence_length (TopK's k)
            b.bind_ortvalue_input(io_spec.LOGITS_TO_KEEP, self._ort.OrtValue.ortvalue_from_numpy(self._keep_one))
        b.bind_ortvalue_output(io_spec.LOGITS, self._logits_buffer.value)
        self._bound_ids = None
        self._rows = rows
        if self.cuda_graph:  # new buffer addresses: a graph captured over the old ones must never replay
            self._graph_ids += 1
            self._step_options = self._ort.RunOptions()
            self._step_options.add_run_config_entry("gpu_graph_id", str(self._graph_ids))

    def cache_buffer(self, layer: int, kind: str) -> np.ndarray:
        """One layer's bound cache as numpy (for inspection and tests): the array itself on the CPU provider,
        a copy from a GPU."""
        buffer = self._cache_buffers[io_spec.KV_KINDS.index(kind) + 2 * layer]
        return buffer.host if not buffer.on_device else buffer.pull()

    # -- row slots -----------------------------------------------------------------------------------------

    def _open_slots(self, rows: int) -> None:
        c = self.config
        shape = (rows, c.n_head, self.max_context, c.head_dim)
        self._slot_cache = [lazy_zeros(shape, self.cache_dtype) for _ in self._names]  # resident as filled
        self._slot_seqlens = np.zeros(rows, np.int32)
        self._slot_total = np.zeros((), np.int32)
        self._slot_step_buffers: dict[int, tuple] = {}  # k -> ids [rows, k], logits [rows * k, V], keep [1]
        self._slot_step_bindings: dict[tuple[int, int, int], object] = {}  # (first, n, k) -> its binding

    saves_slots = True

    def _slot_parts(self, slot: int) -> tuple[list, list]:
        parts = [cache[slot] for cache in self._slot_cache]  # each [H, max_context, D]
        at = io_spec.KV_KINDS.index("key")
        return parts[at::2], parts[1 - at :: 2]

    def _bind_slots(
        self,
        binding,
        caches: list[np.ndarray],
        seqlens: np.ndarray,
        logits: np.ndarray,
        ids: np.ndarray | None = None,
        keep: np.ndarray | None = None,
    ) -> None:
        """Bind caches (each bound as past and present), seqlens_k, the total length, logits, logits_to_keep
        (default 1; graphs without it get none) and optionally the step's input ids, by address: the arrays
        (views of contiguous rows) are used without a copy."""

        def bind(name: str, array: np.ndarray, output: bool = False) -> None:
            args = (name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
            (binding.bind_output if output else binding.bind_input)(*args)

        for past, present, cache in zip(self._names, self._present, caches, strict=True):
            bind(past, cache)
            bind(present, cache, output=True)  # the same memory: GQA writes the new positions in place
        bind(io_spec.SEQLENS_K, seqlens)
        bind(io_spec.TOTAL_SEQUENCE_LENGTH, self._slot_total)
        bind(io_spec.LOGITS, logits, output=True)
        if ids is not None:
            bind(io_spec.INPUT_IDS, ids)
        if self.multi_token_steps:
            bind(io_spec.LOGITS_TO_KEEP, self._keep_one if keep is None else keep)

    def _append_slot(self, slot: int, start: int, input_ids: np.ndarray, keep: int) -> np.ndarray:
        c = self.config
        t = input_ids.shape[1]
        total = start + t
        logits = np.zeros((keep, c.vocab_size), np.float32)
        seqlens = np.full(1, total - 1, np.int32)  # GQA: the tokens in the cache after this run, minus one
        self._slot_total[...] = total
        binding = self._session.io_binding()
        if start == 0:
            # GQA's first-prompt path writes its row's whole present buffer (all max_context positions),
            # which would make the slot's full region resident: run it in a buffer of its own length and
            # copy the filled part, so a slot's memory grows with its tokens.
            caches = [np.zeros((1, c.n_head, t, c.head_dim), self.cache_dtype) for _ in self._names]
        else:
            # A chunk after a cache: GQA reads the slot's first `start` positions and writes the next t in
            # place, so the slot's region (contiguous: the slot is the outer dimension) is bound as it is.
            caches = [cache[slot : slot + 1] for cache in self._slot_cache]
        keep_input = None if keep == 1 else np.full(1, keep, np.int64)
        self._bind_slots(binding, caches, seqlens, logits, np.ascontiguousarray(input_ids), keep_input)
        self._session.run_with_iobinding(binding)
        if start == 0:
            for cache, part in zip(self._slot_cache, caches, strict=True):
                cache[slot, :, :t] = part[0]
        return logits

    def _step_slots(self, first: int, tokens: np.ndarray, lengths: np.ndarray, active: np.ndarray) -> np.ndarray:
        n, k = tokens.shape
        if k > 1 and n > 1:
            # GroupQueryAttention's CPU kernel runs several new tokens after a cache for one row at a time
            # ("batch_size must be 1 when sequence_length > 1 and past context is given"): a run per row.
            out = np.zeros((n, k, self.config.vocab_size), np.float32)
            for i in np.flatnonzero(active).tolist():
                out[i] = self._step_slots(first + i, tokens[i : i + 1], lengths[i : i + 1], active[i : i + 1])[0]
            return out
        rows = slice(first, first + n)
        if k not in self._slot_step_buffers:
            slots, vocab = len(self._slot_seqlens), self.config.vocab_size
            self._slot_step_buffers[k] = (
                np.zeros((slots, k), np.int64),
                np.zeros((slots * k, vocab), np.float32),
                np.full(1, k, np.int64),
            )
        ids, logits, keep = self._slot_step_buffers[k]
        binding = self._slot_step_bindings.get((first, n, k))
        if binding is None:
            binding = self._slot_step_bindings[(first, n, k)] = self._session.io_binding()
            caches = [cache[rows] for cache in self._slot_cache]
            self._bind_slots(
                binding, caches, self._slot_seqlens[rows], logits[first * k : (first + n) * k], ids[rows], keep
            )
        ids[rows] = tokens
        # A row that is not stepped writes dummy tokens just past its own length (free rows at 0), where its
        # next real tokens overwrite them; its cache below that stays as it was.
        self._slot_seqlens[rows] = np.minimum(lengths, self.max_context - k) + k - 1
        self._slot_total[...] = int(self._slot_seqlens[rows].max()) + 1
        self._session.run_with_iobinding(binding)
        vocab = self.config.vocab_size
        return logits[first * k : (first + n) * k].reshape(n, k, vocab)  # a view: extend_slots() copies out rows

    # -- Session -------------------------------------------------------------------------------------------

    def _run(self, input_ids, options) -> np.ndarray:
        """Bind `input_ids` (an OrtValue) unless it is bound already, copy the step inputs to the device, run
        with `options`, return a host copy of the logits [B, vocab]."""
        if input_ids is not self._bound_ids:
            self._binding.bind_ortvalue_input(io_spec.INPUT_IDS, input_ids)
            self._bound_ids = input_ids
        self._seqlens_buffer.push()
        self._step_ids_buffer.push()
        self._session.run_with_iobinding(self._binding, options)
        return self._logits_buffer.pull()

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
        self._lengths = lengths.astype(np.int64)
        # One row (no padding) is read in pieces on the CPU provider, each after the cache of the ones before.
        size = self.prompt_chunk if b == 1 and self.prompt_chunk and self.device == "cpu" else t
        start = 0
        while start < t:
            end = start + piece_size(t - start, size, self.min_piece)
            self._seqlens[:] = np.minimum(lengths, end) - 1  # the tokens in the cache after this piece, minus one
            self._total[...] = end
            piece = self._ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(ids[:, start:end]), self.device, self.device_id
            )
            logits = self._run(piece, self._prefill_options)
            start = end
        return logits

    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self._step_ids[:] = input_ids
        self._seqlens[:] = self._lengths  # the new token goes at index `length` of each row
        self._lengths += 1
        self._total[...] = self._lengths.max()
        # The step ids' buffer is bound once per allocation and reused: fixed addresses for a CUDA graph.
        return self._run(self._step_ids_value, self._step_options)

    def close(self) -> None:
        self._binding = None
        self._session = None
        self._cache_buffers = []
        self._slot_cache, self._slot_step_bindings = [], {}
