"""The one cost model: what teaches it, and the costs and piece sizes it gives."""

from __future__ import annotations

import pytest

from codegen_deploy.runtime.costs import APPEND_TOKEN_COST, MIN_TOKENS_MEASURED, CostModel


def test_prompt_pieces_teach_the_per_token_cost_and_short_checks_do_not():
    costs = CostModel()
    assert costs.run(9) == pytest.approx(1 + 8 * APPEND_TOKEN_COST)  # the prior
    costs.record_run(MIN_TOKENS_MEASURED, 0.100)  # no step measured yet: nothing to subtract
    assert costs.token_s is None
    costs.record_run(1, 0.050)
    costs.record_run(9, 0.051)  # a speculative check: nearly a step, and not what a prompt piece costs
    assert costs.token_s is None
    costs.record_run(65, 0.050 + 64 * 0.003)  # a prompt piece: 3 ms a token beyond the step
    assert costs.token_s == pytest.approx(0.003, rel=1e-3)
    assert costs.run(9) == pytest.approx(1 + 8 * 0.003 / 0.050, rel=1e-3)


def test_a_rows_share_and_the_piece_that_keeps_a_streams_gap():
    costs = CostModel()
    assert costs.share(4) == 0.25  # unmeasured: plain steps taken as cheap as can be
    assert costs.piece_tokens(1, 3.5) is None
    costs.record_step(1, 0.050)
    costs.record_step(4, 0.080)
    assert costs.share(4) == pytest.approx(0.080 / 4 / 0.050)
    costs.token_s = 0.002
    # A round of a piece (a one-row run: a step and 2 ms a token) and a step over 4 rows = 3.5 steps over 4 rows
    assert costs.piece_tokens(4, 3.5) == int((2.5 * 0.080 - 0.050) / 0.002)
    assert costs.piece_tokens(3, 3.5) == int((2.5 * 0.080 - 0.050) / 0.002)  # the nearest measured row count


def test_rounds_that_take_longer_than_their_runs_make_the_pieces_smaller():
    """What a stream waits is a whole round, the engine's and the server's work included: measured rounds size
    the pieces, and pieces that take longer than their runs' law (their own overhead, a busier machine) are
    scaled to what they take."""
    costs = CostModel()
    costs.record_step(1, 0.050)
    costs.token_s = 0.002
    before = costs.piece_tokens(1, 3.5)
    for _ in range(30):
        costs.record_round(1, [], 0.060)  # plain rounds: the step and 10 ms of the rest
        costs.record_round(1, [(40, 0)], 0.060 + 2 * costs.piece_seconds(40))  # pieces take twice their law
    assert costs.rounds[1] == pytest.approx(0.060) and costs.piece_scale == pytest.approx(2.0, rel=0.01)
    t = costs.piece_tokens(1, 3.5)
    assert t < before
    assert 0.060 + 2 * costs.piece_seconds(t) == pytest.approx(3.5 * 0.060, rel=0.02)  # the round: 3.5 rounds
    costs.record_round(1, [(40, 0)], 100.0)  # one very slow round moves the scale a bounded step
    assert costs.piece_scale < 3.5


def test_a_tokens_cost_grows_with_its_context_and_a_late_piece_is_smaller():
    costs = CostModel()
    costs.record_step(1, 0.050)
    token, context = 0.002, 1.5e-6  # 2 ms a token, and 1.5 us more per token of context it attends to
    for start in (0, 256, 512, 768, 1024, 1280):  # a long prompt's pieces
        costs.record_run(256, 0.050 + 255 * (token + context * (start + 128)), start)
    assert costs.token_s == pytest.approx(token, rel=1e-3) and costs.context_s == pytest.approx(context, rel=1e-3)
    early, late = costs.piece_tokens(1, 3.5), costs.piece_tokens(1, 3.5, start=1500)
    assert late < early
    for t, start in ((early, 0), (late, 1500)):  # each piece and the next step take the gap's 3.5 steps
        assert 0.050 + t * (token + context * (start + t / 2)) + 0.050 == pytest.approx(3.5 * 0.050, rel=0.02)
    same = CostModel()  # pieces all at one position: no slope to learn, the mean cost
    same.record_step(1, 0.050)
    for _ in range(3):
        same.record_run(64, 0.050 + 63 * 0.003, 100)
    assert same.context_s == 0 and same.token_s == pytest.approx(0.003, rel=1e-3)


def test_an_editors_few_typed_tokens_do_not_drag_the_per_token_cost_to_zero():
    """A keystroke's request reads a few tokens, hardly longer than a step (the weights are read once either way):
    counted as a long piece counts, they would make the next long prompt's pieces huge."""
    costs = CostModel()
    costs.record_step(1, 0.050)
    for start in (0, 256, 512, 768):
        costs.record_run(256, 0.050 + 255 * 0.002, start)  # a file read in pieces: 2 ms a token
    for _ in range(100):
        costs.record_run(MIN_TOKENS_MEASURED - 1, 0.050, 1024)  # typed tokens: no more than a step
    for _ in range(5):
        costs.record_run(MIN_TOKENS_MEASURED, 0.051, 1024)  # a few more: they count, for their share
    assert costs.token_s + costs.context_s * 1024 > 0.001  # more than half what the pieces cost
