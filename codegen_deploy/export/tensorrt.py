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

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import io_spec
from ..config import ModelConfig
from ..errors import ConfigError, ExportError, MissingDependencyError
from ..manifest import FORMAT_VERSION, manifest_config, read_manifest, sha256_file

TENSORRT_MISSING = 'tensorrt is not installed: pip install "codegen-deploy[gpu]" on a machine with an NVIDIA GPU'
NO_CUDA_GPU = (
    "no CUDA GPU is visible (torch.cuda.is_available() is False): run on a machine with an NVIDIA GPU, "
    "its driver and a CUDA build of torch"
)

# Profile order in every engine: the runtime selects them by these indices.
PROFILES = ("prompt", "decode")
PROMPT_PROFILE, DECODE_PROFILE = 0, 1

DEFAULT_MAX_PROMPT = 512
MAX_OPTIMIZATION_LEVEL = 5


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise MissingDependencyError saying how to install it."""
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError(TENSORRT_MISSING) from e
    return tensorrt


def require_cuda_gpu(device: int = 0) -> dict:
    """{"name", "compute_capability"} of the CUDA GPU, or raise MissingDependencyError when there is none.

    TensorRT's Python API has no device query, and torch (a dependency anyway, and the runtime's device
    allocator) has one, so we ask torch rather than adding cuda-python.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a base dependency
        raise MissingDependencyError("torch is not installed: pip install codegen-deploy") from e
    if not torch.cuda.is_available():
        raise MissingDependencyError(NO_CUDA_GPU)
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def tensorrt_major(version: str) -> int:
    """10 for "10.16.1.11"."""
    return int(str(version).split(".")[0])


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


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is built for. None means "derive from the model": see `resolved`.

    max_batch: rows per call. max_prompt: longest prompt run in one call (longer prompts run their tail
    token by token). max_context: prompt + generated tokens (at most the model's n_positions).
    workspace_mb: TensorRT's workspace pool limit (None: TensorRT's default, the device's memory).
    timing_cache: file reused across builds (None: a per-GPU file in the user's cache dir).
    builder_optimization_level: 0..5 (None: TensorRT's default, 3).
    tf32: let float32 matmuls use TF32 tensor cores (TensorRT's default, on in 10 and 11; a math mode, not
    a type, so strong typing keeps it). False gives float32 engines full float32 accuracy.
    """

    max_batch: int = 1
    max_prompt: int | None = None
    max_context: int | None = None
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    builder_optimization_level: int | None = None
    tf32: bool = True

    def resolved(self, config: ModelConfig) -> EngineOptions:
        """These options with max_context and max_prompt filled in for `config`, checked; raise ConfigError."""
        max_context = config.n_positions if self.max_context is None else self.max_context
        max_prompt = min(DEFAULT_MAX_PROMPT, max_context) if self.max_prompt is None else self.max_prompt
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch is {self.max_batch}: give at least 1")
        if max_context < 2:
            raise ConfigError(f"--max-context is {max_context}: give at least 2 (a prompt token and one more)")
        if max_context > config.n_positions:
            raise ConfigError(
                f"--max-context {max_context} exceeds the model's {config.n_positions} positions: "
                f"give at most {config.n_positions}"
            )
        if max_prompt < 1:
            raise ConfigError(f"--max-prompt is {max_prompt}: give at least 1")
        if max_prompt > max_context:
            raise ConfigError(
                f"--max-prompt {max_prompt} exceeds --max-context {max_context}: lower it or raise --max-context"
            )
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise ConfigError(f"--workspace-mb is {self.workspace_mb}: give a positive number of MiB")
        level = self.builder_optimization_level
        if level is not None and not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
            raise ConfigError(f"--opt-level is {level}: give 0 to {MAX_OPTIMIZATION_LEVEL}")
        return replace(self, max_prompt=max_prompt, max_context=max_context)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timing_cache"] = None if self.timing_cache is None else str(self.timing_cache)
        return d


Shape = tuple[int, ...]


def profile_shapes(config: ModelConfig, options: EngineOptions | None = None) -> dict[str, dict[str, tuple]]:
    """The two optimisation profiles as {profile: {input name: (min, opt, max)}}, in PROFILES order.

    prompt: seq 1..max_prompt with an empty cache (past exactly 0: min = opt = max = 0; TensorRT accepts
    0 <= min <= opt <= max in IOptimizationProfile.set_shape and supports empty tensors), mask length = seq.
    decode: seq 1, past 1..max_context-1, mask length = past + 1.
    The opt point, which the builder tunes kernels for, is the middle of each range at full batch.
    """
    o = (options or EngineOptions()).resolved(config)
    h, d = config.n_head, config.head_dim
    b_max = o.max_batch
    seq_opt = (o.max_prompt + 1) // 2
    past_max = o.max_context - 1
    past_opt = (past_max + 1) // 2

    def batch_seq(seq_min: int, seq_opt_: int, seq_max: int) -> tuple[Shape, Shape, Shape]:
        return (1, seq_min), (b_max, seq_opt_), (b_max, seq_max)

    def kv(past_min: int, past_opt_: int, past_max_: int) -> tuple[Shape, Shape, Shape]:
        return (1, h, past_min, d), (b_max, h, past_opt_, d), (b_max, h, past_max_, d)

    prompt = {
        io_spec.INPUT_IDS: batch_seq(1, seq_opt, o.max_prompt),
        io_spec.ATTENTION_MASK: batch_seq(1, seq_opt, o.max_prompt),  # past 0: total = seq
        io_spec.POSITION_IDS: batch_seq(1, seq_opt, o.max_prompt),
        **{name: kv(0, 0, 0) for name in io_spec.past_names(config.n_layer)},
    }
    decode = {
        io_spec.INPUT_IDS: batch_seq(1, 1, 1),
        io_spec.ATTENTION_MASK: batch_seq(2, past_opt + 1, o.max_context),  # total = past + 1
        io_spec.POSITION_IDS: batch_seq(1, 1, 1),
        **{name: kv(1, past_opt, past_max) for name in io_spec.past_names(config.n_layer)},
    }
    return {"prompt": prompt, "decode": decode}


def profiles_to_json(shapes: dict[str, dict[str, tuple]]) -> dict:
    """profile_shapes() as JSON: {profile: {input: {"min": [...], "opt": [...], "max": [...]}}}."""
    return {
        profile: {name: dict(zip(("min", "opt", "max"), map(list, mom), strict=True)) for name, mom in inputs.items()}
        for profile, inputs in shapes.items()
    }


def _normalise_cc(cc) -> str:
    """ "8.6" for (8, 6), "8.6" or 8.6."""
    if isinstance(cc, (tuple, list)):
        return f"{int(cc[0])}.{int(cc[1])}"
    return str(cc)


def check_engine_compatible(engine_manifest: dict, runtime_trt_version: str, gpu_name: str, compute_capability) -> None:
    """Raise ExportError (one line) unless the engine was built by this TensorRT version for this GPU.

    A TensorRT engine runs only under the TensorRT version that built it and on the kind of GPU it was built
    on (unless built version/hardware compatible, which we don't: those engines are slower).
    """
    built_trt = engine_manifest.get("tensorrt_version")
    gpu = engine_manifest.get("gpu") or {}
    rebuild = "rebuild it on this machine with: codegen-build-engine EXPORT_DIR"
    if built_trt != str(runtime_trt_version):
        raise ExportError(
            f"the engine was built with TensorRT {built_trt}, this machine runs TensorRT {runtime_trt_version}: "
            f"{rebuild}"
        )
    built_cc, cc = gpu.get("compute_capability"), _normalise_cc(compute_capability)
    if built_cc != cc:
        raise ExportError(
            f"the engine was built for a {gpu.get('name')} (compute capability {built_cc}), this GPU is a "
            f"{gpu_name} (compute capability {cc}): {rebuild}"
        )
    if gpu.get("name") != gpu_name:
        raise ExportError(f"the engine was built for a {gpu.get('name')}, this GPU is a {gpu_name}: {rebuild}")


def _dtype_name(trt, dtype) -> str:
    """numpy-style dtype name of a TensorRT DataType ("bfloat16" has no numpy type)."""
    import numpy as np

    try:
        return np.dtype(trt.nptype(dtype)).name
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


def _write_atomic(path: Path, data) -> None:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _network_io(trt, network) -> tuple[list[dict], list[dict]]:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]

    def spec(t):
        return {"name": t.name, "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)}

    return [spec(t) for t in inputs], [spec(t) for t in outputs]


def _check_network_io(config: ModelConfig, inputs: list[dict], outputs: list[dict], graph: Path) -> None:
    want_in = [io_spec.INPUT_IDS, io_spec.ATTENTION_MASK, io_spec.POSITION_IDS, *io_spec.past_names(config.n_layer)]
    want_out = [io_spec.LOGITS, *io_spec.present_names(config.n_layer)]
    got_in, got_out = [s["name"] for s in inputs], [s["name"] for s in outputs]
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        raise ExportError(
            f"{graph} does not have the decoder I/O this tool exports (inputs {got_in[:4]}..., outputs "
            f"{got_out[:3]}...): export it again with codegen-export"
        )


def build_engine(
    export_dir: str | Path,
    options: EngineOptions | None = None,
    progress: Callable[[str], None] = print,
    output_dir: str | Path | None = None,
) -> Path:
    """Build decoder.engine from an export folder; write it and engine.json into output_dir (default: the
    export folder); return the engine path.

    Raises MissingDependencyError without tensorrt or a CUDA GPU, ConfigError for bad options, ExportError
    for an unusable export or a failed build.
    """
    trt = require_tensorrt()
    gpu = require_cuda_gpu()
    export_dir = Path(export_dir)
    out = Path(output_dir) if output_dir is not None else export_dir
    manifest = read_manifest(export_dir, verify="size")
    config = manifest_config(manifest)
    options = (options or EngineOptions()).resolved(config)
    if options.timing_cache is None:
        options = replace(options, timing_cache=default_timing_cache(gpu, trt.__version__))
    shapes = profile_shapes(config, options)
    graph = export_dir / manifest.get("graph_file", io_spec.GRAPH_FILE)
    progress(f"building a TensorRT {trt.__version__} engine for {gpu['name']} (sm {gpu['compute_capability']})")
    progress(
        f"  batch <= {options.max_batch}, prompt <= {options.max_prompt}, context <= {options.max_context}, "
        f"workspace {options.workspace_mb or 'default'} MiB, tf32 {'on' if options.tf32 else 'off'}"
    )

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds decoder.onnx.data beside the graph.
    if not parser.parse_from_file(str(graph)):
        # str(ParserError) spans lines: flatten the first few into the one-line message.
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(min(parser.num_errors, 3)))
        raise ExportError(f"TensorRT could not parse {graph}: {errors or 'no details'}")
    inputs, outputs = _network_io(trt, network)
    _check_network_io(config, inputs, outputs, graph)
    progress(f"  parsed {graph.name} in {time.perf_counter() - t0:.1f} s ({network.num_layers} layers)")

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

    cache_path = Path(options.timing_cache)
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
    monitor = _progress_monitor(trt, progress)  # must outlive the build: keep the reference
    build_config.progress_monitor = monitor

    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise ExportError(
            "TensorRT could not build the engine (see its messages above): check --workspace-mb "
            "and the profile sizes, or export again"
        )
    progress(f"  built in {time.perf_counter() - t1:.1f} s ({serialized.nbytes / 2**20:.1f} MiB)")

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache_path, build_config.get_timing_cache().serialize())

    out.mkdir(parents=True, exist_ok=True)
    engine_path = out / io_spec.ENGINE_FILE
    # A stale engine.json must never describe the new engine: remove it before replacing the engine.
    (out / io_spec.ENGINE_MANIFEST_FILE).unlink(missing_ok=True)
    _write_atomic(engine_path, serialized)
    write_engine_manifest(
        out,
        engine_manifest_body(
            config=config,
            options=options,
            trt_version=trt.__version__,
            gpu=gpu,
            inputs=inputs,
            outputs=outputs,
            export_manifest_sha256=sha256_file(export_dir / io_spec.MANIFEST_FILE),
            dtype=manifest.get("dtype"),
        ),
    )
    progress(f"wrote {engine_path} and {io_spec.ENGINE_MANIFEST_FILE} in {time.perf_counter() - t0:.1f} s")
    return engine_path


def engine_manifest_body(
    *,
    config: ModelConfig,
    options: EngineOptions,
    trt_version: str,
    gpu: dict,
    inputs: list[dict],
    outputs: list[dict],
    export_manifest_sha256: str | None,
    dtype: str | None = None,
) -> dict:
    """What engine.json records besides checksums (pure: the tests build one without a GPU)."""
    options = options.resolved(config)
    return {
        "kind": "tensorrt-engine",
        "tensorrt_version": str(trt_version),
        "gpu": {"name": gpu["name"], "compute_capability": _normalise_cc(gpu["compute_capability"])},
        "options": options.to_dict(),
        "profiles": profiles_to_json(profile_shapes(config, options)),
        "profile_order": list(PROFILES),
        "inputs": inputs,
        "outputs": outputs,
        "model_config": config.to_dict(),
        "export_manifest_sha256": export_manifest_sha256,
        "dtype": dtype,  # the export's weight/cache dtype, for tolerances (codegen-parity reads it)
    }


def write_engine_manifest(folder: Path, body: dict) -> dict:
    """Write engine.json with the engine's size and sha256 (only the engine: the export has its own manifest).

    Same layout as manifest.json, so read_manifest(folder, ENGINE_MANIFEST_FILE) checks the engine file.
    """
    engine = folder / io_spec.ENGINE_FILE
    manifest = {
        "format_version": FORMAT_VERSION,
        **body,
        "files": {io_spec.ENGINE_FILE: {"bytes": engine.stat().st_size, "sha256": sha256_file(engine)}},
    }
    _write_atomic(folder / io_spec.ENGINE_MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def read_engine_manifest(path: str | Path, verify: str = "size") -> tuple[Path, dict]:
    """(engine path, engine.json) for a folder holding both, or for the engine file itself."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (folder / io_spec.ENGINE_FILE).is_file():
        raise ExportError(f"{folder} has no {io_spec.ENGINE_FILE}: build one with codegen-build-engine {folder}")
    manifest = read_manifest(folder, name=io_spec.ENGINE_MANIFEST_FILE, verify=verify)
    if manifest.get("kind") != "tensorrt-engine":
        raise ExportError(f"{folder / io_spec.ENGINE_MANIFEST_FILE} does not describe a TensorRT engine: rebuild it")
    return folder / io_spec.ENGINE_FILE, manifest
