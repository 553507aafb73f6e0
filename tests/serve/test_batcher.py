"""The Batcher in process: rows that join a running batch equal generate() alone, on the slot engine (torch,
fused ONNX Runtime) and on the batch fallback (the plain ONNX Runtime graph); cancellation; a full queue."""

from __future__ import annotations

import threading
import time

import pytest

from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.runtime import generate, open_session
from codegen_deploy.runtime.sampling import SamplingConfig
from codegen_deploy.serve.batcher import Batcher, QueueFull, RowSpec
from codegen_deploy.serve.metrics import Metrics

PROMPTS = ["def add(a, b):\n", "import os\nimport sys\n", "x = [", "class A:\n    pass\n\n", "for i in range(3):"]


class Collector:
    """A row's sink: gathers its updates; `done` is set on the last one."""

    def __init__(self):
        self.text, self.tokens, self.finish, self.error = "", [], None, None
        self.done = threading.Event()

    def __call__(self, update):
        self.text += update.text
        self.tokens += update.tokens
        if update.finish_reason or update.error:
            self.finish, self.error = update.finish_reason, update.error
            self.done.set()


@pytest.fixture(params=["torch", "onnxruntime-fused", "onnxruntime-plain"])
def session(request, fp32_export, tiny_checkpoint):
    if request.param == "torch":
        s = open_session("torch", tiny_checkpoint, threads=1)
    else:
        graph = request.param.split("-")[1]
        s = open_session("onnxruntime", fp32_export, threads=1, graph=graph)
    with s:
        yield s


def test_rows_joining_at_different_steps_equal_generate_alone(session, fp32_export):
    tokenizer = load_tokenizer(fp32_export)
    lengths = [12, 5, 9, 16, 7]
    expected = [generate(session, tokenizer, p, max_new_tokens=n).text for p, n in zip(PROMPTS, lengths, strict=True)]
    batcher = Batcher(session, tokenizer, max_batch=3, max_queue=8, metrics=Metrics())
    batcher.start()
    try:
        sinks = [Collector() for _ in PROMPTS]
        specs = [RowSpec(tuple(tokenizer.encode(p)), n) for p, n in zip(PROMPTS, lengths, strict=True)]
        batcher.submit(specs[:2], sinks[:2])
        batcher.submit(specs[2:], sinks[2:])
        for s in sinks:
            assert s.done.wait(30)
    finally:
        batcher.stop()
    assert [s.text for s in sinks] == expected
    assert [s.finish for s in sinks] == ["length"] * len(PROMPTS)
    assert [len(s.tokens) for s in sinks] == lengths
    assert batcher.active_rows == 0 and batcher.queue_depth == 0


def test_batch_fallback_keeps_within_the_sessions_max_batch(fp32_export):
    # A session built for fewer rows than asked (a TensorRT engine's max_batch) bounds the batch: no row fails.
    tokenizer = load_tokenizer(fp32_export)
    with open_session("onnxruntime", fp32_export, threads=1, graph="plain", max_batch=2) as session:
        expected = [generate(session, tokenizer, p, max_new_tokens=4).text for p in PROMPTS[:3]]
        batcher = Batcher(session, tokenizer, max_batch=3, max_queue=8)
        assert batcher.max_batch == 2
        batcher.start()
        try:
            sinks = [Collector() for _ in range(3)]
            batcher.submit([RowSpec(tuple(tokenizer.encode(p)), 4) for p in PROMPTS[:3]], sinks)
            for s in sinks:
                assert s.done.wait(30)
        finally:
            batcher.stop()
    assert [s.error for s in sinks] == [None] * 3
    assert [s.text for s in sinks] == expected


def test_cancel_full_queue_and_sampling_rows(fp32_export):
    tokenizer = load_tokenizer(fp32_export)
    with open_session("onnxruntime", fp32_export, threads=1) as session:
        batcher = Batcher(session, tokenizer, max_batch=1, max_queue=1)
        ids = tuple(tokenizer.encode(PROMPTS[0]))
        long, waiting = Collector(), Collector()
        rows = batcher.submit([RowSpec(ids, 200), RowSpec(ids, 200)], [long, waiting])  # not started: both fit
        with pytest.raises(QueueFull):
            batcher.submit([RowSpec(ids, 4)], [Collector()])
        batcher.start()
        try:
            for row in rows:
                row.cancel()
            deadline = time.monotonic() + 10
            while (batcher.active_rows or batcher.queue_depth) and time.monotonic() < deadline:
                time.sleep(0.01)  # cancelled rows leave at the worker's next step
            assert batcher.active_rows == 0 and batcher.queue_depth == 0
            sampled = [Collector(), Collector()]
            spec = RowSpec(ids, 10, SamplingConfig(temperature=0.8, top_p=0.9, seed=5))
            batcher.submit([spec], [sampled[0]])
            assert sampled[0].done.wait(30)
            batcher.submit([spec], [sampled[1]])
            assert sampled[1].done.wait(30)
        finally:
            batcher.stop()
        assert len(long.tokens) < 200 and not waiting.tokens
        assert sampled[0].text == sampled[1].text and len(sampled[0].tokens) == 10
        assert batcher.active_rows == 0


def test_stop_says_whether_a_running_step_has_ended(fp32_export, tiny_checkpoint):
    # The server closes its session only after the worker has ended: a step still running writes into it.
    tokenizer = load_tokenizer(fp32_export)
    entered, release = threading.Event(), threading.Event()
    with open_session("torch", tiny_checkpoint, threads=1) as session:
        step = session._step_slots

        def held_step(*args):
            entered.set()
            release.wait(30)
            return step(*args)

        session._step_slots = held_step
        batcher = Batcher(session, tokenizer, max_batch=2, max_queue=2)
        batcher.start()
        batcher.submit([RowSpec(tuple(tokenizer.encode("x = 1")), 4)], [Collector()])
        assert entered.wait(30)
        assert batcher.stop(timeout=0.2) is False
        release.set()
        assert batcher.stop() is True
