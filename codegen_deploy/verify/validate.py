"""Check an exported decoder: onnx.checker, then ONNX Runtime against the reference model (on the CPU provider;
bfloat16 graphs on the CUDA provider, as the CPU provider has no bfloat16 MatMul).

The same left-padded batch of 2 runs through both: a prompt step (past 0) and several one-token decode
steps (past > 0) that feed back the reference's greedy tokens, so both see identical inputs at every
step. Each output is a row of the report (max abs and max rel difference over all steps, and the top-1
agreement of the logits); over tolerance raises ValidationError (exit 3) whose `report` attribute holds it.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import io_spec
from ..dtypes import dtype_name
from ..errors import ValidationError
from ..model.reference import CodeGen
from ..runtime.ort import cuda_provider_available, import_onnxruntime
from .report import Report, Row
from .tolerance import Tolerance, tolerance_for

PROMPT_LENGTHS = (7, 4)  # the second row is left-padded to the first's length
DECODE_STEPS = 4


def check_graph(graph_path: Path) -> None:
    """onnx.checker on the file path (the in-memory form cannot serialize graphs over 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(graph_path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ValidationError(f"onnx.checker rejects {graph_path}: {str(e).splitlines()[0][:300]}") from e


# Ops that move or reshape data without arithmetic: ORT may run them in float32 between its casts, which
# changes no value, so they are left out of the list.
_PRECISION_FREE = frozenset(
    {
        "Concat",
        "Expand",
        "Flatten",
        "Gather",
        "Identity",
        "Reshape",
        "Slice",
        "Split",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
    }
)
_INLINED = re.compile(r"_inlfunc_([A-Za-z0-9]+)_")


def _weightless_model(graph_path: Path):
    """The graph at `graph_path` with every float initializer made by a ConstantOfShape node instead.

    Same nodes and dtypes, no weights: ONNX Runtime places kernels on it exactly as on the real graph, at
    the cost of a few megabytes whatever the model's size.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    kept, makers = [], []
    for t in graph.initializer:
        if t.data_type not in floats:
            kept.append(t)
            continue
        shape = numpy_helper.from_array(np.array(t.dims, np.int64), f"{t.name}.shape")
        kept.append(shape)
        zero = helper.make_tensor("value", t.data_type, [1], [0])
        makers.append(helper.make_node("ConstantOfShape", [shape.name], [t.name], value=zero))
    nodes = [*makers, *graph.node]
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(kept)
    graph.node.extend(nodes)
    return model


def _elem_types(model) -> dict[str, int]:
    """ONNX element type of every value of `model`, by name, from onnx's shape inference."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def cpu_float32_fallbacks(graph_path: Path) -> list[str] | None:
    """Op types of the graph that ONNX Runtime's CPU provider computes in float32 between casts it inserts
    (it has no float16 kernel for them), so an fp16 graph validated on CPU checks the wiring and the
    float16 rounding between those ops, not float16 arithmetic inside them.

    Learnt from the model ORT writes after placing kernels on a weightless copy of the graph (ops whose
    float16 inputs became float32), not from ORT's kernel registry: reading that registry loads every
    provider library in-process, which kills the process (SIGSEGV) on GPU machines without TensorRT's
    libraries. None when it cannot be learnt.
    """
    import onnx
    from onnx import TensorProto

    ort = import_onnxruntime()
    try:
        model = _weightless_model(graph_path)
        before = _elem_types(model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        with tempfile.TemporaryDirectory() as tmp:
            options.optimized_model_filepath = str(Path(tmp) / "placed.onnx")
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            placed = onnx.load(options.optimized_model_filepath)
        after = _elem_types(placed)
    except Exception:  # ORT and onnx raise many types; the list is informative, never worth failing for
        return None
    fp16, fp32 = TensorProto.FLOAT16, TensorProto.FLOAT
    original = {n.name: n for n in model.graph.node if n.name}
    fp16_ops = {n.op_type for n in original.values() if any(before.get(i) == fp16 for i in n.input)}
    ops = set()
    for node in placed.graph.node:
        if node.op_type == "Cast" or not any(after.get(i) == fp32 for i in node.input):
            continue
        if node.name in original:  # one of ours: did a float16 input become float32?
            was = original[node.name]
            if any(before.get(o) == fp16 and after.get(p) == fp32 for o, p in zip(was.input, node.input, strict=False)):
                ops.add(node.op_type)
        # A function op without a float16 kernel is inlined: its nodes' outputs are named _inlfunc_<Op>_...
        elif (m := next(filter(None, map(_INLINED.search, node.output)), None)) and m.group(1) in fp16_ops:
            ops.add(m.group(1))
    return sorted(ops - _PRECISION_FREE)


@dataclass
class _Step:
    """One step's inputs and the reference's outputs, as numpy arrays."""

    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    logits: np.ndarray  # [B, T, V], float32
    present: list[np.ndarray]  # io_spec.present_names order
    real: np.ndarray  # [B, T] bool: which query positions are real tokens (left padding is not)


def reference_steps(model: CodeGen, steps: int = DECODE_STEPS, seed: int = 0) -> list[_Step]:
    """Run the reference on a left-padded batch of 2: one prompt step, then `steps` greedy decode steps."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    length = max(PROMPT_LENGTHS)
    ids = torch.randint(0, config.vocab_size, (len(PROMPT_LENGTHS), length), generator=generator)  # [B, T]
    mask = torch.zeros(len(PROMPT_LENGTHS), length, dtype=torch.int64)  # [B, T]
    for row, n in enumerate(PROMPT_LENGTHS):
        mask[row, length - n :] = 1
    cache, past_len, out = None, 0, []
    with torch.no_grad():
        for _ in range(steps + 1):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # [B, T]
            logits, cache = model(ids, mask, positions, cache)
            present = [t for key_value in cache for t in key_value]
            real = mask[:, past_len:].bool().numpy()
            arrays = (ids.numpy(), mask.numpy(), positions.numpy(), logits.numpy())
            out.append(_Step(*arrays, [_to_numpy(t) for t in present], real))
            past_len = mask.shape[1]
            ids = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            mask = torch.cat((mask, torch.ones_like(ids)), dim=1)  # [B, total + 1]
    return out


def free_weights(model: torch.nn.Module) -> None:
    """Free the storage of every parameter and buffer in place; the model is unusable afterwards.

    In place, because the exporter's leftovers (onnxscript's rewriter caches) may still reference the
    parameter objects: `model.to("meta")` would leave their storage alive.
    """
    for t in [*model.parameters(), *model.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def cuda_bfloat16_missing() -> str | None:
    """What this machine lacks to validate a bfloat16 graph (ONNX Runtime's CUDA provider and a CUDA GPU with
    bfloat16 support), or None if it has it."""
    if not cuda_provider_available():
        return "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu on an NVIDIA GPU machine)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if not torch.cuda.is_bf16_supported():
        return f"the GPU ({torch.cuda.get_device_name()}) has no bfloat16 support"
    return None


def validation_providers(dtype: str) -> list[str]:
    """The execution providers that validate a `dtype` graph: the CPU provider, or the CUDA provider for
    bfloat16 (raises ValidationError where this machine cannot run it)."""
    if dtype != "bfloat16":
        return ["CPUExecutionProvider"]
    missing = cuda_bfloat16_missing()
    if missing is not None:
        raise ValidationError(
            f"a bfloat16 graph is validated on ONNX Runtime's CUDA provider, and {missing}: export with --no-validate"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _session(ort, graph_path: Path, providers: list[str]):
    """An ONNX Runtime session on the graph exactly as exported; on the CPU provider, set up to need little memory."""
    from ..runtime.backends.onnxruntime import provider_options

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The graph exactly as exported, and no constant folding: on CPU, ORT wraps fp16 MatMuls in Casts
    # (no fp16 kernel) and folding those Casts would store every weight again in float32 (2x the
    # fp16 weights: 11 GB on the 2B shape, measured).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if providers[0] == "CPUExecutionProvider":
        # Those Casts have only initializers as inputs: the default order runs them all first, holding every
        # weight in float32 at once; priority order and no arena keep one at a time (350M fp16: +0.2 GB, not +0.8).
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False
        # Without prepacking ORT keeps no second copy of the MatMul weights, and maps external data
        # instead of reading it: validation then needs little memory beyond the graph itself.
        options.add_session_config_entry("session.disable_prepacking", "1")
    # On CUDA, TF32 off: float32 ops stay float32, as on the reference.
    per_provider = provider_options(providers)
    try:
        return ort.InferenceSession(str(graph_path), options, providers=providers, provider_options=per_provider)
    except Exception as e:  # ORT raises its own types (Fail, NotImplemented, InvalidGraph)
        raise ValidationError(
            f"ONNX Runtime cannot load the exported {graph_path.name} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e


def _new_report(dtype: str, tolerance: Tolerance, n_layer: int, providers: list[str]) -> Report:
    """An empty validation report: a row for the logits and one per present cache output."""
    names = [io_spec.LOGITS, *io_spec.present_names(n_layer)]
    return Report(
        subject=f"the {dtype} export",
        reference="the reference",
        tolerance=tolerance,
        rows=[Row(name) for name in names],
        info={"dtype": dtype, "checker": "passed", "providers": providers, "steps": []},
        advice="see the report above; export in float32 or report a bug",
    )


def _ort_value(ort, array: np.ndarray):
    """An OrtValue over `array`'s memory (contiguous); bfloat16 (ml_dtypes) goes as its bits, since
    onnxruntime's numpy bridge knows no bfloat16 array."""
    from onnx import TensorProto

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _run_step(ort, session, step: _Step, past: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    """One run of `session` on a step's inputs and `past`; its outputs (named `names`) as host arrays.

    Through IO binding, with each output written into a host array shaped like the reference's: that takes
    bfloat16 outputs, which onnxruntime cannot turn into numpy arrays, and copies CUDA outputs back.
    """
    binding = session.io_binding()
    inputs = {io_spec.INPUT_IDS: step.ids, io_spec.ATTENTION_MASK: step.mask, io_spec.POSITION_IDS: step.positions}
    inputs.update(zip(io_spec.past_names(len(past) // 2), past, strict=True))
    for name, array in inputs.items():
        binding.bind_ortvalue_input(name, _ort_value(ort, array))
    outputs = [np.empty_like(a, order="C") for a in (step.logits, *step.present)]
    for name, array in zip(names, outputs, strict=True):
        binding.bind_ortvalue_output(name, _ort_value(ort, array))
    session.run_with_iobinding(binding)
    return outputs


def _compare_steps(ort, session, graph_path: Path, ref: list[_Step], n_layer: int, report: Report) -> None:
    """Run the reference's steps through `session`, each step's presents fed back as the next one's past."""
    first = ref[0].present[0]
    past = [np.zeros((*first.shape[:2], 0, first.shape[3]), first.dtype) for _ in range(2 * n_layer)]
    names = [row.name for row in report.rows]
    for step in ref:
        try:
            logits, *present = _run_step(ort, session, step, past, names)
        except Exception as e:
            raise ValidationError(
                f"ONNX Runtime failed to run the exported {graph_path.name} at past {past[0].shape[2]} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            ) from e
        report.info["steps"].append(f"past {past[0].shape[2]} + {step.ids.shape[1]}")
        # Logits of padding queries are meaningless (they attend to nothing): compare real tokens only.
        report.rows[0].add(step.logits[step.real], logits[step.real], report.tolerance, top1=True)
        for row, ours, theirs in zip(report.rows[1:], present, step.present, strict=True):
            row.add(theirs, ours, report.tolerance)
        past = present


def _note_float32_ops(report: Report, graph_path: Path) -> None:
    """Say which ops of an fp16 graph ONNX Runtime's CPU provider computes in float32 (or that it is unknown)."""
    ops = cpu_float32_fallbacks(graph_path)
    report.info["cpu_float32_ops"] = ops
    if ops is None:
        report.notes.append("ops ONNX Runtime's CPU provider computes in float32 between casts: unknown")
    elif ops:
        report.notes.append(f"no float16 CPU kernel (ORT computes these in float32 between casts): {', '.join(ops)}")


def validate_export(
    graph_path: str | Path,
    model: CodeGen,
    *,
    steps: int = DECODE_STEPS,
    tolerance: Tolerance | None = None,
    release_model: bool = False,
    check: bool = True,
    providers: list[str] | None = None,
) -> Report:
    """Validate the graph at `graph_path` against `model`; raise ValidationError if over tolerance
    (its `report` attribute holds the report).

    tolerance: default, the table's for the model's dtype. release_model: free the model's weights once
    its outputs are computed, so their memory is free before ONNX Runtime loads the graph (the caller
    must not use the model afterwards). check: run onnx.checker first. providers: ONNX Runtime's execution
    providers (default: validation_providers(dtype); CUDA runs with TF32 off).
    """
    start = time.perf_counter()
    graph_path = Path(graph_path)
    ort = import_onnxruntime("export with --no-validate")
    dtype = dtype_name(model.dtype)
    providers = providers or validation_providers(dtype)
    tolerance = tolerance or tolerance_for(dtype)
    n_layer = model.config.n_layer
    ref = reference_steps(model, steps)
    if release_model:
        free_weights(model)
    # After the reference is freed: the checker parses a graph with inline weights into ~2x their size.
    if check:
        check_graph(graph_path)
    session = _session(ort, graph_path, providers)
    report = _new_report(dtype, tolerance, n_layer, session.get_providers())
    _compare_steps(ort, session, graph_path, ref, n_layer, report)
    del session
    if dtype == "float16" and providers[0] == "CPUExecutionProvider":  # the casts are the CPU provider's
        _note_float32_ops(report, graph_path)
    report.title = (
        f"ONNX Runtime ({', '.join(report.info['providers'])}) vs the reference, {dtype}, left-padded batch of "
        f"{len(PROMPT_LENGTHS)}, steps: {', '.join(report.info['steps'])}"
    )
    report.info["seconds"] = round(time.perf_counter() - start, 2)
    report.check()
    return report
