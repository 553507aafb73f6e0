"""TensorRT engines from an ONNX export: one engine, two optimisation profiles (prompt and decode).

Works on TensorRT 10 and 11 from one code path. TensorRT 11 builds strongly typed networks only (its weak
typing flags such as BuilderFlag.FP16 are gone), so precision always comes from the ONNX graph: an fp16
export builds an fp16 engine with the float32 islands the graph states. On TensorRT 10 we ask for the same
strong typing with NetworkDefinitionCreationFlag.STRONGLY_TYPED; on 11 that flag is deprecated and ignored,
so we pass no flags there.

`tensorrt` and CUDA are optional: they are imported inside the functions that need them, and nothing else
in the toolkit imports this module's GPU parts. The pure parts (options, profile shapes, manifest checks)
run anywhere and are what the CPU test suite covers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..artifacts import io_spec
from ..artifacts.engine import (
    PROFILES,
    EngineOptions,
    engine_manifest_body,
    profile_shapes,
    write_engine_manifest,
)
from ..artifacts.manifest import export_dtype, manifest_config, read_manifest, sha256_file
from ..atomic import write_bytes_atomic
from ..config import ModelConfig
from ..dtypes import dtype_name
from ..errors import ExportError
from ..gpu import require_cuda_gpu, require_tensorrt, tensorrt_major


def network_flags(trt) -> int:
    """create_network() flags for a strongly typed network on TensorRT 10 and 11.

    TensorRT 10: opt in with STRONGLY_TYPED (EXPLICIT_BATCH is deprecated and ignored, networks are always
    explicit batch). TensorRT 11: networks are always strongly typed, STRONGLY_TYPED is deprecated and
    ignored, EXPLICIT_BATCH no longer exists, so no flag at all.
    """
    if tensorrt_major(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def default_timing_cache(gpu: dict, trt_version: str) -> Path:
    """A timing cache per GPU architecture and TensorRT version in the user's cache dir, shared by builds.

    TensorRT refuses a cache from another device (set_timing_cache verifies its header), so one file per
    compute capability and TensorRT minor version keeps every build able to reuse its own.
    """
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "codegen-deploy" / "tensorrt"
    trt_minor = ".".join(str(trt_version).split(".")[:2])
    return root / f"timing-sm{gpu['compute_capability'].replace('.', '')}-trt{trt_minor}.cache"


def _dtype_name(trt, dtype) -> str:
    """The dtype name (dtypes.py's, numpy's for int types) of a TensorRT DataType; bfloat16 and float8 have no
    numpy type, so TensorRT's own name gives theirs."""
    import numpy as np

    try:
        return dtype_name(np.dtype(trt.nptype(dtype)))
    except TypeError:
        return {"BF16": "bfloat16", "FP8": "float8"}.get(str(dtype).rsplit(".", 1)[-1], str(dtype))


def _progress_monitor(trt, progress: Callable[[str], None]):
    """An IProgressMonitor that reports the builder's top two levels of phases with their durations.

    TensorRT calls it from its own threads, so the bookkeeping is under a lock; it never cancels the build.
    """

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = 0 if parent_phase is None else self._depth.get(parent_phase, 0) + 1
                self._depth[phase_name] = depth
                self._start[phase_name] = time.perf_counter()
            if depth <= 1:
                progress(f"{'  ' * (depth + 1)}tensorrt: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self._lock:
                depth = self._depth.pop(phase_name, 0)
                elapsed = time.perf_counter() - self._start.pop(phase_name, time.perf_counter())
            if depth <= 1:
                progress(f"{'  ' * (depth + 1)}tensorrt: {phase_name} done in {elapsed:.1f} s")

    return Monitor()


def _network_io(trt, network) -> tuple[list[dict], list[dict]]:
    """Name, dtype and shape of the parsed network's inputs and outputs, as engine.json records them."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]

    def spec(t):
        return {"name": t.name, "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)}

    return [spec(t) for t in inputs], [spec(t) for t in outputs]


def _parse_network(trt, logger, graph: Path, config: ModelConfig, progress: Callable[[str], None]):
    """Builder, network and parser of the ONNX graph (the parser owns weights the network uses: keep it
    alive until the build ends), and the network's checked inputs and outputs."""
    start = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds decoder.onnx.data beside the graph.
    if not parser.parse_from_file(str(graph)):
        # str(ParserError) spans lines: flatten the first few into the one-line message.
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(min(parser.num_errors, 3)))
        raise ExportError(f"TensorRT could not parse {graph}: {errors or 'no details'}")
    inputs, outputs = _network_io(trt, network)
    io_spec.check_decoder_io([s["name"] for s in inputs], [s["name"] for s in outputs], config.n_layer, str(graph))
    progress(f"  parsed {graph.name} in {time.perf_counter() - start:.1f} s ({network.num_layers} layers)")
    return builder, network, parser, inputs, outputs


def _builder_config(trt, builder, options: EngineOptions, shapes: dict):
    """The builder config: memory, optimisation level, TF32, and the prompt and decode profiles."""
    build_config = builder.create_builder_config()
    if options.workspace_mb is not None:
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.builder_optimization_level is not None:
        build_config.builder_optimization_level = options.builder_optimization_level
    if not options.tf32:
        build_config.clear_flag(trt.BuilderFlag.TF32)
    for name in PROFILES:
        profile = builder.create_optimization_profile()
        for input_name, (lo, opt, hi) in shapes[name].items():
            profile.set_shape(input_name, lo, opt, hi)
        build_config.add_optimization_profile(profile)
    return build_config


def _load_timing_cache(build_config, cache_path: Path, progress: Callable[[str], None]) -> None:
    """Give the build the timing cache at `cache_path`, or an empty one when that file is unusable here."""
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    try:
        cache = build_config.create_timing_cache(cache_bytes)
    except Exception:  # a truncated or foreign file: TensorRT's bindings raise on bad bytes
        cache = None
    if cache is None or not build_config.set_timing_cache(cache, ignore_mismatch=False):
        progress(f"  timing cache {cache_path} is unusable here: starting an empty one")
        cache = build_config.create_timing_cache(b"")
        build_config.set_timing_cache(cache, ignore_mismatch=False)
    else:
        progress(f"  timing cache {cache_path} ({len(cache_bytes)} bytes)")


def _build(trt, builder, network, build_config, progress: Callable[[str], None]):
    """The serialized engine, with the builder's phases reported as it goes."""
    monitor = _progress_monitor(trt, progress)  # must outlive the build: keep the reference
    build_config.progress_monitor = monitor
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise ExportError(
            "TensorRT could not build the engine (see its messages above): check --workspace-mb "
            "and the profile sizes, or export again"
        )
    progress(f"  built in {time.perf_counter() - start:.1f} s ({serialized.nbytes / 2**20:.1f} MiB)")
    return serialized


def _write_engine(out: Path, serialized, manifest_body: dict) -> Path:
    """Write decoder.engine and engine.json into `out` (each atomically); the engine's path."""
    out.mkdir(parents=True, exist_ok=True)
    engine_path = out / io_spec.ENGINE_FILE
    # A stale engine.json must never describe the new engine: remove it before replacing the engine.
    (out / io_spec.ENGINE_MANIFEST_FILE).unlink(missing_ok=True)
    write_bytes_atomic(engine_path, serialized)
    write_engine_manifest(out, manifest_body)
    return engine_path


def build_engine(
    export_dir: str | Path,
    options: EngineOptions | None = None,
    progress: Callable[[str], None] = print,
    output_dir: str | Path | None = None,
) -> Path:
    """Build decoder.engine from an export folder; write it and engine.json into output_dir (default: the
    export folder); return the engine path.

    Raises MissingDependencyError without tensorrt or a CUDA GPU, ConfigError for bad options, ExportError
    for a failed build, ArtifactError for an export without the decoder's inputs and outputs.
    """
    trt = require_tensorrt()
    gpu = require_cuda_gpu()
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, verify="size")
    config = manifest_config(manifest)
    options = (options or EngineOptions()).resolved(config)
    if options.timing_cache is None:
        options = replace(options, timing_cache=default_timing_cache(gpu, trt.__version__))
    graph = export_dir / manifest.get("graph_file", io_spec.GRAPH_FILE)
    progress(f"building a TensorRT {trt.__version__} engine for {gpu['name']} (sm {gpu['compute_capability']})")
    progress(
        f"  batch <= {options.max_batch}, prompt <= {options.max_prompt}, context <= {options.max_context}, "
        f"workspace {options.workspace_mb or 'default'} MiB, tf32 {'on' if options.tf32 else 'off'}"
    )

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, parser, inputs, outputs = _parse_network(trt, logger, graph, config, progress)
    build_config = _builder_config(trt, builder, options, profile_shapes(config, options))
    cache_path = Path(options.timing_cache)
    _load_timing_cache(build_config, cache_path, progress)
    serialized = _build(trt, builder, network, build_config, progress)
    del parser  # the build is done: the network's weights are in the engine now
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cache_path, build_config.get_timing_cache().serialize())

    body = engine_manifest_body(
        config=config,
        options=options,
        trt_version=trt.__version__,
        gpu=gpu,
        inputs=inputs,
        outputs=outputs,
        export_manifest_sha256=sha256_file(export_dir / io_spec.MANIFEST_FILE),
        dtype=export_dtype(manifest),
    )
    out = Path(output_dir) if output_dir is not None else export_dir
    engine_path = _write_engine(out, serialized, body)
    progress(f"wrote {engine_path} and {io_spec.ENGINE_MANIFEST_FILE} in {time.perf_counter() - start:.1f} s")
    return engine_path
