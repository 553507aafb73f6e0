"""The one tolerance table: an entry per precision, looser with fewer mantissa bits, and bounds that pass the
errors measured on the 350M shape."""

from __future__ import annotations

import dataclasses

import pytest

from codegen_deploy.dtypes import DTYPES
from codegen_deploy.errors import InputError
from codegen_deploy.verify.tolerance import LOSSY_WEIGHTS, TOLERANCES, Tolerance, tolerance_for


def test_every_precision_has_an_entry():
    assert set(TOLERANCES) == {*DTYPES, "tf32", *LOSSY_WEIGHTS}


def test_lookup_by_dtype_weights_and_tf32():
    assert tolerance_for("float16") is TOLERANCES["float16"]
    assert tolerance_for("float16", weights="int4") is TOLERANCES["int4"]
    assert tolerance_for("float32", tf32=True) is TOLERANCES["tf32"]
    assert tolerance_for("float16", tf32=True) is TOLERANCES["float16"]  # TF32 touches float32 MatMul only
    with pytest.raises(InputError, match="unknown dtype 'int3'"):
        tolerance_for("int3")


def test_tolerances_loosen_with_fewer_mantissa_bits():
    order = [tolerance_for("float32"), tolerance_for("float32", tf32=True), tolerance_for("float16")]
    order.append(tolerance_for("bfloat16"))
    bounds = [t.bound(1.0) for t in order]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    assert [t.min_top1 for t in order] == sorted((t.min_top1 for t in order), reverse=True)


def test_bound_is_atol_plus_rtol_times_the_scale():
    t = Tolerance(atol=1e-3, rtol=1e-2, min_top1=0.9)
    assert t.bound(10.0) == pytest.approx(1e-3 + 1e-1)
    assert "max|a-b| <= 0.001 + 0.01 * max|a|" in t.describe() and "90%" in t.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.atol = 1.0


@pytest.mark.parametrize(
    ("dtype", "tf32", "max_abs", "scale"),
    [
        ("float16", False, 5.2e-3, 3.06),  # logits, max rel 1.7e-3 on the 350M shape
        ("float16", False, 5.9e-3, 0.0),  # max abs on CUDA, whatever the scale
        ("float32", False, 4e-6, 0.0),
        ("float32", True, 2.0e-3, 0.0),
    ],
)
def test_measured_errors_pass(dtype, tf32, max_abs, scale):
    """Errors measured against the reference on the 350M shape stay within the bound with room to spare."""
    assert 3 * max_abs <= tolerance_for(dtype, tf32=tf32).bound(scale)
