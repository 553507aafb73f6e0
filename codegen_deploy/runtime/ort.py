"""The one module that imports onnxruntime: it is optional, so a missing install is a one-line error, not a
traceback. Session creation (provider options, session options, load errors) and numpy-to-OrtValue
conversion live here too, so the backends and export validation open graphs the same way.
"""

from __future__ import annotations

import os

import numpy as np

from ..dtypes import onnx_type
from ..errors import ArtifactError, InputError, MissingDependencyError


def import_onnxruntime(alternative: str | None = None):
    """The onnxruntime module, or a one-line MissingDependencyError that says how to install it.

    alternative: another way out that the caller offers (e.g. "export with --no-validate").
    """
    try:
        import onnxruntime
    except ImportError as e:
        if interrupted(e):  # Ctrl-C while its native module loaded: pybind11 reports it as an ImportError
            raise KeyboardInterrupt from e
        raise MissingDependencyError(
            'onnxruntime is not installed: pip install "codegen-deploy[cpu]" (or "codegen-deploy[gpu]" on an '
            f"NVIDIA GPU machine){f', or {alternative}' if alternative else ''}"
        ) from e
    return onnxruntime


def interrupted(error: BaseException) -> bool:
    """Whether `error` was caused by a KeyboardInterrupt (somewhere in its chain of causes)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def cuda_provider_available() -> bool:
    """Whether the installed onnxruntime offers CUDAExecutionProvider (False without onnxruntime).

    From get_available_providers(), which lists the providers the build has without loading their libraries
    (reading the kernel registry instead loads them all, which crashes GPU machines without TensorRT's).
    It says nothing about a GPU being there: callers that run on one check that too.
    """
    try:
        ort = import_onnxruntime()
    except MissingDependencyError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


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


def session_options(
    ort, threads: int | None = None, config_entries: dict[str, str] | None = None, low_memory: bool = False
):
    """An onnxruntime.SessionOptions.

    threads: intra-op threads, with one inter-op thread (default: ONNX Runtime's choice). config_entries:
    session config entries (add_session_config_entry). low_memory: no graph optimisation, priority-based
    execution order and no CPU arena. On the CPU provider an fp16 graph's MatMuls are wrapped in Casts of
    their weights: constant folding would store every weight again in float32, and the default order runs
    all those Casts first; priority order and no arena hold one float32 weight at a time. Otherwise every
    graph optimisation is on.
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if low_memory:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    return options


_OPEN_ADVICE = ": export again, or check the provider options (device id, CUDA graph)"


def create_session(
    graph: str | os.PathLike | bytes,
    options,
    providers: list[str],
    *,
    error: type[Exception] = ArtifactError,
    what: str | None = None,
    advice: str = _OPEN_ADVICE,
    **provider_kwargs,
):
    """An InferenceSession over `graph` (a path, or a serialized model) with `options`, `providers` and their
    provider_options(**provider_kwargs).

    A load failure raises `error` with one line: "{what} ({exception type}: {its first line}){advice}"; `what`
    defaults to "ONNX Runtime cannot open {graph}".
    """
    ort = import_onnxruntime()
    per_provider = provider_options(providers, **provider_kwargs)
    source = graph if isinstance(graph, bytes) else os.fspath(graph)
    try:
        return ort.InferenceSession(source, options, providers=providers, provider_options=per_provider)
    except Exception as e:  # onnxruntime raises its own exception types for broken graphs and bad options
        first = str(e).splitlines()[0][:300] if str(e) else ""
        what = what or f"ONNX Runtime cannot open {graph}"
        raise error(f"{what} ({type(e).__name__}: {first}){advice}") from e


def ort_value(ort, array: np.ndarray):
    """An OrtValue over `array`'s memory, on the CPU (made contiguous first; keep the result's array alive).

    bfloat16 (ml_dtypes) goes as its bits with the ONNX type BFLOAT16, since onnxruntime's numpy bridge
    knows no bfloat16 array.
    """
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx_type("bfloat16"))
    return ort.OrtValue.ortvalue_from_numpy(array)
