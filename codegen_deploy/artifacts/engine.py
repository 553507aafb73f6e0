"""A TensorRT engine as an artifact: what it is built for (options, optimisation profiles), its engine.json,
and whether it can run on this machine. Building lives in export/tensorrt.py, running in runtime/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config import ModelConfig
from ..errors import ArtifactError, ConfigError
from . import io_spec
from .manifest import read_manifest, write_manifest

# Profile order in every engine: the runtime selects them by these indices.
PROFILES = ("prompt", "decode")
PROMPT_PROFILE, DECODE_PROFILE = 0, 1

DEFAULT_MAX_PROMPT = 512
MAX_OPTIMIZATION_LEVEL = 5


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


def normalise_cc(cc) -> str:
    """ "8.6" for (8, 6), "8.6" or 8.6."""
    if isinstance(cc, (tuple, list)):
        return f"{int(cc[0])}.{int(cc[1])}"
    return str(cc)


def check_engine_compatible(engine_manifest: dict, runtime_trt_version: str, gpu_name: str, compute_capability) -> None:
    """Raise ArtifactError (one line) unless the engine was built by this TensorRT version for this GPU.

    A TensorRT engine runs only under the TensorRT version that built it and on the kind of GPU it was built
    on (unless built version/hardware compatible, which we don't: those engines are slower).
    """
    built_trt = engine_manifest.get("tensorrt_version")
    gpu = engine_manifest.get("gpu") or {}
    rebuild = "rebuild it on this machine with: codegen-build-engine EXPORT_DIR"
    if built_trt != str(runtime_trt_version):
        raise ArtifactError(
            f"the engine was built with TensorRT {built_trt}, this machine runs TensorRT {runtime_trt_version}: "
            f"{rebuild}"
        )
    built_cc, cc = gpu.get("compute_capability"), normalise_cc(compute_capability)
    if built_cc != cc:
        raise ArtifactError(
            f"the engine was built for a {gpu.get('name')} (compute capability {built_cc}), this GPU is a "
            f"{gpu_name} (compute capability {cc}): {rebuild}"
        )
    if gpu.get("name") != gpu_name:
        raise ArtifactError(f"the engine was built for a {gpu.get('name')}, this GPU is a {gpu_name}: {rebuild}")


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
        "gpu": {"name": gpu["name"], "compute_capability": normalise_cc(gpu["compute_capability"])},
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
    return write_manifest(folder, body, name=io_spec.ENGINE_MANIFEST_FILE, files=[io_spec.ENGINE_FILE])


def read_engine_manifest(path: str | Path, verify: str = "size") -> tuple[Path, dict]:
    """(engine path, engine.json) for a folder holding both, or for the engine file itself."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (folder / io_spec.ENGINE_FILE).is_file():
        raise ArtifactError(f"{folder} has no {io_spec.ENGINE_FILE}: build one with codegen-build-engine {folder}")
    manifest = read_manifest(folder, name=io_spec.ENGINE_MANIFEST_FILE, verify=verify)
    if manifest.get("kind") != "tensorrt-engine":
        raise ArtifactError(f"{folder / io_spec.ENGINE_MANIFEST_FILE} does not describe a TensorRT engine: rebuild it")
    return folder / io_spec.ENGINE_FILE, manifest
