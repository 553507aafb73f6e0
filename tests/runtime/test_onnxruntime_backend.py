"""The ONNX Runtime backend on a tiny export: same tokens as torch, IO binding, providers, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from codegen_deploy.artifacts import io_spec
from codegen_deploy.artifacts.manifest import FusedGraph, read_manifest, write_manifest
from codegen_deploy.errors import ArtifactError, InputError
from codegen_deploy.runtime.backends import open_session
from codegen_deploy.runtime.backends.onnxruntime import OrtSession, choose_providers
from codegen_deploy.runtime.generate import generate
from codegen_deploy.verify.parity import compare_sessions
from codegen_deploy.verify.tolerance import Tolerance

PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self, item):\n        self"]


@pytest.fixture(scope="module")
def torch_session(tiny_checkpoint):
    return open_session("torch", tiny_checkpoint)


@pytest.fixture(scope="module")
def ort_session(tiny_export):
    return open_session("onnxruntime", tiny_export, threads=1)


def test_backends_give_identical_greedy_tokens(torch_session, ort_session, tiny_tokenizer):
    assert isinstance(ort_session, OrtSession) and ort_session.providers == ["CPUExecutionProvider"]
    a = generate(torch_session, tiny_tokenizer, PROMPTS, max_new_tokens=24)
    b = generate(ort_session, tiny_tokenizer, PROMPTS, max_new_tokens=24)
    assert [c.ids for c in a.completions] == [c.ids for c in b.completions]
    assert [c.text for c in a.completions] == [c.text for c in b.completions]


def test_backends_give_identical_seeded_samples(torch_session, ort_session, tiny_tokenizer):
    options = {"max_new_tokens": 16, "temperature": 0.8, "top_k": 40, "seed": 4}
    a = generate(torch_session, tiny_tokenizer, PROMPTS[2], **options)
    b = generate(ort_session, tiny_tokenizer, PROMPTS[2], **options)
    assert a.ids == b.ids


def test_naive_loop_and_io_binding_agree(tiny_export, ort_session):
    naive = OrtSession(tiny_export, io_binding=False, threads=1)
    ids = np.array([[3, 4, 5, 6, 7], [0, 0, 8, 9, 10]])
    mask = (np.arange(5) >= np.array([[0], [2]])).astype(np.int64)
    np.testing.assert_allclose(naive.prefill(ids, mask), ort_session.prefill(ids, mask), atol=1e-5)
    for t in range(4):
        ids = np.array([t, t + 1])
        np.testing.assert_allclose(naive.step(ids), ort_session.step(ids), atol=1e-5)
    # The bound cache stays an OrtValue whose length grows with each step.
    assert ort_session._cache[0].shape() == [2, 4, 9, 16]


def test_parity_report_torch_vs_onnxruntime(torch_session, ort_session, tiny_tokenizer):
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    report = compare_sessions(torch_session, ort_session, prompts, new_tokens=8)
    assert report.passed and report.max_abs < 1e-4 and report.identical == 3
    assert report.top1 == 1.0 and report.greedy_agreement == 1.0
    assert "PASSED" in report.table() and json.dumps(report.to_dict())
    exact = Tolerance(atol=0.0, rtol=0.0, min_top1=1.0)
    strict = compare_sessions(torch_session, ort_session, prompts[:1], new_tokens=4, tolerance=exact)
    assert not strict.passed and "FAILED" in strict.table()


def test_providers_are_checked():
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="not available"):
        choose_providers(["NoSuchExecutionProvider"])


def test_broken_export_folders_are_refused(tiny_export, tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json"):
        OrtSession(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    with open(copy / "decoder.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match="truncated or changed"):
        OrtSession(copy)


def test_fused_graph_hook(tiny_export):
    assert FusedGraph.of({"files": {"decoder.onnx": {}}}) is None
    assert FusedGraph.of({"files": {"decoder_fused.onnx": {}}}).graph_file == "decoder_fused.onnx"
    assert FusedGraph.of({"fused_graph_file": "x.onnx"}).graph_file == "x.onnx"
    with pytest.raises(InputError, match="no fused graph"):
        open_session("onnxruntime", tiny_export, graph="fused")


def test_open_session_picks_the_fused_graph_when_listed(
    tiny_export, tiny_model, tiny_tokenizer, torch_session, tmp_path
):
    from codegen_deploy.pipeline import add_fused_graph
    from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession

    folder = tmp_path / "with-fused"
    shutil.copytree(tiny_export, folder)
    add_fused_graph(folder, model=tiny_model)
    fused = open_session("onnxruntime", folder, threads=1)
    assert isinstance(fused, FusedOrtSession)
    assert isinstance(open_session("onnxruntime", folder, graph="plain"), OrtSession)
    assert isinstance(open_session("onnxruntime", folder, io_binding=False), OrtSession)
    a = generate(torch_session, tiny_tokenizer, PROMPTS, max_new_tokens=12)
    b = generate(fused, tiny_tokenizer, PROMPTS, max_new_tokens=12)
    assert [c.ids for c in a.completions] == [c.ids for c in b.completions]


def test_cuda_provider_options_turn_tf32_off_unless_asked():
    from codegen_deploy.runtime.backends.onnxruntime import provider_options

    cuda, cpu = provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], device_id=1)
    assert cuda == {"device_id": "1", "use_tf32": "0", "enable_cuda_graph": "0"}
    assert cpu == {}
    (cuda,) = provider_options(["CUDAExecutionProvider"], tf32=True, cuda_graph=True)
    assert cuda["use_tf32"] == "1" and cuda["enable_cuda_graph"] == "1"
    with pytest.raises(InputError, match="negative"):
        provider_options(["CUDAExecutionProvider"], device_id=-1)


def test_device_options_reach_the_backends_that_take_them():
    from codegen_deploy.runtime.backends import backend_options

    ort = backend_options("onnxruntime", device_id=1, tf32=True, cuda_graph=True, device="cuda")
    assert ort == {"device_id": 1, "tf32": True, "cuda_graph": True}
    assert backend_options("torch", device="cuda:1", tf32=True) == {"device": "cuda:1"}


def test_cuda_graphs_need_a_fused_graph(tiny_export):
    with pytest.raises(InputError, match="CUDA graphs need a fused graph"):
        open_session("onnxruntime", tiny_export, cuda_graph=True)


def test_onnxruntime_session_refuses_a_graph_with_other_names(tiny_export, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_export, folder)
    model = onnx.load(str(folder / io_spec.GRAPH_FILE))
    for node in model.graph.node:  # rename the logits output everywhere
        node.output[:] = ["scores" if o == io_spec.LOGITS else o for o in node.output]
    model.graph.output[0].name = "scores"
    onnx.save(model, str(folder / io_spec.GRAPH_FILE))
    manifest = read_manifest(folder, verify="none")
    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("format_version", "files")})
    with pytest.raises(ArtifactError, match=r"outputs \(missing logits, unexpected scores\): export it again"):
        OrtSession(folder)
