"""Parity of two sessions on scripted logits: greedy match read off teacher-forced steps, truncation, errors."""

from __future__ import annotations

import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.verify.parity import compare_sessions
from codegen_deploy.verify.tolerance import Tolerance


def test_identical_sessions_pass(scripted_session):
    a, b = scripted_session([[5, 6, 7, 8]], 16), scripted_session([[5, 6, 7, 8]], 16)
    report = compare_sessions(a, b, [[1, 2, 3]], new_tokens=4, names=("a", "b"))
    assert report.passed and report.max_abs == 0 and report.identical == 1 and report.greedy_agreement == 1.0
    assert report.rows[0].detail["tokens_a"] == [5, 6, 7, 8]
    assert [list(ids[0]) for ids in b.fed] == [[1, 2, 3], [5], [6], [7]]  # B is fed A's tokens
    assert report.info == {"backend_a": "a", "backend_b": "b", "new_tokens": 4}


def test_greedy_match_stops_at_the_first_differing_top1(scripted_session):
    a, b = scripted_session([[5, 6, 7, 8]], 16), scripted_session([[5, 6, 9, 8]], 16)
    report = compare_sessions(a, b, [[1, 2]], new_tokens=4, tolerance=Tolerance(atol=20.0, rtol=0.0, min_top1=0.5))
    row = report.rows[0]
    assert row.greedy == (2, 4) and (row.top1_agree, row.top1_total) == (3, 4)
    assert report.passed and report.greedy_agreement == 0.5 and report.identical == 0
    assert [s["within_tolerance"] for s in row.detail["steps"]] == [True] * 4
    strict = compare_sessions(a, b, [[1, 2]], new_tokens=4)
    assert not strict.passed and "0 (2 tokens)" in strict.failures()[0]


def test_long_prompts_keep_their_last_tokens(scripted_session):
    a, b = scripted_session([[1]], 8, n_positions=6), scripted_session([[1]], 8, n_positions=6)
    report = compare_sessions(a, b, [list(range(10))], new_tokens=2)
    assert report.rows[0].detail["truncated"] and report.rows[0].name == "0 (4* tokens)"
    assert list(a.fed[0][0]) == [6, 7, 8, 9]
    assert "cut to fit" in report.table()


@pytest.mark.parametrize(
    ("prompts", "new_tokens", "message"),
    [
        ([[1]], 0, "new_tokens must be >= 1"),
        ([], 2, "no prompts"),
        ([[]], 2, "prompt 0 is empty"),
        ([[1]], 6, "leave no room"),
    ],
)
def test_bad_input(scripted_session, prompts, new_tokens, message):
    a, b = scripted_session([[1]], 8, n_positions=6), scripted_session([[1]], 8, n_positions=6)
    with pytest.raises(InputError, match=message):
        compare_sessions(a, b, prompts, new_tokens=new_tokens)
