"""Check an exported decoder: onnx.checker, then ONNX Runtime against the reference model (on the CPU provider;
bfloat16 graphs on the CUDA provider, as the CPU provider has no bfloat16 MatMul).

The same left-padded batch of 2 runs through both: a prompt step (past 0) and several one-token decode
steps (past > 0) that feed back the reference's greedy tokens, so both see identical inputs at every
step. Each output is a row of the report (max abs and max rel difference over all steps, and the top-1
agreement of the logits); over tolerance raises ValidationError (exit 3) whose `report` attribute holds it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..artifacts import io_spec
from ..dtypes import dtype_name
from ..errors import ValidationError
from ..model.reference import CodeGen
from ..runtime.ort import create_session, import_onnxruntime, ort_value, session_options
from .float32_ops import cpu_float32_fallbacks
from .providers import cuda_bfloat16_missing, validation_providers
from .reference_steps import DECODE_STEPS, PROMPT_LENGTHS, _Step, free_weights, reference_steps
from .report import Report, Row
from .tolerance import Tolerance, tolerance_for

# The parts moved to their own modules stay importable from here, where callers (pipeline.py) look for them.
__all__ = [
    "DECODE_STEPS",
    "PROMPT_LENGTHS",
    "check_graph",
    "cpu_float32_fallbacks",
    "cuda_bfloat16_missing",
    "free_weights",
    "reference_steps",
    "validate_export",
    "validation_providers",
]


def check_graph(graph_path: Path) -> None:
    """onnx.checker on the file path (the in-memory form cannot serialize graphs over 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(graph_path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ValidationError(f"onnx.checker rejects {graph_path}: {str(e).splitlines()[0][:300]}") from e


def _session(ort, graph_path: Path, providers: list[str]):
    """An ONNX Runtime session on the graph exactly as exported; on the CPU provider, set up to need little memory."""
    if providers[0] == "CPUExecutionProvider":
        # low_memory: see session_options. Without prepacking ORT also keeps no second copy of the MatMul
        # weights, and maps external data instead of reading it: validation then needs little memory beyond
        # the graph itself (350M fp16: +0.2 GB, not +0.8).
        options = session_options(ort, config_entries={"session.disable_prepacking": "1"}, low_memory=True)
    else:
        options = session_options(ort)
        # The graph exactly as exported, as on the CPU provider.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    # On CUDA, provider_options' defaults keep TF32 off: float32 ops stay float32, as on the reference.
    what = f"ONNX Runtime cannot load the exported {graph_path.name}"
    return create_session(graph_path, options, providers, error=ValidationError, what=what, advice="")


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


def _run_step(ort, session, step: _Step, past: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    """One run of `session` on a step's inputs and `past`; its outputs (named `names`) as host arrays.

    Through IO binding, with each output written into a host array shaped like the reference's: that takes
    bfloat16 outputs, which onnxruntime cannot turn into numpy arrays, and copies CUDA outputs back.
    """
    binding = session.io_binding()
    inputs = {io_spec.INPUT_IDS: step.ids, io_spec.ATTENTION_MASK: step.mask, io_spec.POSITION_IDS: step.positions}
    inputs.update(zip(io_spec.past_names(len(past) // 2), past, strict=True))
    for name, array in inputs.items():
        binding.bind_ortvalue_input(name, ort_value(ort, array))
    outputs = [np.empty_like(a, order="C") for a in (step.logits, *step.present)]
    for name, array in zip(names, outputs, strict=True):
        binding.bind_ortvalue_output(name, ort_value(ort, array))
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
