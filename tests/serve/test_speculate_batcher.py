"""Speculative decoding in the scheduler: rows that draft and rows that step together in one server, the
same tokens as plain decoding; sampled rows step plainly. When a row drafts is tested on the plan
(tests/runtime/test_engine.py)."""

from __future__ import annotations

import threading

import pytest

from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.runtime import generate, open_session
from codegen_deploy.runtime.generate import GenerationConfig
from codegen_deploy.runtime.sampling import SamplingConfig
from codegen_deploy.runtime.speculate import PromptLookup
from codegen_deploy.serve.batcher import Batcher, RowSpec
from codegen_deploy.serve.metrics import Metrics
from tests.runtime.conftest import FreeDraft, trust


class Collector:
    def __init__(self):
        self.tokens, self.finish = [], None
        self.done = threading.Event()

    def __call__(self, update):
        self.tokens += update.tokens
        if update.finish_reason or update.error:
            self.finish = update.finish_reason or update.error
            self.done.set()


@pytest.fixture
def session(slot_session):
    return slot_session


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


PROMPTS = ["x = 1\nx = 1\nx = 1\nx = ", "def f(a):\n    return a\n\ndef g(a):\n    return", "for i in range(3):\n"]


def _run(batcher, specs) -> list[Collector]:
    sinks = [Collector() for _ in specs]
    batcher.start()
    try:
        batcher.submit(specs, sinks)
        for s in sinks:
            assert s.done.wait(60)
    finally:
        batcher.stop()
    return sinks


@pytest.mark.parametrize("drafter", ["lookup", "draft-model"])
def test_drafting_rows_give_the_tokens_of_plain_decoding(session, tokenizer, tiny_checkpoint, drafter):
    specs = [RowSpec(tuple(tokenizer.encode(p)), 24) for p in PROMPTS[:2]]
    expected = [
        generate(session, tokenizer, list(s.prompt_ids), GenerationConfig(max_new_tokens=24)).ids for s in specs
    ]
    metrics = Metrics()
    # A draft model with the target's own weights: its drafts always agree.
    # Both trusted from the start, so that rows draft while another steps plainly.
    d = trust(PromptLookup()) if drafter == "lookup" else FreeDraft(open_session("torch", tiny_checkpoint, threads=1))
    batcher = Batcher(session, tokenizer, max_batch=2, metrics=metrics, drafter=d)
    sinks = _run(batcher, specs)
    assert [s.tokens for s in sinks] == expected
    drafted = metrics.speculative_tokens.labels(kind="drafted")._value.get()
    accepted = metrics.speculative_tokens.labels(kind="accepted")._value.get()
    runs = metrics.decode_runs._value.get()
    assert drafted > 0 and 0 < accepted <= drafted
    assert runs < sum(len(s.tokens) for s in sinks) - len(sinks)  # fewer model runs than tokens after the first
    d.close()


def test_rows_drafting_next_to_each_other_and_sampled_rows_give_the_tokens_of_plain_decoding(session, tokenizer):
    ids = [tuple(tokenizer.encode(p)) for p in PROMPTS]
    greedy = [RowSpec(i, 12) for i in ids]
    batcher = Batcher(session, tokenizer, max_batch=3, drafter=trust(PromptLookup()))
    sinks = _run(batcher, greedy)  # three rows generate together
    assert [s.tokens for s in sinks] == [
        generate(session, tokenizer, list(i), GenerationConfig(max_new_tokens=12)).ids for i in ids
    ]
    sampled = RowSpec(ids[0], 12, SamplingConfig(temperature=0.8, seed=3))
    alone = Batcher(session, tokenizer, max_batch=1)
    reference = _run(alone, [sampled])[0].tokens
    metrics = Metrics()
    batcher = Batcher(session, tokenizer, max_batch=1, metrics=metrics, drafter=trust(PromptLookup()))
    assert _run(batcher, [sampled])[0].tokens == reference
    assert metrics.speculative_tokens.labels(kind="drafted")._value.get() == 0  # a sampled row never drafts


def test_an_old_fused_graph_is_refused_for_speculation(session, tokenizer):
    session.multi_token_steps = False
    with pytest.raises(Exception, match="multi-token"):
        Batcher(session, tokenizer, drafter=PromptLookup())


class Failing(PromptLookup):
    """Prompt lookup whose admission of the first row fails (a draft model's session failing, say)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def admit(self, row, ids):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("draft session lost")


def test_a_row_the_engine_fails_to_take_gets_the_error_and_the_next_is_served(session, tokenizer):
    ids = [tuple(tokenizer.encode(p)) for p in PROMPTS[:2]]
    batcher = Batcher(session, tokenizer, max_batch=1, metrics=Metrics(), drafter=Failing())
    first, second = _run(batcher, [RowSpec(ids[0], 8), RowSpec(ids[1], 8)])
    assert first.finish == "generation failed: RuntimeError: draft session lost" and first.tokens == []
    assert second.tokens == generate(session, tokenizer, list(ids[1]), GenerationConfig(max_new_tokens=8)).ids
    assert batcher.active_rows == 0
