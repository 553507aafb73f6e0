"""codegen-generate --speculate: the same tokens as without, what it reports, and its refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from codegen_deploy.cli import generate as generate_cli

PROMPT = "x = 1\nx = 1\nx = 1\nx ="


def _json(args, capsys) -> dict:
    assert generate_cli.main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["lookup", "draft", "auto"])
def test_speculation_gives_the_tokens_of_plain_decoding(fp32_export, capsys, mode):
    base = [str(fp32_export), PROMPT, "--max-new-tokens", "24", "--threads", "1", "--json"]
    plain = _json([*base, "--speculate", "off"], capsys)
    assert plain["speculation"] is None
    extra = ["--draft", str(fp32_export)] if mode == "draft" else []  # the model drafting for itself agrees
    got = _json([*base, "--speculate", mode, *extra], capsys)
    assert got["ids"] == plain["ids"] and got["text"] == plain["text"]
    spec = got["speculation"]
    # Each run of the model (the prompt's first) makes the model's own token and the drafts it accepted.
    assert spec["tokens"] == len(got["ids"]) == spec["runs"] + spec["accepted"]
    if mode == "draft":
        # The model drafting for itself: every draft agrees, but a draft costs a whole step, so it drafts only
        # when it probes (whether it drafts at all is the runtime tests' matter).
        assert spec["accepted"] == spec["drafted"] and spec["drafted"] <= 2


def test_speculation_refusals_are_one_line(fp32_export, tiny_export, capsys):
    sampled = [str(fp32_export), PROMPT, "--temperature", "0.7", "--speculate", "lookup"]
    assert generate_cli.main(sampled) == 2
    err = capsys.readouterr().err
    assert "greedy" in err and "opened" not in err  # refused before the model is loaded
    assert generate_cli.main([str(fp32_export), PROMPT, "--speculate", "draft"]) == 2
    assert "--draft EXPORT" in capsys.readouterr().err
    # The plain graph has no row slots: explicit lookup is refused, auto decodes plainly.
    plain_graph = [str(tiny_export), PROMPT, "--max-new-tokens", "4"]
    assert generate_cli.main([*plain_graph, "--speculate", "lookup"]) == 2
    assert "multi-token row steps" in capsys.readouterr().err
    assert generate_cli.main([*plain_graph, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["speculation"] is None


@pytest.fixture(scope="module")
def int8_export(tiny_checkpoint, tmp_path_factory):
    from codegen_deploy.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-int8"
    return export_model(tiny_checkpoint, out, validate=False, fused_weights="int8", progress=lambda line: None)


def test_auto_decodes_an_int8_export_plainly_and_lookup_says_what_it_may_change(int8_export, capsys):
    """A check rounds otherwise than plain steps, which parts quantized answers: auto does not draft there, and
    asking for it by name prints a note."""
    base = [str(int8_export), PROMPT, "--max-new-tokens", "8", "--threads", "1", "--json"]
    assert _json(base, capsys)["speculation"] is None
    assert generate_cli.main([*base, "--speculate", "lookup"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["speculation"] is not None
    assert "note: on this int8 export a speculative check rounds otherwise" in err and "--speculate off" in err


def _swap_two_tokens(model: dict) -> None:
    vocab = model["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _drop_a_merge(model: dict) -> None:
    model["merges"] = model["merges"][:-1]


@pytest.mark.parametrize("change", [_swap_two_tokens, _drop_a_merge])
def test_a_draft_with_another_tokenizer_of_the_same_size_is_refused(fp32_export, tmp_path, capsys, change):
    from codegen_deploy.model.tokenizer import load_tokenizer

    draft = tmp_path / "draft"
    shutil.copytree(fp32_export, draft)
    body = json.loads((draft / "tokenizer.json").read_text())
    change(body["model"])
    (draft / "tokenizer.json").write_text(json.dumps(body))
    assert load_tokenizer(draft).vocab_size == load_tokenizer(fp32_export).vocab_size
    assert generate_cli.main([str(fp32_export), PROMPT, "--draft", str(draft), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the draft model {draft} has another tokenizer than the model")


def test_a_draft_model_is_used_or_refused_never_ignored(fp32_export, tiny_export, capsys):
    # Sampling cannot speculate: with --draft (and the default auto) that is said before the model loads.
    sampled = [str(fp32_export), PROMPT, "--temperature", "0.7", "--draft", str(fp32_export)]
    assert generate_cli.main(sampled) == 2
    err = capsys.readouterr().err
    assert "greedy" in err and "opened" not in err
    # The plain graph has no row slots: auto without --draft decodes plainly, with it it is refused.
    plain_graph = [str(tiny_export), PROMPT, "--max-new-tokens", "4", "--draft", str(fp32_export)]
    assert generate_cli.main(plain_graph) == 2
    assert "multi-token row steps" in capsys.readouterr().err


def test_the_summary_says_when_nothing_was_drafted(fp32_export, capsys):
    # Two tokens: the prompt's run makes the first, one plain step the last (no room left for a draft).
    args = [str(fp32_export), PROMPT, "--max-new-tokens", "2", "--speculate", "lookup", "--threads", "1"]
    assert generate_cli.main(args) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "speculation (lookup)" in x]
    assert line.endswith(
        "speculation (lookup): no tokens drafted (the drafter found nothing, or drafting was not "
        "expected to pay): every token came from a plain step"
    )
