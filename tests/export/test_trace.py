"""Two independent constructions of the plain decoder agree: the graph built from the weights and the dynamo
trace of the reference give the same outputs on every test shape, and both equal the reference."""

from __future__ import annotations

import onnx
import pytest
import torch

from codegen_deploy.export.graph import IR_VERSION
from codegen_deploy.export.plain import write_plain_graph
from codegen_deploy.export.trace import write_traced_graph
from codegen_deploy.model.reference import CodeGen
from tests.conftest import TEST_CONFIGS
from tests.export.test_plain import CASES, max_differences, random_case, run_graph, run_reference, session

pytest.importorskip("onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TEST_CONFIGS))
def test_built_and_traced_graphs_agree_and_equal_the_reference(name, tmp_path):
    model = CodeGen.random(TEST_CONFIGS[name], seed=4, std=0.1)
    for folder in ("built", "traced"):
        (tmp_path / folder).mkdir()
    built = session(write_plain_graph(model, tmp_path / "built")[0])
    traced_path = write_traced_graph(model, tmp_path / "traced")[0]
    assert onnx.load(str(traced_path), load_external_data=False).ir_version == IR_VERSION
    traced = session(traced_path)
    for case in CASES:
        inputs = random_case(model.config, torch.float32, *case)
        ours = run_graph(built, model.config, *inputs)
        theirs = run_graph(traced, model.config, *inputs)
        ref = run_reference(model, *inputs)
        real = inputs[1][:, case[2] :].bool().numpy()  # [B, S]: padding queries attend to nothing
        assert max(max_differences(ours, theirs, real)) < 1e-5, case  # built vs traced
        assert max(max_differences(ours, ref, real)) < 1e-5, case
        assert max(max_differences(theirs, ref, real)) < 1e-5, case
