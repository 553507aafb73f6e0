"""ONNX Runtime vs TensorRT on one decoder step, with Polygraphy's runners.

The same random feeds (shaped at an optimisation profile's opt point) go through the ONNX graph in ONNX
Runtime (CPU, the reference) and through the engine in TensorRT (Polygraphy's runners handle the device
buffers); every output (logits and each layer's present cache) is a row of the report, under the
tolerance table's bound for the cache dtype on CUDA. This checks the
engine build itself, independent of the Session and generation code. It needs tensorrt and a CUDA GPU;
building the feeds does not.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..artifacts import io_spec
from ..artifacts.engine import PROFILES, EngineOptions, profile_shapes, read_engine_manifest
from ..config import ModelConfig
from ..errors import InputError
from ..gpu import require_cuda_gpu, require_tensorrt
from .report import Report, Row
from .tolerance import Tolerance, tolerance_for


def step_feeds(
    config: ModelConfig, cache_dtype: str, batch: int, seq: int, past: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random feeds for one decoder call: ids and positions [batch, seq], mask [batch, past + seq], caches.

    With batch > 1 the last row is left-padded by one token (mask 0, positions counting real tokens only),
    so the comparison covers masking too.
    """
    rng = np.random.default_rng(seed)
    total = past + seq
    mask = np.ones((batch, total), np.int64)
    if batch > 1 and total > 1:
        mask[-1, 0] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]  # [batch, seq]
    np_dtype = np.float32 if cache_dtype == "bfloat16" else np.dtype(cache_dtype)
    feeds = {
        io_spec.INPUT_IDS: rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64),
        io_spec.ATTENTION_MASK: mask,
        io_spec.POSITION_IDS: np.ascontiguousarray(positions, dtype=np.int64),
    }
    kv_shape = (batch, config.n_head, past, config.head_dim)
    for name in io_spec.past_names(config.n_layer):
        feeds[name] = rng.standard_normal(kv_shape, dtype=np.float32).astype(np_dtype)
    return feeds


def profile_feeds(
    config: ModelConfig, options: EngineOptions, profile: str, cache_dtype: str, seed: int = 0
) -> dict[str, np.ndarray]:
    """step_feeds at the opt point of one of the engine's profiles ("prompt" or "decode")."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    shapes = profile_shapes(config, options)[profile]
    batch, seq = shapes[io_spec.INPUT_IDS][1]
    past = shapes[io_spec.past_name(0, "key")][1][2]
    return step_feeds(config, cache_dtype, batch=batch, seq=seq, past=past, seed=seed)


def onnxruntime_runner(graph: Path):
    """Polygraphy's ONNX Runtime runner on the CPU provider, from the graph's path (external data found)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(graph), providers=["cpu"]), name="onnxruntime")


def tensorrt_feeds(feeds: dict[str, np.ndarray]) -> dict:
    """The feeds with every empty input (the prompt profile's past) on a small real buffer.

    Polygraphy's TrtRunner allocates device memory of each input's size, which for an empty tensor is a null
    pointer, and TensorRT wants a non-null address for every input even when it is empty. A FormattedArray
    (Polygraphy's "this buffer, seen with that shape") gives it 256 bytes with the empty shape on top.
    """
    from polygraphy.common import FormattedArray

    return {
        name: FormattedArray(np.zeros(256 // a.itemsize, a.dtype), shape=a.shape) if a.size == 0 else a
        for name, a in feeds.items()
    }


def compare_outputs(
    reference: dict[str, np.ndarray], other: dict[str, np.ndarray], n_layer: int, tolerance: Tolerance
) -> Report:
    """One report row per decoder output (logits with top-1 agreement, then every present cache)."""
    report = Report(subject="tensorrt", reference="onnxruntime", tolerance=tolerance)
    for name in [io_spec.LOGITS, *io_spec.present_names(n_layer)]:
        row = Row(name)
        row.add(reference[name], other[name], tolerance, top1=name == io_spec.LOGITS)
        report.rows.append(row)
    return report


def run_step(runner, feeds: dict) -> tuple[str, list]:
    """One inference of a Polygraphy runner, as an entry of Polygraphy's RunResults."""
    from polygraphy.comparator import IterationResult

    with runner:
        start = time.perf_counter()
        outputs = runner.infer(feeds)
        return runner.name, [IterationResult(outputs, time.perf_counter() - start, runner.name)]


def compare_onnxruntime_tensorrt(
    export_dir: str | Path, engine_dir: str | Path | None = None, profile: str = "decode", seed: int = 0
) -> Report:
    """Run one step through ONNX Runtime and TensorRT and compare every output; the report (check() raises
    ValidationError when an output is over tolerance).

    profile: "decode" (default; past > 0) or "prompt" (past 0). The runners run one after the other on
    the same values (Polygraphy's Comparator.run would feed both the same objects, and ONNX Runtime takes
    no FormattedArray).
    """
    require_tensorrt()
    require_cuda_gpu()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    export_dir = Path(export_dir)
    engine_path, manifest = read_engine_manifest(engine_dir or export_dir)
    config = ModelConfig(**manifest["model_config"])
    built = manifest["options"]
    options = EngineOptions(built["max_batch"], built["max_prompt"], built["max_context"])
    cache_dtype = io_spec.cache_dtype(manifest["inputs"], str(engine_path))
    if cache_dtype not in ("float32", "float16"):
        raise InputError(f"Polygraphy feeds numpy arrays, which have no {cache_dtype}: use a float32 or fp16 export")
    feeds = profile_feeds(config, options, profile, cache_dtype, seed=seed)
    trt_runner = TrtRunner(
        EngineFromBytes(BytesFromPath(str(engine_path))), name="tensorrt", optimization_profile=PROFILES.index(profile)
    )
    _, [ours] = run_step(onnxruntime_runner(export_dir / io_spec.GRAPH_FILE), feeds)
    _, [theirs] = run_step(trt_runner, tensorrt_feeds(feeds))
    report = compare_outputs(ours, theirs, config.n_layer, tolerance_for(cache_dtype, tf32=built.get("tf32", True)))
    shape = "x".join(map(str, feeds[io_spec.INPUT_IDS].shape))
    past = feeds[io_spec.past_name(0, "key")].shape[2]
    report.title = (
        f"TensorRT ({engine_path.name}) vs ONNX Runtime (CPU), {cache_dtype}, {profile} profile: "
        f"ids {shape}, past {past}"
    )
    report.info = {"profile": profile, "dtype": cache_dtype, "seed": seed}
    return report
