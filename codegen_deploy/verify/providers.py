"""Which ONNX Runtime execution providers validate an export of each dtype, and what a machine lacks for bfloat16."""

from __future__ import annotations

import torch

from ..errors import ValidationError
from ..runtime.ort import cuda_provider_available


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
