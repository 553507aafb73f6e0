"""The one table of parity tolerances: per dtype, and float32 with TF32."""

from __future__ import annotations

from codegen_deploy.verify.parity import Tolerance


def test_tolerances_loosen_with_fewer_mantissa_bits():
    fp32, tf32 = Tolerance.for_dtype("float32"), Tolerance.for_dtype("float32", tf32=True)
    fp16, bf16 = Tolerance.for_dtype("float16"), Tolerance.for_dtype("bfloat16")
    assert fp32.atol < tf32.atol < fp16.atol < bf16.atol
    assert fp16.min_top1 >= bf16.min_top1
    assert Tolerance.for_dtype("float16", tf32=True) == fp16  # TF32 touches float32 MatMul only
