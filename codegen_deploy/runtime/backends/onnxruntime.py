"""The ONNX Runtime backend over an export folder's plain decoder graph (decoder.onnx).

IO binding keeps the cache in ONNX Runtime's memory: the present OrtValues of one run are bound as
the past inputs of the next, and the presents are allocated by ONNX Runtime on the provider's device,
so a step never copies the cache through numpy (only the last position's logits come back). The plain
graph still grows its cache with a Concat inside, whose cost rises with the context; the fused graph
(onnxruntime_fused.FusedOrtSession) writes the cache in place and is opened instead when the manifest
lists one (see backends.open_session).

Names and dtypes come from the manifest (written from io_spec), never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...artifacts import io_spec
from ...errors import ArtifactError, InputError
from ..ort import import_onnxruntime
from ..session import Session

# Default provider preference; TensorRT's EP builds engines on first use and is chosen only on request.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def choose_providers(requested: list[str] | str | None = None) -> list[str]:
    """Execution providers to use: `requested` (checked against what is installed), else CUDA if installed,
    then CPU. A comma-separated string is accepted; "cpu", "cuda" and "tensorrt" are short names."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if requested is None:
        return [p for p in DEFAULT_PROVIDERS if p in available]
    if isinstance(requested, str):
        requested = [p.strip() for p in requested.split(",") if p.strip()]
    short = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    providers = [short.get(p.lower(), p) for p in requested]
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise InputError(
            f"execution provider {', '.join(missing) or '(none)'} is not available in this onnxruntime: "
            f"choose from {', '.join(available)}"
        )
    return providers


def provider_options(
    providers: list[str], device_id: int = 0, tf32: bool = False, cuda_graph: bool = False
) -> list[dict[str, str]]:
    """One options dict per provider, for InferenceSession(providers=..., provider_options=...).

    CUDA: device_id; use_tf32 "0" unless tf32 (the provider's default "1" lets float32 MatMul round its inputs
    to TF32: logits ~2e-3 off the reference instead of ~2e-6); enable_cuda_graph when cuda_graph (the session
    must then bind fixed buffers: see FusedOrtSession). TensorRT: device_id. Others: none.
    """
    if device_id < 0:
        raise InputError(f"device id {device_id} is negative: give a GPU index (0 is the first GPU)")
    options = []
    for name in providers:
        if name == "CUDAExecutionProvider":
            cuda = {"device_id": str(device_id), "use_tf32": "1" if tf32 else "0"}
            options.append({**cuda, "enable_cuda_graph": "1" if cuda_graph else "0"})
        elif name == "TensorrtExecutionProvider":
            options.append({"device_id": str(device_id)})
        else:
            options.append({})
    return options


def create_session(ort, graph: Path, options, providers: list[str], **provider_kwargs):
    """InferenceSession over `graph` with `providers` and their provider_options(); a load failure becomes a
    one-line ArtifactError."""
    per_provider = provider_options(providers, **provider_kwargs)
    try:
        return ort.InferenceSession(os.fspath(graph), options, providers=providers, provider_options=per_provider)
    except Exception as e:  # onnxruntime raises its own exception types for broken graphs and bad options
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise ArtifactError(
            f"ONNX Runtime cannot open {graph} ({type(e).__name__}: {first}): export again, or check the "
            "provider options (device id, CUDA graph)"
        ) from e


def device_of(providers: list[str]) -> str:
    """The OrtValue device name ("cuda" or "cpu") of the first provider: where a session's buffers live."""
    return "cuda" if providers and providers[0] in _GPU_PROVIDERS else "cpu"


def fused_graph_entry(manifest: dict) -> str | None:
    """The fused graph's file name if the export's manifest lists one (the hook open_session uses)."""
    name = manifest.get("fused_graph_file")
    if isinstance(name, str):
        return name
    return io_spec.FUSED_GRAPH_FILE if io_spec.FUSED_GRAPH_FILE in manifest.get("files", {}) else None


class OrtSession(Session):
    """A Session over the plain decoder graph of an export folder.

    providers: execution providers (names or cpu/cuda/tensorrt; default CUDA if installed, then CPU).
    threads: intra-op threads (default: ONNX Runtime's choice). io_binding: False runs the naive
    loop (numpy feeds and fetches, the cache copied through numpy every step), kept for benchmarks.
    device_id: the GPU of the CUDA/TensorRT provider; tf32: allow TF32 for float32 MatMul on CUDA (off:
    float32 stays float32).
    session_options: extra SessionOptions config entries. verify: how to check the manifest's files
    ("none", "size", "sha256").
    """

    name = "onnxruntime"

    def __init__(
        self,
        folder: str | Path,
        providers: list[str] | str | None = None,
        threads: int | None = None,
        max_context: int | None = None,
        max_batch: int | None = None,
        io_binding: bool = True,
        session_options: dict[str, str] | None = None,
        verify: str = "size",
        device_id: int = 0,
        tf32: bool = False,
    ):
        from ...artifacts.manifest import manifest_config, read_manifest

        ort = import_onnxruntime()
        folder = Path(folder)
        if folder.is_file():  # the .onnx file itself
            folder = folder.parent
        manifest = read_manifest(folder, verify=verify)
        graph = folder / manifest.get("graph_file", io_spec.GRAPH_FILE)
        if not graph.is_file():
            raise ArtifactError(f"{graph} is missing: copy the whole export folder or export again")
        config = manifest_config(manifest)
        super().__init__(config, max_context=max_context, max_batch=max_batch)
        self.manifest = manifest
        self.providers = choose_providers(providers)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        for key, value in (session_options or {}).items():
            options.add_session_config_entry(key, value)
        self._ort = ort
        self._session = create_session(ort, graph, options, self.providers, device_id=device_id, tf32=tf32)
        names_in = [i.name for i in self._session.get_inputs()]
        io_spec.check_decoder_io(names_in, [o.name for o in self._session.get_outputs()], config.n_layer, str(graph))
        self.device = device_of(self.providers)
        self.device_id = device_id
        spec = {i["name"]: i for i in manifest["inputs"]}
        self.cache_dtype = np.dtype(spec[io_spec.past_name(0, "key")]["dtype"])
        self._past = io_spec.past_names(config.n_layer)
        self._present = io_spec.present_names(config.n_layer)
        self._use_binding = io_binding
        self._binding = self._session.io_binding() if io_binding else None
        self._cache: list = []  # per past input: an OrtValue (binding) or a numpy array (naive loop)

    def _value(self, array: np.ndarray):
        """An OrtValue on the session's device (on CPU it wraps the numpy memory; keep `array` alive)."""
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

    def _empty_cache(self, batch: int) -> list:
        c = self.config
        empty = np.zeros((batch, c.n_head, 0, c.head_dim), self.cache_dtype)  # [B, H, 0, D]
        return [self._value(empty) if self._use_binding else empty for _ in self._past]

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        # The session's mask is a view of a wider buffer: contiguous for batch 1, copied (small) otherwise.
        small = {
            io_spec.INPUT_IDS: input_ids,
            io_spec.ATTENTION_MASK: np.ascontiguousarray(attention_mask),
            io_spec.POSITION_IDS: position_ids,
        }
        if not self._use_binding:
            outputs = self._session.run(None, {**small, **dict(zip(self._past, self._cache, strict=True))})
            names = [o.name for o in self._session.get_outputs()]
            by_name = dict(zip(names, outputs, strict=True))
            self._cache = [by_name[n] for n in self._present]
            return by_name[io_spec.LOGITS][:, -1]
        b = self._binding
        self._keep = list(small.values())  # alive until the run ends
        for name, array in zip(small, self._keep, strict=True):
            b.bind_ortvalue_input(name, self._value(array))
        for name, value in zip(self._past, self._cache, strict=True):
            b.bind_ortvalue_input(name, value)
        b.bind_output(io_spec.LOGITS, "cpu")  # logits come back to the host for sampling
        for name in self._present:
            b.bind_output(name, self.device, self.device_id)  # allocated by ONNX Runtime, stays on the device
        self._session.run_with_iobinding(b)
        outputs = b.get_outputs()  # in binding order: logits, then presents
        self._cache = list(outputs[1:])
        return outputs[0].numpy()[:, -1]

    def _prefill(self, input_ids, attention_mask, position_ids):
        self._cache = self._empty_cache(input_ids.shape[0])
        return np.ascontiguousarray(self._run(input_ids, attention_mask, position_ids), dtype=np.float32)

    def _step(self, input_ids, attention_mask, position_ids):
        return np.ascontiguousarray(self._run(input_ids, attention_mask, position_ids), dtype=np.float32)

    def close(self) -> None:
        self._cache = []
        self._binding = None
        self._session = None
