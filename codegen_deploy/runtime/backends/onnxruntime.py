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

from pathlib import Path

import numpy as np

from ...artifacts import io_spec
from ...errors import ArtifactError, InputError
from ..ort import create_session, import_onnxruntime, provider_options
from ..ort import session_options as _session_options
from ..session import Session

# provider_options and create_session live in runtime/ort.py; imported here too, where callers look for them.
__all__ = [
    "DEFAULT_PROVIDERS",
    "OrtSession",
    "choose_providers",
    "create_session",
    "device_of",
    "provider_options",
]

# Default provider preference; TensorRT's EP builds engines on first use and is chosen only on request.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# Where a bfloat16 export runs, and what to export for a CPU (ONNX Runtime's CPU provider has no bfloat16 MatMul).
BFLOAT16_RUNS = (
    "ONNX Runtime runs bfloat16 graphs only on its CUDA provider (onnxruntime-gpu: pip install "
    '"codegen-deploy[gpu]"; --providers cuda) on a GPU with bfloat16 (Ampere or newer), or as a TensorRT engine '
    "(codegen-build-engine); its CPU provider has no bfloat16 kernels: for a CPU, export float32 (the default) "
    "or float16 (--fp16)"
)


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


def device_of(providers: list[str]) -> str:
    """The OrtValue device name ("cuda" or "cpu") of the first provider: where a session's buffers live."""
    return "cuda" if providers and providers[0] in _GPU_PROVIDERS else "cpu"


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
        spec = {i["name"]: i for i in manifest["inputs"]}
        bfloat16 = spec[io_spec.past_name(0, "key")]["dtype"] == "bfloat16"
        if bfloat16 and device_of(self.providers) == "cpu":
            raise ArtifactError(f"{folder} is a bfloat16 export, and {BFLOAT16_RUNS}")
        options = _session_options(ort, threads, session_options)
        self._ort = ort
        advice = {"advice": f": {BFLOAT16_RUNS}"} if bfloat16 else {}
        self._session = create_session(graph, options, self.providers, device_id=device_id, tf32=tf32, **advice)
        names_in = [i.name for i in self._session.get_inputs()]
        io_spec.check_decoder_io(names_in, [o.name for o in self._session.get_outputs()], config.n_layer, str(graph))
        self.device = device_of(self.providers)
        self.device_id = device_id
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
