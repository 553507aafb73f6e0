"""Perplexity and KL divergence of a model against a reference: the window plan, the scores against the
reference model's own forward pass, saved log-probabilities, and the power to tell a broken model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen_deploy.cli.eval import main as eval_main
from codegen_deploy.errors import InputError
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.runtime import open_session
from codegen_deploy.verify.quality import SavedLogProbs, measure, plan_windows, read_texts, tokenize_texts

DOC = [5, 17, 3, 99, 42, 7, 250, 31, 8, 64, 12, 13, 77, 91, 4, 150, 33, 2, 19, 200, 21, 22, 23, 24, 25]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=4),
    context=st.integers(2, 20),
    data=st.data(),
)
def test_every_token_but_a_documents_first_is_scored_once_after_the_overlap(lengths, context, data):
    stride = data.draw(st.integers(1, context - 1))
    windows = plan_windows(lengths, context, stride)
    for doc, n in enumerate(lengths):
        scored = [t for w in windows if w.document == doc for t in range(w.first, w.end)]
        assert sorted(scored) == list(range(1, n)), "each token after the first exactly once"
        for w in (w for w in windows if w.document == doc):
            assert w.end - w.start <= context and w.start < w.first
            assert w.first - w.start >= min(context - stride, w.first), "the overlap precedes every score"


def test_a_stride_that_leaves_no_overlap_is_refused():
    with pytest.raises(InputError, match="less than the context"):
        plan_windows([10], 4, 4)


def reference_nll(model: CodeGen, ids: list[int], token: int, context: int, stride: int) -> float:
    """The NLL of ids[token] as the plan scores it, computed independently: the window that scores it is the
    first one, starting at a multiple of the stride, that reaches past it."""
    start = max(0, math.ceil((token + 1 - context) / stride)) * stride
    with torch.no_grad():
        logits = model(torch.tensor([ids[start : token + 1]]))[0][0, -2]
    return float(-torch.log_softmax(logits.double(), -1)[ids[token]])


@pytest.fixture(params=["torch", "onnxruntime"])
def session(request, tiny_checkpoint, fp32_export):
    path = tiny_checkpoint if request.param == "torch" else fp32_export
    with open_session(request.param, path, threads=1) as s:
        yield s


@pytest.mark.parametrize(("context", "stride"), [(64, 32), (8, 4), (8, 7), (5, 1)])
def test_perplexity_is_the_reference_forward_pass_scored_in_windows(session, tiny_model, context, stride):
    report = measure(session, [DOC, DOC[:9]], context, stride)
    nll = [reference_nll(tiny_model, DOC, t, context, stride) for t in range(1, len(DOC))]
    nll += [reference_nll(tiny_model, DOC[:9], t, context, stride) for t in range(1, 9)]
    assert report.tokens == len(nll)
    assert report.perplexity == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_a_model_against_itself_has_no_divergence(session, tiny_checkpoint):
    with open_session("torch", tiny_checkpoint, threads=1) as reference:
        report = measure(session, [DOC], 8, 4, reference)
    assert report.kl_max < 1e-9 and report.top1_agreement == 1.0
    assert abs(report.nll_delta) < 1e-6
    assert report.reference_perplexity == pytest.approx(report.perplexity, rel=1e-6)


@pytest.fixture(scope="module")
def broken_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its last layer's MLP output weights scaled by 1.1: a subtly broken model."""
    from codegen_deploy.model.weights import load_checkpoint, save_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        model.blocks[-1].mlp.fc_out.weight.mul_(1.1)
    out = tmp_path_factory.mktemp("broken")
    save_checkpoint(model, out)
    for name in ("tokenizer.json",):
        (out / name).write_bytes((tiny_checkpoint / name).read_bytes())
    return out


def test_divergence_tells_quantization_from_a_broken_model(tiny_checkpoint, broken_checkpoint, tiny_tokenizer):
    """int8 weights cost a little KL; a model with one matrix 10 % off costs far more: the measure separates them."""
    texts = read_texts(None)[:3]
    documents = tokenize_texts(tiny_tokenizer, texts, 2000)
    with (
        open_session("torch", tiny_checkpoint, threads=1) as reference,
        open_session("torch", broken_checkpoint, threads=1) as broken,
    ):
        bad = measure(broken, documents, 128, 64, reference)
        same = measure(reference, documents, 128, 64, reference)
    assert same.kl_mean < 1e-9
    assert bad.kl_mean > 1e-4 and bad.top1_agreement < 0.99


def test_saved_log_probabilities_stand_in_for_the_reference(session, tiny_checkpoint, tmp_path):
    with open_session("torch", tiny_checkpoint, threads=1) as reference:
        live = measure(session, [DOC, DOC[3:]], 8, 4, reference)
        measure(reference, [DOC, DOC[3:]], 8, 4, save_to=tmp_path / "saved", names=("ref", None))
    saved = SavedLogProbs(tmp_path / "saved")
    again = measure(session, [DOC, DOC[3:]], 8, 4, saved)
    assert again.reference_perplexity == pytest.approx(live.reference_perplexity, rel=1e-6)
    assert again.kl_mean == pytest.approx(live.kl_mean, abs=1e-6)
    assert again.top1_agreement == live.top1_agreement
    with pytest.raises(InputError, match="other tokens or windows"):
        measure(session, [DOC], 8, 4, saved)


def test_a_failed_save_leaves_nothing(session, tmp_path):
    class Stop(Exception):
        pass

    def progress(line):
        raise Stop

    with pytest.raises(Stop):
        measure(session, [DOC], 8, 4, save_to=tmp_path / "saved", progress=progress, every=0)
    assert list(tmp_path.iterdir()) == []


def test_the_default_texts_are_the_held_out_standard_library(tiny_tokenizer):
    from codegen_deploy.model.train import stdlib_files

    texts = read_texts(None)
    assert [name for name, _ in texts] == [str(p) for p in stdlib_files("heldout")][: len(texts)]
    documents = tokenize_texts(tiny_tokenizer, texts, 500)
    assert sum(len(d) for d in documents) <= 500


def test_eval_cli_reports_json_and_refuses_bad_input_in_one_line(fp32_export, tiny_checkpoint, tmp_path, capsys):
    import json

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 8}) + "\n" + json.dumps("import os\n" * 9))
    argv = [str(fp32_export), "--reference", str(tiny_checkpoint), "--texts", str(texts), "--context", "32"]
    assert eval_main([*argv, "--json", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 2 and report["stride"] == 16 and report["top1_agreement"] == 1.0
    for bad, message in [
        (["--stride", "32"], "less than the context"),
        (["--texts", str(tmp_path / "none*.py")], "no text matches"),
        (["--task", "humaneval", "--save-logprobs", str(tmp_path / "x")], "goes with --task perplexity"),
        (["--context", "100000"], "more than the model holds"),
    ]:
        assert eval_main([*argv, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and message in err[-1], err
