"""Export validation's parts that the pipeline tests do not reach: which ops ONNX Runtime's CPU provider runs
in float32, learnt without ORT's kernel registry (reading it kills GPU processes), and 'unknown' when it
cannot be learnt; which provider validates which dtype (bfloat16: CUDA), and bfloat16 arrays through ORT."""

from __future__ import annotations

import os
import signal

import numpy as np
import onnx
import pytest
import torch

from codegen_deploy.artifacts import io_spec
from codegen_deploy.artifacts.manifest import read_manifest
from codegen_deploy.model.weights import load_checkpoint
from codegen_deploy.runtime.ort import ort_value
from codegen_deploy.verify import validate
from codegen_deploy.verify.float32_ops import _weightless_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def fatal_kernel_registry(monkeypatch):
    """Make ORT's kernel registry kill the process as it does on GPU machines without TensorRT's libraries."""
    from onnxruntime.capi import _pybind_state

    def segfault():
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(_pybind_state, "get_all_opkernel_def", segfault)


def test_fp16_export_completes_with_the_float32_ops_known(fatal_kernel_registry, tiny_checkpoint, tmp_path):
    from codegen_deploy.pipeline import export_model

    lines: list[str] = []
    out = export_model(tiny_checkpoint, tmp_path / "fp16", dtype="float16", fused=False, progress=lines.append)
    ops = read_manifest(out)["validation"]["cpu_float32_ops"]
    # gelu_new is written with Tanh (standard ops); the float32 islands take float32 already
    assert {"MatMul", "Tanh"} <= set(ops) and "Softmax" not in ops
    assert not {"Reshape", "Transpose"} & set(ops)  # data movement computes nothing
    assert any("no float16 CPU kernel" in line and "MatMul" in line for line in lines)


def test_float32_ops_unknown_when_they_cannot_be_learnt(fp16_export, tiny_checkpoint, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("shape inference failed")

    monkeypatch.setattr("onnx.shape_inference.infer_shapes", fail)
    graph = fp16_export / io_spec.GRAPH_FILE
    assert validate.cpu_float32_fallbacks(graph) is None
    report = validate.validate_export(graph, load_checkpoint(tiny_checkpoint, dtype=torch.float16))
    assert report.passed and report.info["cpu_float32_ops"] is None
    assert "float32 between casts: unknown" in report.table()


def test_weightless_model_keeps_nodes_and_drops_weights(fp16_export):
    graph = fp16_export / io_spec.GRAPH_FILE
    model = _weightless_model(graph)
    original = onnx.load(str(graph), load_external_data=False).graph
    assert [n.name for n in original.node] == [n.name for n in model.graph.node][-len(original.node) :]
    assert model.ByteSize() < (fp16_export / io_spec.DATA_FILE).stat().st_size
    assert all(t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) for t in model.graph.initializer)


@pytest.fixture
def providers(monkeypatch):
    """Set the providers this onnxruntime offers: providers(["CUDAExecutionProvider", ...])."""
    import onnxruntime

    return lambda names: monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(names))


def test_bfloat16_validates_on_cuda_only_where_it_can_run(providers, monkeypatch):
    from codegen_deploy.errors import ValidationError

    assert validate.validation_providers("float16") == ["CPUExecutionProvider"]
    providers(["CPUExecutionProvider"])
    assert "no CUDAExecutionProvider" in validate.cuda_bfloat16_missing()
    with pytest.raises(ValidationError, match="CUDA provider, and this onnxruntime has no CUDAExecutionProvider"):
        validate.validation_providers("bfloat16")
    providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert validate.cuda_bfloat16_missing() == "no CUDA GPU is visible"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args: False)
    assert validate.cuda_bfloat16_missing() == "the GPU (Tesla V100) has no bfloat16 support"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args: True)
    assert validate.cuda_bfloat16_missing() is None
    assert validate.validation_providers("bfloat16") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_bfloat16_arrays_are_fed_and_fetched_through_io_binding():
    import ml_dtypes
    import onnxruntime as ort
    from onnx import TensorProto, helper

    bf16 = TensorProto.BFLOAT16
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", bf16, [2, 3])],
        [helper.make_tensor_value_info("y", bf16, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(-3, 3, dtype=np.float32).reshape(3, 2).T.astype(ml_dtypes.bfloat16) / 4  # not contiguous
    y = np.zeros((2, 3), ml_dtypes.bfloat16)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort_value(ort, x))
    binding.bind_ortvalue_output("y", ort_value(ort, y))
    session.run_with_iobinding(binding)
    np.testing.assert_array_equal(y, x)
