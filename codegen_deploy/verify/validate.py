"""Check an exported decoder: onnx.checker, then ONNX Runtime (CPU) against the reference model.

The same left-padded batch of 2 runs through both: a prompt step (past 0) and several one-token decode
steps (past > 0) that feed back the reference's greedy tokens, so both see identical inputs at every
step. Per output we report the max abs and max rel difference over all steps, and the top-1 agreement
of the logits; over tolerance raises ValidationError (exit 3) whose `report` attribute holds the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import io_spec
from ..errors import MissingDependencyError, ValidationError
from ..model.reference import CodeGen

PROMPT_LENGTHS = (7, 4)  # the second row is left-padded to the first's length
DECODE_STEPS = 4


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted differences (None: not checked) and least top-1 agreement of the logits.

    *_atol bound the max abs difference; *_rtol bound max rel, the max abs difference over the largest
    |reference| value, which carries over from random test weights to real models with larger logits.
    """

    logits_atol: float | None
    present_atol: float | None
    min_top1: float
    logits_rtol: float | None = None
    present_rtol: float | None = None


# fp32: the bar (measured: ~4e-6 on the 350M shape). fp16: ORT's CPU provider computes MatMul,
# Add and Gelu in float32 between casts where PyTorch rounds in fp16, so they differ by fp16 rounding:
# measured max rel 1.7e-3 (logits) and 1.8e-3 (cache) on the 350M shape, logits max abs 5.2e-3 (350M)
# and 8.8e-3 (2B) with random weights. The bound leaves ~6x room; top-1 may flip only on near-ties.
TOLERANCES = {
    "float32": Tolerance(logits_atol=1e-4, present_atol=1e-4, min_top1=1.0),
    "float16": Tolerance(logits_atol=None, present_atol=None, min_top1=0.9, logits_rtol=1e-2, present_rtol=1e-2),
}


@dataclass
class OutputDiff:
    """Max abs difference of one output over all steps, and max rel: max abs / max |reference| of a step."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0

    def update(self, ours: np.ndarray, ref: np.ndarray) -> None:
        ours, ref = ours.astype(np.float64), ref.astype(np.float64)
        diff = float(np.abs(ours - ref).max(initial=0.0))
        self.max_abs = max(self.max_abs, diff)
        # Relative to the output's scale: elementwise ratios explode where the reference is near zero.
        self.max_rel = max(self.max_rel, diff / max(float(np.abs(ref).max(initial=0.0)), 1e-12))


@dataclass
class ValidationReport:
    """The outcome of validate_export: per-output differences, top-1 agreement, tolerance and verdict."""

    dtype: str
    tolerance: Tolerance
    steps: list[str]
    outputs: list[OutputDiff]
    top1_agree: int = 0
    top1_total: int = 0
    checker: str = "passed"
    cpu_float32_ops: list[str] | None = None  # fp16 graphs: ops ORT's CPU provider runs in float32
    providers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def top1(self) -> float:
        return self.top1_agree / max(self.top1_total, 1)

    @property
    def logits(self) -> OutputDiff:
        return self.outputs[0]

    @property
    def present_max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs[1:]), default=0.0)

    @property
    def present_max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs[1:]), default=0.0)

    def failures(self) -> list[str]:
        """Each way the export exceeds the tolerance, as a short phrase (empty: it passed)."""
        t, out = self.tolerance, []
        checks = (
            ("logits max abs", self.logits.max_abs, t.logits_atol),
            ("present max abs", self.present_max_abs, t.present_atol),
            ("logits max rel", self.logits.max_rel, t.logits_rtol),
            ("present max rel", self.present_max_rel, t.present_rtol),
        )
        for what, value, bound in checks:
            if bound is not None and not value <= bound:  # `not <=` also catches NaN
                out.append(f"{what} {value:.3g} > {bound:.3g}")
        if self.top1 < t.min_top1:
            out.append(f"top-1 agreement {self.top1:.1%} < {t.min_top1:.0%}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def table(self) -> str:
        """A readable table: one row per output, then top-1 agreement and the verdict."""
        lines = [
            f"ONNX Runtime ({', '.join(self.providers)}) vs reference, {self.dtype}, left-padded batch of 2, "
            f"steps: {', '.join(self.steps)}",
            f"{'output':<28} {'max abs':>10} {'max rel':>10}  (rel: to the largest |reference| value)",
        ]
        lines += [f"{o.name:<28} {o.max_abs:>10.3g} {o.max_rel:>10.3g}" for o in self.outputs]
        lines.append(f"top-1 agreement {self.top1_agree}/{self.top1_total} ({self.top1:.1%})")
        if self.cpu_float32_ops:
            lines.append(
                "no float16 CPU kernel (ORT computes these in float32 between casts): "
                + ", ".join(self.cpu_float32_ops)
            )
        t = self.tolerance
        bounds = [f"{name} {value:g}" for name, value in (
            ("logits abs", t.logits_atol), ("present abs", t.present_atol),
            ("logits rel", t.logits_rtol), ("present rel", t.present_rtol),
        ) if value is not None]  # fmt: skip
        verdict = "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures())
        lines.append(f"tolerance: {', '.join(bounds)}, top-1 >= {t.min_top1:.0%} -> {verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as JSON-ready data (for manifest.json)."""
        return {
            "passed": self.passed,
            "failures": self.failures(),
            "dtype": self.dtype,
            "checker": self.checker,
            "providers": self.providers,
            "steps": self.steps,
            "tolerance": vars(self.tolerance),
            "cpu_float32_ops": self.cpu_float32_ops,
            "top1_agree": self.top1_agree,
            "top1_total": self.top1_total,
            "outputs": {o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel} for o in self.outputs},
            "seconds": round(self.seconds, 2),
        }


def import_onnxruntime():
    """onnxruntime, or a one-line MissingDependencyError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            'onnxruntime is not installed: pip install "codegen-deploy[cpu]" (or [gpu] on an NVIDIA machine), '
            "or export with --no-validate"
        ) from e
    return onnxruntime


def check_graph(graph_path: Path) -> None:
    """onnx.checker on the file path (the in-memory form cannot serialize graphs over 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(graph_path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ValidationError(f"onnx.checker rejects {graph_path}: {str(e).splitlines()[0][:300]}") from e


def cpu_float32_fallbacks(graph_path: Path) -> list[str] | None:
    """Op types that take float16 inputs in the graph but have no float16 kernel in ONNX Runtime's CPU provider.

    ORT inserts Casts around them and computes them in float32, so an fp16 graph validated on CPU checks
    the wiring and the float16 rounding between those ops, not float16 arithmetic inside them.
    None when ORT's kernel registry cannot be read.
    """
    import onnx

    try:
        from onnxruntime.capi import _pybind_state

        kernels = _pybind_state.get_all_opkernel_def()
    except (ImportError, AttributeError):
        return None
    fp16_ops = {
        (k.domain or "", k.op_name)
        for k in kernels
        if k.provider == "CPUExecutionProvider" and any("tensor(float16)" in t for t in k.type_constraints.values())
    }
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    fp16 = {
        v.name for v in [*graph.value_info, *graph.input] if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }
    fp16 |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    return sorted({
        n.op_type for n in graph.node
        if any(i in fp16 for i in n.input) and (n.domain if n.domain != "ai.onnx" else "", n.op_type) not in fp16_ops
    })  # fmt: skip


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
            real = mask[:, past_len:].bool()
            out.append(_Step(ids.numpy(), mask.numpy(), positions.numpy(), logits.numpy(),
                             [_to_numpy(t) for t in present], real.numpy()))  # fmt: skip
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


def validate_export(
    graph_path: str | Path,
    model: CodeGen,
    *,
    steps: int = DECODE_STEPS,
    tolerance: Tolerance | None = None,
    release_model: bool = False,
    check: bool = True,
) -> ValidationReport:
    """Validate the graph at `graph_path` against `model`; raise ValidationError if over tolerance.

    release_model: free the model's weights once its outputs are computed, so their memory is free
    before ONNX Runtime loads the graph (the caller must not use the model afterwards).
    """
    start = time.perf_counter()
    graph_path = Path(graph_path)
    ort = import_onnxruntime()
    dtype = str(model.dtype).removeprefix("torch.")
    n_layer = model.config.n_layer
    if tolerance is None and dtype not in TOLERANCES:
        raise ValidationError(f"ONNX Runtime's CPU provider cannot run {dtype} graphs: export with --no-validate")
    tolerance = tolerance or TOLERANCES[dtype]
    ref = reference_steps(model, steps)
    cache_np_dtype = ref[0].present[0].dtype
    if release_model:
        free_weights(model)
    # After the reference is freed: the checker parses a graph with inline weights into ~2x their size.
    if check:
        check_graph(graph_path)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The graph exactly as exported, and no constant folding: on CPU, ORT wraps fp16 MatMuls in Casts
    # (no fp16 kernel) and folding those Casts would store every weight again in float32 (2x the
    # fp16 weights: 11 GB on the 2B shape, measured).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Those Casts have only initializers as inputs: the default order runs them all first, holding every
    # weight in float32 at once; priority order and no arena keep one at a time (350M fp16: +0.2 GB, not +0.8).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    # Without prepacking ORT keeps no second copy of the MatMul weights, and maps external data
    # instead of reading it: validation then needs little memory beyond the graph itself.
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own types (Fail, NotImplemented, InvalidGraph)
        raise ValidationError(
            f"ONNX Runtime cannot load the exported {graph_path.name} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e

    names = [io_spec.LOGITS, *io_spec.present_names(n_layer)]
    report = ValidationReport(dtype=dtype, tolerance=tolerance, steps=[], outputs=[OutputDiff(n) for n in names],
                              providers=session.get_providers())  # fmt: skip
    past = [np.zeros((len(PROMPT_LENGTHS), model.config.n_head, 0, model.config.head_dim), cache_np_dtype)
            for _ in range(2 * n_layer)]  # fmt: skip
    for step in ref:
        feed = {io_spec.INPUT_IDS: step.ids, io_spec.ATTENTION_MASK: step.mask, io_spec.POSITION_IDS: step.positions}
        feed.update(zip(io_spec.past_names(n_layer), past, strict=True))
        try:
            logits, *present = session.run(names, feed)
        except Exception as e:
            raise ValidationError(
                f"ONNX Runtime failed to run the exported {graph_path.name} at past {past[0].shape[2]} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            ) from e
        report.steps.append(f"past {past[0].shape[2]} + {step.ids.shape[1]}")
        # Logits of padding queries are meaningless (they attend to nothing): compare real tokens only.
        report.outputs[0].update(logits[step.real], step.logits[step.real])
        top_ours, top_ref = logits[step.real].argmax(-1), step.logits[step.real].argmax(-1)
        report.top1_agree += int((top_ours == top_ref).sum())
        report.top1_total += int(top_ref.size)
        for diff, ours, theirs in zip(report.outputs[1:], present, step.present, strict=True):
            diff.update(ours, theirs)
        past = present
    if dtype == "float16":
        report.cpu_float32_ops = cpu_float32_fallbacks(graph_path)
    report.seconds = time.perf_counter() - start
    if not report.passed:
        error = ValidationError(
            f"the {dtype} export differs from the reference beyond tolerance ({'; '.join(report.failures())}): "
            "see the report above; export in float32 or report a bug"
        )
        error.report = report
        raise error
    return report
