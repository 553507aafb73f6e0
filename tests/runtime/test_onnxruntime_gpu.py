"""ONNX Runtime on the CUDA provider: TF32 off for float32, fp16 parity, the fused graph against the plain one,
CUDA graphs on against off, and an fp16 export end to end. They skip with a reason without CUDAExecutionProvider.

The same session code runs on the CPU provider in test_onnxruntime_fused.py / test_onnxruntime_backend.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from codegen_deploy.runtime.backends import open_session
from codegen_deploy.verify.parity import compare_sessions
from codegen_deploy.verify.tolerance import tolerance_for

pytestmark = pytest.mark.gpu("onnxruntime")

PROMPTS = [[5, 17, 99, 3, 250, 8, 41], [7, 7, 300, 12], list(range(40, 70))]


@pytest.fixture(scope="module")
def fp16_fused_export(fp16_export, tiny_checkpoint, tmp_path_factory):
    """A copy of the fp16 export whose fused graph applies the rotary outside GQA (the CUDA variant)."""
    import torch

    from codegen_deploy.model.weights import load_checkpoint
    from codegen_deploy.pipeline import add_fused_graph

    folder = tmp_path_factory.mktemp("gpu") / "fp16-fused-graph-rotary"
    shutil.copytree(fp16_export, folder)
    add_fused_graph(folder, load_checkpoint(tiny_checkpoint, dtype=torch.float16), rotary="graph")
    return folder


def test_float32_on_cuda_without_tf32_matches_the_reference(fp32_export, tiny_checkpoint):
    with (
        open_session("torch", tiny_checkpoint) as reference,
        open_session("onnxruntime", fp32_export, providers="cuda", graph="plain") as cuda,
    ):
        report = compare_sessions(reference, cuda, PROMPTS, new_tokens=8, tolerance=tolerance_for("float32"))
    assert report.passed, report.table()


def test_float16_on_cuda_matches_the_reference(fp16_export, tiny_checkpoint):
    with (
        open_session("torch", tiny_checkpoint) as reference,
        open_session("onnxruntime", fp16_export, providers="cuda", graph="plain") as cuda,
    ):
        report = compare_sessions(reference, cuda, PROMPTS, new_tokens=8, tolerance=tolerance_for("float16"))
    assert report.passed, report.table()


def test_fused_graph_on_cuda_matches_the_plain_graph(fp16_fused_export):
    with (
        open_session("onnxruntime", fp16_fused_export, providers="cuda", graph="plain") as plain,
        open_session("onnxruntime", fp16_fused_export, providers="cuda", graph="fused") as fused,
    ):
        assert fused.device == "cuda"
        report = compare_sessions(plain, fused, PROMPTS, new_tokens=8, tolerance=tolerance_for("float16"))
    assert report.passed, report.table()


def test_fused_graph_on_cuda_keeps_left_padded_rows_exact(fp16_fused_export):
    ids = np.array([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]])
    mask = (np.arange(6)[None, :] >= np.array([[3], [0]])).astype(np.int64)
    with open_session("onnxruntime", fp16_fused_export, providers="cuda", graph="fused") as session:
        batch = [session.prefill(ids, mask)] + [session.step(np.array([5, 6])) for _ in range(3)]
        alone = [session.prefill(ids[:1, 3:])] + [session.step(np.array([5])) for _ in range(3)]
    np.testing.assert_allclose(np.stack(batch)[:, 0], np.stack(alone)[:, 0], atol=2e-2, rtol=2e-2)


def test_cuda_graphs_give_the_same_tokens(fp16_fused_export):
    def greedy(session, steps=24):
        outputs = []
        for prompt in ([PROMPTS[0]], [PROMPTS[1], PROMPTS[1]]):
            token = session.prefill(np.array(prompt)).argmax(-1)
            tokens = [token]
            for _ in range(steps):
                token = session.step(token).argmax(-1)
                tokens.append(token)
            outputs.append(np.stack(tokens))
        return outputs

    with open_session("onnxruntime", fp16_fused_export, providers="cuda", graph="fused") as eager:
        expected = greedy(eager)
    with open_session("onnxruntime", fp16_fused_export, providers="cuda", graph="fused", cuda_graph=True) as graphs:
        assert graphs.cuda_graph
        got = greedy(graphs)
        again = greedy(graphs)  # replays the captured graphs (new buffers for the second batch size)
    for e, g, a in zip(expected, got, again, strict=True):
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(a, e)


def test_a_gqa_rotary_fused_graph_is_refused_on_cuda(tiny_checkpoint, tmp_path):
    from codegen_deploy.errors import InputError
    from codegen_deploy.pipeline import export_model

    out = export_model(
        tiny_checkpoint,
        tmp_path / "gqa",
        dtype="float16",
        validate=False,
        fused_rotary="gqa",
        progress=lambda line: None,
    )
    with pytest.raises(InputError, match="rotary"):
        open_session("onnxruntime", out, providers="cuda", graph="fused")
    with open_session("onnxruntime", out, providers="cuda") as auto:  # auto takes the plain graph
        assert auto.name == "onnxruntime"


def test_fp16_export_end_to_end_on_a_gpu_machine(tiny_checkpoint, tmp_path):
    from codegen_deploy.artifacts.manifest import read_manifest
    from codegen_deploy.pipeline import export_model

    out = export_model(tiny_checkpoint, tmp_path / "fp16", dtype="float16", progress=lambda line: None)
    assert read_manifest(out)["fused_rotary"] == "graph"  # auto: the variant the CUDA provider runs
    with open_session("onnxruntime", out, providers="cuda", graph="plain") as session:
        assert np.isfinite(session.prefill(np.array([PROMPTS[0]]))).all()
    with open_session("onnxruntime", out, providers="cuda") as session:
        assert session.name == "onnxruntime-fused" and session.device == "cuda"
        assert np.isfinite(session.prefill(np.array([PROMPTS[0]]))).all()
