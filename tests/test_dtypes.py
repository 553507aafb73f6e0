"""The one dtype table against onnx's and torch's own mappings."""

import numpy as np
import onnx
import pytest
import torch

from codegen_deploy.dtypes import DTYPES, dtype_name, numpy_dtype, onnx_type, onnx_type_name, to_numpy
from codegen_deploy.errors import InputError

NAMES = [*DTYPES, "int64", "int32", "uint8", "int8", "bool"]


@pytest.mark.parametrize("name", NAMES)
def test_onnx_types_are_onnx_own(name):
    assert onnx_type(name) == onnx.helper.np_dtype_to_tensor_dtype(numpy_dtype(name))
    assert onnx_type_name(onnx_type(name)) == name
    assert onnx.helper.tensor_dtype_to_np_dtype(onnx_type(name)) == numpy_dtype(name)


@pytest.mark.parametrize("name", DTYPES)
def test_to_numpy_keeps_the_values(name):
    t = torch.tensor([1.5, -2.25, 3.0])
    a = to_numpy(t, name)
    assert a.dtype == numpy_dtype(name) and onnx_type(getattr(torch, name)) == onnx_type(name)
    np.testing.assert_array_equal(a.astype(np.float32), t.to(getattr(torch, name)).float().numpy())


def test_unknown_names_are_refused():
    from codegen_deploy.dtypes import check_dtype

    with pytest.raises(InputError, match="choose one of float32, float16, bfloat16"):
        check_dtype("float64")
    assert onnx_type_name(11) == "onnx type 11"  # double: not a type this toolkit writes


def test_names_of_every_kind_of_dtype():
    for dtype in ("float16", torch.float16, np.float16, np.dtype("float16")):
        assert dtype_name(dtype) == "float16"
    assert numpy_dtype(np.float32).itemsize == 4
