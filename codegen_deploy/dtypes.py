"""The one mapping between dtype names ("float32", "float16", "bfloat16") and torch / numpy / ONNX dtypes.

Names are what users type (--dtype), what manifests record and what io_spec declares.
"""

from __future__ import annotations

from .errors import InputError

DTYPES = ("float32", "float16", "bfloat16")
SUFFIX = {"float32": "", "float16": "-fp16", "bfloat16": "-bf16"}  # of default export folder names


def check_dtype(name: str) -> str:
    """`name` if it is a supported model dtype, else a one-line InputError."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str):
    """The torch dtype called `name`."""
    import torch

    return getattr(torch, check_dtype(name))


def dtype_name(dtype) -> str:
    """The name of a torch dtype, numpy dtype or name: torch.float16 -> "float16"."""
    return str(dtype).removeprefix("torch.")
