"""The one Tolerance of every check against a reference, and the one table of default bounds.

Semantics, the same for export validation, backend parity and the Polygraphy engine check: one compared
output (a logits tensor of one step, one layer's present cache) passes when

    max |a - b| <= atol + rtol * max |a|        (a: the reference, b: the output under test)

and the logits' top-1 token agrees with the reference's on at least `min_top1` of the compared positions.
The relative term is taken against the output's largest reference value, not elementwise: elementwise
ratios explode where the reference is near zero, while the output's scale carries over from random
test weights to real models with larger logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import check_dtype

LOSSY_WEIGHTS = ("int8", "int4")  # quantized weights in the fused graph (export/quantize.py)


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria: max|a - b| <= atol + rtol * max|a| per compared output, top-1 agreement >= min_top1."""

    atol: float
    rtol: float
    min_top1: float

    def bound(self, scale: float) -> float:
        """The largest accepted max|a - b| for an output whose largest |reference| value is `scale`."""
        return self.atol + self.rtol * scale

    def describe(self) -> str:
        """One line for reports: the rule with its numbers."""
        return f"max|a-b| <= {self.atol:g} + {self.rtol:g} * max|a| per output, top-1 >= {self.min_top1:.0%}"


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
# int8/int4 weights: lossy by design, so only a bound that catches a broken graph (errors of the order of
# the logits themselves) and top-1 agreement are meaningful.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4, min_top1=0.99),
    "tf32": Tolerance(atol=1e-2, rtol=5e-3, min_top1=0.95),
    "float16": Tolerance(atol=2e-2, rtol=1e-2, min_top1=0.9),
    "bfloat16": Tolerance(atol=5e-2, rtol=8e-2, min_top1=0.85),
    "int8": Tolerance(atol=1.0, rtol=0.5, min_top1=0.5),
    "int4": Tolerance(atol=1.0, rtol=0.5, min_top1=0.5),
}


def tolerance_for(dtype: str, weights: str = "float", tf32: bool = False) -> Tolerance:
    """The default tolerance for outputs of a `dtype` model compared with the reference. weights: "float",
    or "int8"/"int4" when the weights are quantized; tf32: float32 MatMuls ran on TF32 tensor cores."""
    if weights in LOSSY_WEIGHTS:
        return TOLERANCES[weights]
    return TOLERANCES["tf32" if tf32 and check_dtype(dtype) == "float32" else check_dtype(dtype)]
