"""The one Tolerance of every check against a reference, and the one table of default bounds.

Semantics, the same for export validation, backend parity and the Polygraphy engine check: one compared
output (a logits tensor of one step, one layer's present cache) passes when

    max |a - b| <= atol + rtol * max |a|        (a: the reference, b: the output under test)

and the logits' top-1 token agrees with the reference's on at least `min_top1` of the compared positions.
The relative term is taken against the output's largest reference value, not elementwise: elementwise
ratios explode where the reference is near zero, while the output's scale carries over from random
test weights to real models with larger logits.

Lossy weights (int8, int4) add a bound on the logits' error relative to their spread, pooled over every
compared position and vocabulary entry,

    spread error = sqrt(sum (d - mean d)^2 / sum (a - mean a)^2)    (d = b - a; means over the vocabulary)

0 for an exact copy, 1 for logits scaled by 2 or flattened to a constant, whatever the model's margins. Top-1
agreement is no criterion there: a random-weight model's logits are nearly flat, so top-1 flips on tiny,
harmless errors (a coin flip on a few positions), while the spread error measures every logit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import check_dtype

LOSSY_WEIGHTS = ("int8", "int4")  # quantized weights in the fused graph (export/quantize.py)


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria: max|a - b| <= atol + rtol * max|a| per compared output, top-1 agreement >= min_top1, and
    (where set) the logits' spread error <= max_spread_error."""

    atol: float
    rtol: float
    min_top1: float
    max_spread_error: float | None = None

    def bound(self, scale: float) -> float:
        """The largest accepted max|a - b| for an output whose largest |reference| value is `scale`."""
        return self.atol + self.rtol * scale

    def describe(self) -> str:
        """One line for reports: the rule with its numbers."""
        top1 = f"top-1 >= {self.min_top1:.0%}" if self.min_top1 > 0 else "top-1 not checked"
        text = f"max|a-b| <= {self.atol:g} + {self.rtol:g} * max|a| per output, {top1}"
        if self.max_spread_error is not None:
            text += f", logits' error <= {self.max_spread_error:g} of their spread"
        return text

    def to_dict(self) -> dict:
        """The bounds as JSON (max_spread_error only where set)."""
        out = {"atol": self.atol, "rtol": self.rtol, "min_top1": self.min_top1}
        return out | ({"max_spread_error": self.max_spread_error} if self.max_spread_error is not None else {})


# Keyed by the precision of what is compared with the reference: the model dtype, "tf32" for a float32 model
# whose MatMuls ran on TF32 tensor cores (CUDA), or the quantized weights' type.
#
# float32: measured max abs ~2e-6 to 4e-6 (CPU, and CUDA with TF32 off) on the 350M shape.
# tf32: MatMul inputs rounded to 10 mantissa bits: measured 2.0e-3 max abs on the 350M shape on an H200.
# float16: ORT's CPU provider computes MatMul, Add and Gelu in float32 between casts where PyTorch rounds in
# fp16: measured on the 350M shape max rel 1.7e-3 (logits) and 1.8e-3 (cache), logits max abs 5.2e-3 (CPU)
# and 5.9e-3 (CUDA); atol alone is 3x the largest of those, the relative term ~6x, and top-1 may flip only
# on near-ties. bfloat16 (not measured: ORT's CPU provider cannot run it) has 3 mantissa bits
# fewer than float16: 8x its relative bound.
# The bound on the spread error of quantized weights. Measured by the export's fused check (4 prompts x 8 steps)
# on random weights, correct / every scale doubled: int8 0.030-0.048 / 1.11-1.21 on the test shapes (tiny,
# demo; std 0.1), 0.055 / 1.15 on the 350M shape (std 0.02); int4 0.21-0.33 / 1.17-1.27, 0.35 / 1.25 (top-1
# agreement of those correct int4 graphs: 34-81%). Each bound is ~1.7x the worst correct graph and half the
# best broken one.
SPREAD_BOUND = {"int8": 0.25, "int4": 0.6}

# int8/int4 weights: lossy by design. max abs catches a graph that is wildly off; the spread error (see the
# module docstring) tells a correct quantization from a broken one: SPREAD_BOUND above.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4, min_top1=0.99),
    "tf32": Tolerance(atol=1e-2, rtol=5e-3, min_top1=0.95),
    "float16": Tolerance(atol=2e-2, rtol=1e-2, min_top1=0.9),
    "bfloat16": Tolerance(atol=5e-2, rtol=8e-2, min_top1=0.85),
    "int8": Tolerance(atol=1.0, rtol=0.5, min_top1=0.0, max_spread_error=SPREAD_BOUND["int8"]),
    "int4": Tolerance(atol=1.0, rtol=0.5, min_top1=0.0, max_spread_error=SPREAD_BOUND["int4"]),
}


def tolerance_for(dtype: str, weights: str = "float", tf32: bool = False) -> Tolerance:
    """The default tolerance for outputs of a `dtype` model compared with the reference. weights: "float",
    or "int8"/"int4" when the weights are quantized; tf32: float32 MatMuls ran on TF32 tensor cores."""
    if weights in LOSSY_WEIGHTS:
        return TOLERANCES[weights]
    return TOLERANCES["tf32" if tf32 and check_dtype(dtype) == "float32" else check_dtype(dtype)]
