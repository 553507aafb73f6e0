"""The one dtype table: dtype names ("float32", "float16", "bfloat16", and the integer types of graph inputs)
and their torch, numpy and ONNX types.

Names are what users type (--dtype), what manifests record and what io_spec declares. bfloat16 has no
numpy type of numpy's own: ml_dtypes' is used, as onnx does.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

DTYPES = ("float32", "float16", "bfloat16")  # model dtypes: weights and KV cache
SUFFIX = {"float32": "", "float16": "-fp16", "bfloat16": "-bf16"}  # of default export folder names
# ONNX's TensorProto element types by name (the values of onnx.TensorProto.DataType, fixed by the ONNX spec).
_ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10, "bfloat16": 16}
_ONNX_NAMES = {v: k for k, v in _ONNX_TYPES.items()}


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
    """The name of a torch dtype, numpy dtype or scalar type, or name: torch.float16 -> "float16"."""
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return np.dtype(dtype).name
    return str(dtype).removeprefix("torch.")


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype of a name, torch dtype or numpy dtype (bfloat16: ml_dtypes')."""
    name = dtype_name(dtype)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def onnx_type(dtype) -> int:
    """ONNX's element type (TensorProto.FLOAT, ...) of a name, torch dtype or numpy dtype."""
    return _ONNX_TYPES[dtype_name(numpy_dtype(dtype))]


def onnx_type_name(elem_type: int) -> str:
    """The name of an ONNX element type: TensorProto.FLOAT16 (10) -> "float16"."""
    return _ONNX_NAMES.get(int(elem_type), f"onnx type {int(elem_type)}")


def to_numpy(t, dtype=None) -> np.ndarray:
    """A torch tensor as numpy on the host, converted to `dtype` (a name, torch or numpy dtype) when given;
    bfloat16 as ml_dtypes' bfloat16 (torch's own .numpy() refuses it)."""
    import torch

    a = t.detach().cpu()
    if dtype is not None:
        a = a.to(getattr(torch, dtype_name(numpy_dtype(dtype))))
    if a.dtype == torch.bfloat16:
        return a.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return a.numpy()
