"""ONNX Runtime vs TensorRT on one decoder step, with Polygraphy's runners and tolerant comparator.

The same random feeds (shaped at an optimisation profile's opt point) go through the ONNX graph in ONNX
Runtime (CPU, the reference) and through the engine in TensorRT; Polygraphy compares every output (logits
and each layer's present cache) with per-output tolerances and prints error statistics. This checks the
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

# (atol, rtol) per output kind and cache dtype. fp16 engines may pick different fp16 kernels than ORT's CPU
# ones; the float32 islands (softmax, LayerNorm) keep logits within a few 1e-2 on small models.
TOLERANCES = {
    "float32": {io_spec.LOGITS: (1e-3, 1e-3), "present": (1e-4, 1e-3)},
    "float16": {io_spec.LOGITS: (5e-2, 5e-2), "present": (1e-2, 1e-2)},
    "bfloat16": {io_spec.LOGITS: (1e-1, 1e-1), "present": (5e-2, 5e-2)},
}


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


def tolerances(config: ModelConfig, cache_dtype: str) -> tuple[dict[str, float], dict[str, float]]:
    """Per-output (atol, rtol) dicts in Polygraphy's form ("" is the default for unlisted outputs)."""
    table = TOLERANCES.get(cache_dtype, TOLERANCES["float32"])
    atol = {"": table["present"][0], io_spec.LOGITS: table[io_spec.LOGITS][0]}
    rtol = {"": table["present"][1], io_spec.LOGITS: table[io_spec.LOGITS][1]}
    return atol, rtol


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


def compare_func(atol: dict[str, float], rtol: dict[str, float]):
    """Polygraphy's element-wise comparison with per-output tolerances (SimpleCompareFunc; CompareFunc.simple
    on Polygraphy releases before it existed)."""
    from polygraphy import comparator

    if hasattr(comparator, "SimpleCompareFunc"):
        return comparator.SimpleCompareFunc(atol=atol, rtol=rtol)
    return comparator.CompareFunc.simple(atol=atol, rtol=rtol)


def run_step(runner, feeds: dict) -> tuple[str, list]:
    """One inference of a Polygraphy runner, as an entry of Polygraphy's RunResults."""
    from polygraphy.comparator import IterationResult

    with runner:
        start = time.perf_counter()
        outputs = runner.infer(feeds)
        return runner.name, [IterationResult(outputs, time.perf_counter() - start, runner.name)]


def compare_onnxruntime_tensorrt(
    export_dir: str | Path, engine_dir: str | Path | None = None, profile: str = "decode", seed: int = 0
) -> bool:
    """Run one step through ONNX Runtime and TensorRT, compare every output; True when all are in tolerance.

    profile: "decode" (default; past > 0) or "prompt" (past 0). Polygraphy prints its per-output report.
    The runners run one after the other on the same values (Comparator.run would feed both the same
    objects, and ONNX Runtime takes no FormattedArray).
    """
    require_tensorrt()
    require_cuda_gpu()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, RunResults

    export_dir = Path(export_dir)
    engine_path, manifest = read_engine_manifest(engine_dir or export_dir)
    config = ModelConfig(**manifest["model_config"])
    built = manifest["options"]
    options = EngineOptions(built["max_batch"], built["max_prompt"], built["max_context"])
    cache_dtype = {t["name"]: t["dtype"] for t in manifest["inputs"]}[io_spec.past_name(0, "key")]
    if cache_dtype not in ("float32", "float16"):
        raise InputError(f"Polygraphy feeds numpy arrays, which have no {cache_dtype}: use a float32 or fp16 export")
    feeds = profile_feeds(config, options, profile, cache_dtype, seed=seed)
    trt_runner = TrtRunner(
        EngineFromBytes(BytesFromPath(str(engine_path))), name="tensorrt", optimization_profile=PROFILES.index(profile)
    )
    results = RunResults()
    results.append(run_step(onnxruntime_runner(export_dir / io_spec.GRAPH_FILE), feeds))
    results.append(run_step(trt_runner, tensorrt_feeds(feeds)))
    atol, rtol = tolerances(config, cache_dtype)
    accuracy = Comparator.compare_accuracy(results, compare_func=compare_func(atol, rtol))
    return bool(accuracy)
