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


def test_the_pieces_follow_what_the_last_round_with_pieces_took():
    """What a stream waits is a whole round, the engine's and the server's work included: a round with pieces is
    fed back into the next piece, scaled to take the gap's rounds, by at most 1.5x more or half."""
    costs = CostModel()
    costs.record_step(1, 0.050)
    costs.token_s = 0.002
    from_law = costs.piece_tokens(1, 3.5)
    for _ in range(30):
        costs.record_round(1, [], 0.060)  # plain rounds: the step and 10 ms of the rest
    assert costs.rounds[1] == pytest.approx(0.060)
    costs.record_round(1, [(40, 0)], 0.060 + 0.300)  # 40 tokens took 300 ms more than a plain round
    assert costs.piece_tokens(1, 3.5) == 20  # at most half: 2.5 rounds (150 ms) would be 20 tokens
    costs.record_round(1, [(20, 40)], 0.060 + 0.120)  # 20 took 120 ms: 150 ms would be 25
    assert costs.piece_tokens(1, 3.5) == 25
    costs.record_round(1, [(25, 60), (5, 0)], 0.060 + 0.010)  # far faster: at most 1.5x more
    assert costs.piece_tokens(1, 3.5) == 45
    assert from_law == int((2.5 * 0.050 - 0.050) / 0.002)  # before any round: from the law


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
