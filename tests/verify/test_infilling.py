"""Fill-in-the-middle exact match: the gap plan, and the whole path through a session that writes a chosen middle
(the right one scores, a wrong one does not)."""

from __future__ import annotations

import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.verify.infilling import Gap, answer, matches, plan_gaps, run_infill, similarity

TEXT = "".join(f"def f{i}(x):\n    y = x * {i}\n    return y + {i}\n\n" for i in range(30))


def test_gaps_are_contiguous_cuts_of_the_text_half_of_each_kind():
    gaps = plan_gaps([("a.py", TEXT)], 40, seed=3)
    assert [g.kind for g in gaps[:4]] == ["single-line", "multi-line"] * 2
    for g in gaps:
        assert g.prefix + g.middle + g.suffix in TEXT
        lines = g.middle.count("\n")
        assert lines == 1 if g.kind == "single-line" else 2 <= lines <= 4
    assert gaps == plan_gaps([("a.py", TEXT)], 40, seed=3) != plan_gaps([("a.py", TEXT)], 40, seed=4)


def test_gap_counts_are_bounded_and_code_is_needed():
    with pytest.raises(InputError, match="between 1 and"):
        plan_gaps([("a.py", TEXT)], 0)
    with pytest.raises(InputError, match="no line of code"):
        plan_gaps([("a.txt", "\n\n# only a comment\n")], 3)


def test_exact_match_ignores_surrounding_whitespace_only():
    assert matches("    y = x * 2\n", "    y = x * 2") and matches(" y = x*2 ", "y = x*2")
    assert not matches("y = x * 3", "y = x * 2")


def test_a_single_line_answer_is_its_first_line_and_similarity_grades_the_rest():
    line, block = Gap("a", "single-line", "", "    y = 1\n", ""), Gap("a", "multi-line", "", "a\nb\n", "")
    assert answer("\n    y = 1\n    z = 2\n", line) == "    y = 1"
    assert answer("a\nb\nc\n", block) == "a\nb\nc\n"
    assert similarity("y = x * 2", "y = x * 2") == 1.0
    assert 0.5 < similarity("y = x * 3", "y = x * 2") < 1.0 and similarity("", "y = 2") == 0.0


@pytest.mark.parametrize(("written", "score"), [(None, 1.0), ("    pass\n", 0.0)], ids=["right", "wrong"])
def test_a_session_that_writes_the_middle_scores_it(scripted_session, codegen2_checkpoint, written, score):
    tokenizer = load_tokenizer(codegen2_checkpoint)
    gaps = plan_gaps([("a.py", TEXT)], 4, seed=1)
    results = []
    for gap in gaps:
        script = [*tokenizer.encode(gap.middle if written is None else written), tokenizer.fim.eom]
        session = scripted_session([script], tokenizer.vocab_size, n_positions=1024)
        results.append(run_infill(session, tokenizer, [gap], "scripted", max_new_tokens=32))
    assert all(r.exact == {gap.kind: score} for r, gap in zip(results, gaps, strict=True))
    assert all((r.similarity[gap.kind] == 1.0) == (score == 1.0) for r, gap in zip(results, gaps, strict=True))


def test_a_model_without_fill_in_the_middle_is_refused(scripted_session, tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    session = scripted_session([[1]], tokenizer.vocab_size)
    with pytest.raises(InputError, match="cannot fill in the middle"):
        run_infill(session, tokenizer, plan_gaps([("a.py", TEXT)], 2), "x")
