"""Speculative decoding: drafts, verification and adaptation; greedy output identical to plain decoding on every
slot backend, shape and dtype, whatever the drafter proposes."""

from __future__ import annotations

import numpy as np
import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.runtime import generate
from codegen_deploy.runtime.costs import APPEND_TOKEN_COST, CostModel
from codegen_deploy.runtime.generate import GenerationConfig
from codegen_deploy.runtime.sampling import SamplingConfig
from codegen_deploy.runtime.speculate import (
    PROBE_EVERY,
    PROBE_MAX,
    PROBE_SHARE,
    Acceptance,
    Drafter,
    DraftModel,
    PromptLookup,
    SpeculationStats,
    check_speculation,
)
from tests.runtime.conftest import FreeDraft, slot_cases


class NoText:
    """Token ids only: these tests compare ids (random weights' ids mean no text)."""

    eos_token_id = -1
    end_ids = (-1,)

    def decode(self, ids):
        return ""


TOKENIZER = NoText()


class Scripted(Drafter):
    """A drafter that proposes from a fixed list of tokens (the previous greedy run: every draft right; or
    noise: every draft wrong); counts what it was asked."""

    name = "scripted"

    def __init__(self, tokens: list[int], offset: int):
        super().__init__()
        self.tokens, self.offset, self.asked = tokens, offset, 0

    def propose(self, ids, k, row=0):
        self.asked += 1
        at = len(ids) - self.offset
        return list(self.tokens[at : at + k])


@pytest.fixture(scope="module", params=slot_cases())
def session(request, slot_session):
    _, s, twin = slot_session(request.param, seed=21)
    s.twin = twin
    with s:
        yield s


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    repeated = rng.integers(0, vocab, 6).tolist()
    return [
        rng.integers(0, vocab, 12).tolist(),
        repeated * 4,  # text that repeats: lookup drafts get accepted
        [*rng.integers(0, vocab, 5).tolist(), *repeated, 7, *repeated],
    ]


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    assert lookup.propose([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]  # "2 3" occurred before, followed by 4 5
    assert lookup.propose([1, 2, 3, 7, 2, 3, 8, 2, 3], 1) == [8]  # the latest occurrence with k tokens after it
    assert lookup.propose([1, 2, 3, 7, 2, 3, 8, 2, 3], 4) == [7, 2, 3, 8]  # an earlier one with 4 after it
    assert lookup.propose([5, 6, 7, 8], 3) == []  # nothing recurs
    assert PromptLookup(max_ngram=2, min_ngram=2).propose([4, 1, 9, 5, 2, 9, 4], 2) == []  # "9 4" only at the end
    assert lookup.propose([3, 3, 3], 4) == [3]  # a run: what follows the earliest "3 3"
    with pytest.raises(InputError, match="n-gram"):
        PromptLookup(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("drafter", ["lookup", "right", "wrong", "self-draft"])
def test_greedy_tokens_are_those_of_plain_decoding(session, drafter):
    vocab = session.config.vocab_size
    config = GenerationConfig(max_new_tokens=24, eos_token_ids=(-1,))  # no eos: every row runs to the end
    stats = SpeculationStats()
    for prompt in _prompts(vocab):
        plain = generate(session, TOKENIZER, [prompt], config).ids
        if drafter == "lookup":
            d = PromptLookup()
        elif drafter == "right":
            d = Scripted(plain, len(prompt))  # the greedy tokens after the context
        elif drafter == "wrong":
            d = Scripted([(t + 1) % vocab for t in plain], len(prompt))
        else:
            d = FreeDraft(session.twin())  # the same weights: every draft agrees
        result = generate(session, TOKENIZER, [prompt], config, drafter=d)
        assert result.ids == plain
        for key in ("drafted", "accepted", "runs", "tokens"):
            setattr(stats, key, getattr(stats, key) + getattr(result.speculation, key))
        if drafter == "self-draft":
            d.close()
    assert stats.tokens == 24 * 3
    assert stats.drafted > 0
    if drafter in ("right", "self-draft"):
        assert stats.accepted == stats.drafted and stats.runs < stats.tokens  # fewer runs than tokens
    if drafter == "wrong":
        assert stats.accepted == 0


def test_acceptance_drafts_what_pays_and_probes_when_nothing_does():
    costs = CostModel()
    costs.record_run(1, 0.050)
    costs.record_run(33, 0.050 + 0.002 * 32)  # a run of k tokens: a step plus 2 ms per extra token
    good = Acceptance()
    for _ in range(20):
        good.update(8, 8)
    assert good.choose(costs, 0.0, limit=100) == 8  # cheap runs, accepted drafts: draft the most
    assert good.choose(costs, 0.0, limit=3) == 3  # never beyond what is left
    assert good.choose(costs, 0.0, limit=100, plain_cost=0.1) == 0  # stepping with many rows is cheaper still
    bad = Acceptance()
    for _ in range(20):
        bad.update(4, 0)  # rounds whose drafts were all rejected
    probes = [r for r in range(1, 1000) if bad.choose(costs, 0.0, limit=100)]
    assert probes == [PROBE_MAX, 2 * PROBE_MAX, 3 * PROBE_MAX]  # otherwise plain steps
    fresh = Acceptance()
    gaps = []
    for _ in range(3):
        fresh.update(1, 0)  # a probe that finds nothing: the next comes later
        gaps.append(fresh.probe_gap)
    assert gaps == [2 * PROBE_EVERY, 4 * PROBE_EVERY, 8 * PROBE_EVERY]
    bad.update(1, 1)  # a probe that is accepted: probing as often as at first
    assert bad.probe_gap == PROBE_EVERY
    slow_drafter = Acceptance()  # drafts accepted half the time from a drafter as slow as the model: no gain
    assert slow_drafter.choose(costs, 1.0, limit=100) == 0


def test_what_speculation_refuses(session):
    with pytest.raises(InputError, match="greedy"):
        check_speculation(session, SamplingConfig(temperature=0.7))
    with pytest.raises(InputError, match="greedy"):
        check_speculation(session, SamplingConfig(presence_penalty=0.5))
    check_speculation(session, SamplingConfig(logit_bias=((3, 5.0),)))  # a static bias is exact
    prompt = _prompts(session.config.vocab_size)[1]
    biased = GenerationConfig(max_new_tokens=12, eos_token_ids=(-1,), sampling=SamplingConfig(logit_bias=((3, 2.0),)))
    assert generate(session, TOKENIZER, [prompt], biased, drafter=PromptLookup()).ids == (
        generate(session, TOKENIZER, [prompt], biased).ids
    )


def test_a_draft_model_reads_at_most_a_window_of_the_context(session):
    """Before its tokens are known to be accepted, a draft model pays at most DRAFT_WINDOW tokens of reading;
    later rounds read only what the row added."""
    from codegen_deploy.runtime.speculate import DRAFT_WINDOW

    vocab = session.config.vocab_size
    drafter = DraftModel(session.twin())
    appended = []
    append = drafter.session.append_slot
    drafter.session.append_slot = lambda slot, ids: appended.append(len(ids)) or append(slot, ids)
    context = np.random.default_rng(9).integers(0, vocab, min(90, session.max_context - 10)).tolist()
    drafts = drafter.propose(context, 3)
    assert len(drafts) == 3 and appended == [min(DRAFT_WINDOW, len(context))]
    drafter.accept(0, 1)  # one draft accepted, then the model's own token
    drafter.propose([*context, drafts[0], 7], 2)
    assert appended[-1] == 1  # the accepted draft is already in its cache: only the model's token is read
    # The slot's next row, shorter than where the window began (a short context: the window began at 0 and
    # the first 4 tokens are in the cache).
    drafter.admit(0, context[:5])
    assert len(drafter.propose(context[:5], 2)) == 2
    assert appended[-1] == (5 if len(context) > DRAFT_WINDOW else 1)
    drafter.close()


def test_a_draft_model_over_a_session_with_slots_already_starts_empty(session):
    """A draft session that another drafter used holds caches this one knows nothing of: they are dropped."""
    twin = session.twin()
    twin.open_slots(3)
    twin.append_slot(1, [5, 6, 7])
    drafter = FreeDraft(twin, rows=2)
    assert [twin.slot_length(i) for i in range(3)] == [0, 0, 0]
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=(-1,))
    prompt = _prompts(session.config.vocab_size)[1]
    result = generate(session, TOKENIZER, [prompt], config, drafter=drafter)
    assert result.ids == generate(session, TOKENIZER, [prompt], config).ids and result.speculation.accepted > 0
    drafter.close()


def test_a_draft_model_counts_what_it_must_read_before_drafting(session):
    """Catching up on a window of the context is priced before a round drafts; once the draft model follows
    the row, only the tokens it has not seen are."""
    from codegen_deploy.runtime.speculate import DRAFT_WINDOW

    drafter = DraftModel(session.twin(), relative_cost=0.5)
    context = np.random.default_rng(3).integers(0, session.config.vocab_size, min(80, session.max_context - 10))
    context = context.tolist()
    window = min(DRAFT_WINDOW, len(context))
    assert drafter.catch_up_cost(context, 0, None) == pytest.approx((window - 1) * APPEND_TOKEN_COST * 0.5)
    drafts = drafter.propose(context, 2)
    drafter.accept(0, 1)
    assert drafter.catch_up_cost([*context, drafts[0], 5], 0, None) == 0.0  # one token to read: a draft step
    drafter.accept(0, 0)  # (as if) the draft was rejected: the model's token and two more are new to it
    assert drafter.catch_up_cost([*context, 9, 9, 9], 0, None) == pytest.approx(2 * APPEND_TOKEN_COST * 0.5)
    drafter.close()


def test_probes_cost_at_most_their_share_of_the_decode():
    costs = CostModel()
    costs.record_run(1, 0.050)
    costs.record_run(33, 0.050 + 0.005 * 32)  # 5 ms per extra token
    for catch_up in (0.0, 1.0, 8.0):
        bad = Acceptance(history=Acceptance())
        for _ in range(20):
            bad.update(1, 0)
        probes = [r for r in range(1, 2000) if bad.choose(costs, 0.2, limit=100, catch_up=catch_up)]
        cost = costs.run(2) + 0.2 + catch_up - 1.0  # what a probe costs beyond the plain step it replaces
        gaps = np.diff([0, *probes])
        assert len(probes) >= 3 and gaps.min() >= max(PROBE_MAX, cost / PROBE_SHARE) - 1
        assert cost * len(probes) / 2000 <= PROBE_SHARE  # all probes together


def test_a_row_starts_from_what_its_drafter_did_before():
    costs = CostModel()
    costs.record_run(1, 0.050)
    costs.record_run(33, 0.050 + 0.002 * 32)
    wrong, right = Drafter(), Drafter()
    for _ in range(30):
        Acceptance(history=wrong.history).update(2, 0)
        Acceptance(history=right.history).update(2, 2)
    assert wrong.history.rate < 0.05 and right.history.rate > 0.95
    assert Acceptance(history=wrong.history).choose(costs, 0.1, limit=100, catch_up=0.5) == 0  # waits for a probe
    assert Acceptance(history=right.history).choose(costs, 0.1, limit=100, catch_up=0.5) > 1  # drafts at once
    assert Acceptance().rate == pytest.approx(0.5)  # no history: the prior


def test_rows_shorter_than_the_probe_gap_still_probe_on_their_drafters_clock():
    """A dear drafter (probes ~70 rounds apart) serving requests of 20 tokens: its rows count rounds together,
    so it still finds out whether it pays, and no more often than its share."""
    costs = CostModel()
    costs.record_run(1, 0.050)
    costs.record_run(33, 0.050 + 0.005 * 32)  # 5 ms per extra token
    drafter = Drafter()
    for _ in range(20):
        Acceptance(history=drafter.history).update(2, 0)  # it was never right before
    probes, rounds = 0, 0
    for _request in range(30):
        row = Acceptance(history=drafter.history)
        for _ in range(20):
            rounds += 1
            if row.choose(costs, 0.3, limit=100, catch_up=1.0):
                probes += 1
                row.update(1, 0)
    assert probes >= 2 and (costs.run(2) + 0.3 + 1.0 - 1.0) * probes / rounds <= PROBE_SHARE


class Silent(Drafter):
    """A drafter that never finds anything to propose."""

    name = "silent"

    def propose(self, ids, k, row=0):
        return []


def test_a_decode_without_drafts_makes_one_token_per_run_and_says_so(session):
    result = generate(session, TOKENIZER, [[1, 2, 3, 4]], GenerationConfig(max_new_tokens=8), drafter=Silent())
    stats = result.speculation
    assert (stats.drafted, stats.tokens, stats.runs) == (0, 8, 8)  # the prompt's run made the first token
    assert stats.tokens_per_run == 1.0
    assert stats.describe().startswith("no tokens drafted")


def test_speculation_in_words():
    stats = SpeculationStats(drafted=8, accepted=6, runs=6, tokens=12)
    assert stats.describe() == (
        "6 of 8 drafted tokens accepted (75%): 2.00 tokens per run of the model (plain decoding makes 1.00)"
    )
