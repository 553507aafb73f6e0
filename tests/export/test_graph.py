"""The node and weight writer: aligned external data laid out as protobuf records, inlined without a copy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from codegen_deploy.artifacts import io_spec
from codegen_deploy.export.graph import ALIGN, IR_VERSION, inline_records, relocate_external_data, shared_weights
from codegen_deploy.export.plain import write_plain_graph
from codegen_deploy.model.reference import CodeGen
from tests.conftest import TEST_CONFIGS

ort = pytest.importorskip("onnxruntime")


def outputs(graph_path, config, seq: int = 3):
    """The graph's outputs for a fixed prompt (past 0)."""
    positions = np.arange(seq, dtype=np.int64)[None]  # [1, S]
    ids = (positions * 7 + 3) % config.vocab_size  # [1, S]
    feed = {io_spec.INPUT_IDS: ids, io_spec.ATTENTION_MASK: np.ones_like(ids), io_spec.POSITION_IDS: positions}
    empty = np.zeros((1, config.n_head, 0, config.head_dim), np.float32)
    feed.update((name, empty) for name in io_spec.past_names(config.n_layer))
    return ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"]).run(None, feed)


def test_data_file_is_aligned_records_that_inline_by_appending_the_graph(tmp_path):
    config = TEST_CONFIGS["tiny"]
    graph_path, data_path = write_plain_graph(CodeGen.random(config, seed=1, std=0.1), tmp_path)
    external = shared_weights(graph_path)
    offsets = {name: int(next(e.value for e in t.external_data if e.key == "offset")) for name, t in external.items()}
    assert len(offsets) >= 4 * config.n_layer + 2 and all(o % ALIGN == 0 for o in offsets.values())
    before = outputs(graph_path, config)
    data_bytes = data_path.stat().st_size

    inline_records(graph_path)
    assert not data_path.exists() and graph_path.stat().st_size > data_bytes  # the records plus the graph
    model = onnx.load(str(graph_path))  # one self-contained protobuf
    assert model.ir_version == IR_VERSION
    assert not [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in model.graph.initializer} >= set(offsets)
    onnx.checker.check_model(str(graph_path))
    for a, b in zip(outputs(graph_path, config), before, strict=True):
        np.testing.assert_array_equal(a, b)

    # The tensors' bytes kept their offsets: another graph can read them from the inlined file.
    raw = graph_path.read_bytes()
    for name, offset in offsets.items():
        tensor = next(t for t in model.graph.initializer if t.name == name)
        assert raw[offset : offset + len(tensor.raw_data)] == tensor.raw_data


def test_relocate_external_data_points_a_graph_at_another_file(tmp_path):
    config = TEST_CONFIGS["tiny"]
    graph_path, _ = write_plain_graph(CodeGen.random(config, seed=1, std=0.1), tmp_path)
    before = outputs(graph_path, config)
    (tmp_path / io_spec.DATA_FILE).rename(tmp_path / "moved.data")
    relocate_external_data(graph_path, io_spec.DATA_FILE, "moved.data")
    for a, b in zip(outputs(graph_path, config), before, strict=True):
        np.testing.assert_array_equal(a, b)
