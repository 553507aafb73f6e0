"""Export validation's parts that the pipeline tests do not reach: which ops ONNX Runtime's CPU provider runs
in float32, learnt without ORT's kernel registry (reading it kills GPU processes), and 'unknown' when it
cannot be learnt."""

from __future__ import annotations

import os
import signal

import onnx
import pytest
import torch

from codegen_deploy.artifacts import io_spec
from codegen_deploy.artifacts.manifest import read_manifest
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.verify import validate

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
    report = validate.validate_export(graph, CodeGen.from_pretrained(tiny_checkpoint, dtype=torch.float16))
    assert report.passed and report.info["cpu_float32_ops"] is None
    assert "float32 between casts: unknown" in report.table()


def test_weightless_model_keeps_nodes_and_drops_weights(fp16_export):
    graph = fp16_export / io_spec.GRAPH_FILE
    model = validate._weightless_model(graph)
    original = onnx.load(str(graph), load_external_data=False).graph
    assert [n.name for n in original.node] == [n.name for n in model.graph.node][-len(original.node) :]
    assert model.ByteSize() < (fp16_export / io_spec.DATA_FILE).stat().st_size
    assert all(t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) for t in model.graph.initializer)
