"""Backends by name: open_session("torch" | "onnxruntime" | "tensorrt", path, **options) -> Session.

Each backend module is imported only when asked for, so a missing optional dependency (onnxruntime,
tensorrt) matters only to the backend that needs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ...config import check_threads
from ...errors import InputError
from ..session import Session

BACKENDS = ("torch", "onnxruntime", "tensorrt")
GRAPHS = ("auto", "plain", "fused")  # which graph of an export the onnxruntime backend runs

# The Python module each backend needs, for available_backends().
_REQUIRES = {"torch": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}


def available_backends() -> list[str]:
    """Backends whose runtime library is installed here (TensorRT still needs a CUDA GPU to run)."""
    return [b for b in BACKENDS if importlib.util.find_spec(_REQUIRES[b]) is not None]


def default_backend(path) -> str:
    """The backend an artifact is meant for: onnxruntime for an export folder (manifest.json), tensorrt
    for an engine (a .engine file or a folder with engine.json and no ONNX export), torch otherwise."""
    from ...artifacts import io_spec

    p = Path(path)
    if p.is_file() and p.suffix == ".engine":
        return "tensorrt"
    if (p / io_spec.MANIFEST_FILE).is_file():
        return "onnxruntime"
    if (p / io_spec.ENGINE_MANIFEST_FILE).is_file():
        return "tensorrt"
    return "torch"


def context_of(path) -> int | None:
    """The most tokens (prompt + generated) a model path allows, read from its files without loading the
    model: an engine's built context, else the model's n_positions; None when it cannot be read cheaply."""
    import json

    from ...artifacts import io_spec

    p = Path(path)
    folder = p.parent if p.is_file() else p
    try:
        if (folder / io_spec.ENGINE_MANIFEST_FILE).is_file() and default_backend(p) == "tensorrt":
            return int(json.loads((folder / io_spec.ENGINE_MANIFEST_FILE).read_text())["options"]["max_context"])
        for name, key in ((io_spec.MANIFEST_FILE, "model_config"), ("config.json", None)):
            if (folder / name).is_file():
                body = json.loads((folder / name).read_text())
                return int((body[key] if key else body)["n_positions"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the session reports what is wrong when it opens
    return None


def backend_options(
    backend: str,
    *,
    threads: int | None = None,
    providers: str | None = None,
    dtype=None,
    graph: str | None = None,
    device: str | None = None,
    device_id: int | None = None,
    tf32: bool | None = None,
    cuda_graph: bool | None = None,
    verify: str | None = None,
) -> dict:
    """The subset of common command-line options that `backend` takes, unset ones left out.

    device: the torch device ("cuda", "cuda:1", "cpu"); device_id, tf32, cuda_graph: ONNX Runtime's CUDA
    provider options (see onnxruntime.provider_options); verify: how an export's files are checked on open.
    """
    takes = {
        "torch": ("threads", "dtype", "device"),
        "onnxruntime": ("threads", "providers", "graph", "device_id", "tf32", "cuda_graph", "verify"),
        "tensorrt": (),
    }
    given = {
        "threads": check_threads(threads),
        "providers": providers,
        "dtype": dtype,
        "graph": graph,
        "device": device,
        "device_id": device_id,
        "tf32": tf32,
        "cuda_graph": cuda_graph,
        "verify": verify,
    }
    return {k: v for k, v in given.items() if v is not None and k in takes.get(backend, ())}


def open_session(backend: str, path, **options) -> Session:
    """Open a Session of `backend` on `path`.

    torch: a checkpoint folder, hub id, loaded CodeGen, or an export folder whose manifest records its
    checkpoint (options: dtype, threads, max_context, max_batch, device).
    onnxruntime: an export folder (options: providers, threads, max_context, max_batch, verify, device_id,
    tf32, cuda_graph); opens the fused graph's session when the manifest lists one and it runs on the chosen
    provider, unless graph="plain". verify: "sha256" (default: every file hashed while the session loads),
    "size" or "none".
    tensorrt: an engine file or a folder holding one (options: max_batch, max_context).
    A thread count beyond max_threads() and a local path that does not exist are refused before anything loads.
    """
    from ...model.hub import check_model_path, no_such_folder

    check_threads(options.get("threads"))
    if backend == "torch":
        if isinstance(path, str | Path):
            check_model_path(path)  # a hub id passes: the checkpoint loader downloads it
        from .torch import TorchSession

        return TorchSession(path, **options)
    if backend in ("onnxruntime", "tensorrt") and not Path(path).exists():
        raise no_such_folder(path)
    if backend == "onnxruntime":
        return _open_onnxruntime(Path(path), **options)
    if backend == "tensorrt":
        from .tensorrt import TensorRTSession

        return TensorRTSession(path, **options)
    raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def _open_onnxruntime(folder: Path, graph: str = "auto", verify: str = "sha256", **options) -> Session:
    """The plain-graph OrtSession, or the fused one when the export has a fused graph.

    graph: "auto" (fused if the manifest lists one that runs on the chosen provider), "plain" or "fused".
    Providers default to CUDA when installed, then CPU, for both graphs. verify "sha256" hashes the
    export's files in a thread while ONNX Runtime loads the graph: the check costs little more than the
    load itself, and a session over a corrupted file is closed before anyone uses it.
    """
    from ...artifacts.io_spec import MANIFEST_FILE
    from ...artifacts.manifest import BackgroundVerification, FusedGraph, read_manifest, require_entries
    from .onnxruntime import OrtSession, choose_providers
    from .onnxruntime_fused import cuda_unsupported_reason

    if graph not in GRAPHS:
        raise InputError(f"unknown graph {graph!r}: choose {', '.join(GRAPHS)}")
    if folder.is_file():  # the .onnx file itself
        folder = folder.parent
    if options.get("io_binding") is False and graph == "auto":
        graph = "plain"  # the naive loop (no IO binding) exists for the plain graph only
    manifest = read_manifest(folder, verify="none" if verify == "none" else "size")
    fused = FusedGraph.of(manifest) if graph != "plain" else None
    if graph == "fused" and fused is None:
        raise InputError(
            f"{folder} has no fused graph: add one with codegen_deploy.pipeline.add_fused_graph(folder), "
            "or use graph='plain'"
        )
    options["providers"] = choose_providers(options.get("providers"))
    on_cuda = options["providers"][0] == "CUDAExecutionProvider"
    if fused is not None and graph == "auto" and on_cuda and cuda_unsupported_reason(fused.cache_dtype, fused.rotary):
        fused = None  # this fused graph is for the CPU provider: the plain graph runs on CUDA
    if fused is None and options.pop("cuda_graph", False):  # the plain graph's cache grows: no fixed shapes
        raise InputError(
            f"CUDA graphs need a fused graph that runs on the CUDA provider and {folder} has none: add one with "
            "codegen_deploy.pipeline.add_fused_graph(folder, rotary='graph') to a float16 export, or drop --cuda-graph"
        )
    if fused is None:
        require_entries(manifest, ("inputs",), folder / MANIFEST_FILE)  # the plain graph's names and dtypes
    hashing = BackgroundVerification(folder, manifest) if verify == "sha256" else None
    try:
        if fused is not None:
            from .onnxruntime_fused import FusedOrtSession

            session = FusedOrtSession(folder, verify="none", **options)
        else:
            session = OrtSession(folder, verify="none", **options)
    except BaseException:
        if hashing is not None:
            hashing.result()  # a corrupted file explains a failed load better than ONNX Runtime's message
        raise
    if hashing is not None:
        try:
            hashing.result()
        except BaseException:
            session.close()
            raise
    return session
