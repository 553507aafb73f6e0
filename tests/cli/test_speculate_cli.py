"""codegen-generate --speculate: the same tokens as without, what it reports, and its refusals."""

from __future__ import annotations

import json

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
    # The first token comes from the prompt; each decode run adds its accepted drafts and the model's own token.
    assert spec["tokens"] == len(got["ids"]) == 1 + spec["runs"] + spec["accepted"]
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
