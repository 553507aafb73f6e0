"""Continuous batching: one worker thread runs the model; rows join and leave the batch at step boundaries.

The event loop never runs the model. It submits rows (one per prompt and choice) to the Batcher, which
keeps a bounded queue of waiting rows; the worker thread admits waiting rows into free row slots of the
Session (each prompt runs alone into its slot's cache), then advances every running row by one token
in one step_slots() call, each row at its own length and with its own sampling settings. A row leaves
as soon as it ends (eos, stop string, max_tokens) or its client goes away, freeing its slot for the
next waiting row at the next step.

Sessions without row slots (the plain ONNX Runtime graph, TensorRT) run rows with the batch API
instead: waiting rows start together when the previous batch has ended (left padding, one prefill),
and a row that ends or is cancelled stops producing output while the batch finishes the others.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import CodegenDeployError, InputError
from ..runtime.generate import RowText, left_pad
from ..runtime.sampling import SamplingConfig, adjust_logits, make_generators, sample, token_logprobs
from ..runtime.session import Session


class QueueFull(Exception):
    """More rows are waiting than the queue holds: the client should retry later."""


@dataclass(frozen=True)
class RowSpec:
    """What one row generates: its prompt, length limit, sampling settings and what to report.

    sampling carries OpenAI's logit bias and penalties too (the penalties over the tokens this row
    generated so far). logprobs: None, or how many of the most likely tokens to report with each token
    (0: the chosen one only).
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass
class RowUpdate:
    """What a row produced since its last update: new text (whole characters only), the tokens sampled
    (tokens whose text is held back, a possible stop string start or a split character, come with a
    later update), their log-probabilities when asked, and on the last update its finish_reason
    ("stop" or "length") or an error message."""

    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None


class Row:
    """One row's state while it waits and runs. `sink` receives its RowUpdates (from the worker thread)."""

    def __init__(self, spec: RowSpec, sink: Callable[[RowUpdate], None], tokenizer, eos: set[int]):
        self.spec = spec
        self.sink = sink
        self.text = RowText(tokenizer, list(spec.prompt_ids), eos, spec.stop)
        self.cancelled = False  # set from the event loop; the worker frees the row before its next step
        self.finished = False
        self.finish_reason: str | None = None  # OpenAI's: "stop" or "length"
        self.slot: int | None = None
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.generators = None if spec.sampling.greedy else make_generators(spec.sampling, 1)
        self.counts: np.ndarray | None = None  # [V] tokens generated so far, for the penalties
        self._pending: list[int] = []
        self._pending_lp: list[float] = []
        self._pending_top: list[dict[int, float]] = []
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        """Stop this row: it sends nothing more and leaves the batch at the next step boundary."""
        self.cancelled = True

    def choose(self, logits: np.ndarray) -> int:
        """Sample the next token from this row's logits [V] with its own settings; remember its logprobs."""
        spec = self.spec
        adjusted = adjust_logits(logits, spec.sampling, self.counts)
        token = int(sample(adjusted[None, :], spec.sampling, self.generators)[0])
        if spec.logprobs is not None:
            # Reported from the model's own distribution (the raw logits), before any sampling setting.
            lp, top = token_logprobs(logits, token, spec.logprobs)
            self._pending_lp.append(lp)
            self._pending_top.append(top)
        return token

    def accept(self, logits: np.ndarray) -> RowUpdate | None:
        """Sample a token from logits [V], add it to the text; return the update to send, if any."""
        token = self.choose(logits)
        sampling = self.spec.sampling
        if self.counts is None and (sampling.presence_penalty or sampling.frequency_penalty):
            self.counts = np.zeros(logits.shape[-1], np.float32)
        if self.counts is not None:
            self.counts[token] += 1
        self.text.push(token)
        self._pending.append(token)
        self.next_token = token
        if self.text.done or len(self.text.ids) >= self.spec.max_tokens:
            self.finished = True
            self.finish_reason = "length" if self.text.finish_reason is None else "stop"  # eos, stop strings
            return self._update(self.text.rest(), self.finish_reason)
        piece = self.text.piece()
        return self._update(piece) if piece else None

    def _update(self, text: str, finish_reason: str | None = None) -> RowUpdate:
        asked = self.spec.logprobs is not None
        update = RowUpdate(
            text,
            self._pending,
            self._pending_lp if asked else None,
            self._pending_top if asked else None,
            finish_reason,
        )
        self._pending, self._pending_lp, self._pending_top = [], [], []
        return update


class SlotEngine:
    """Rows in the Session's row slots: a row joins the running batch at any step."""

    joins_running = True

    def __init__(self, session: Session, rows: int):
        session.open_slots(rows)
        self.session = session
        self.free = list(range(rows))

    def capacity(self) -> int:
        return len(self.free)

    def take(self, waiting: deque) -> list[Row]:
        taken = []
        while waiting and self.free:
            row = waiting.popleft()
            row.slot = self.free.pop(self.free.index(min(self.free)))  # the lowest: keeps steps small
            taken.append(row)
        return taken

    def prefill(self, rows: list[Row]) -> np.ndarray:
        return np.stack([self.session.prefill_slot(r.slot, list(r.spec.prompt_ids)) for r in rows])

    def step(self, rows: list[Row]) -> np.ndarray:
        return self.session.step_slots([r.slot for r in rows], [r.next_token for r in rows])

    def release(self, row: Row) -> None:
        if row.slot is not None:
            self.session.free_slot(row.slot)
            self.free.append(row.slot)
            row.slot = None


class BatchEngine:
    """Rows through the Session's batch API (for sessions without row slots): a batch starts when the
    previous one has ended; rows that end early are fed the pad token until the whole batch ends."""

    joins_running = False

    def __init__(self, session: Session, rows: int, pad_token_id: int):
        self.session = session
        self.rows = rows
        self.pad = pad_token_id
        self.batch: list[Row | None] = []  # the running batch, None where a row has left

    def capacity(self) -> int:
        return 0 if any(r is not None for r in self.batch) else self.rows

    def take(self, waiting: deque) -> list[Row]:
        if self.capacity() == 0:
            return []
        taken: list[Row] = []
        longest, most_new = 0, 0
        while waiting and len(taken) < self.rows:
            spec = waiting[0].spec
            # Left padding makes every row as long as the longest prompt: keep the batch within the context.
            if taken and max(longest, len(spec.prompt_ids)) + max(most_new, spec.max_tokens) > self.session.max_context:
                break
            row = waiting.popleft()
            longest, most_new = max(longest, len(spec.prompt_ids)), max(most_new, spec.max_tokens)
            row.slot = len(taken)
            taken.append(row)
        self.batch = list(taken)
        return taken

    def prefill(self, rows: list[Row]) -> np.ndarray:
        ids, mask = left_pad([list(r.spec.prompt_ids) for r in rows], self.pad)
        return self.session.prefill(ids, mask)

    def step(self, rows: list[Row]) -> np.ndarray:
        tokens = np.full(len(self.batch), self.pad, np.int64)
        for r in rows:
            tokens[r.slot] = r.next_token
        return self.session.step(tokens)[[r.slot for r in rows]]

    def release(self, row: Row) -> None:
        if row.slot is not None and row.slot < len(self.batch) and self.batch[row.slot] is row:
            self.batch[row.slot] = None
            row.slot = None
        if all(r is None for r in self.batch):
            self.batch = []


class Batcher:
    """The scheduler: a bounded queue of waiting rows and one worker thread that runs the model.

    max_batch: rows running at once (row slots), at most the session's own max_batch (a TensorRT engine's
    built batch); max_queue: rows waiting at most (submit raises QueueFull beyond). metrics: a
    serve.metrics.Metrics or None.
    """

    def __init__(self, session: Session, tokenizer, max_batch: int = 8, max_queue: int = 64, metrics=None):
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if session.max_batch is not None:
            max_batch = min(max_batch, session.max_batch)  # a larger batch would fail every row it holds
        self.session = session
        self.tokenizer = tokenizer
        self.eos = {tokenizer.eos_token_id}
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        if session.supports_slots:
            self.engine = SlotEngine(session, max_batch)
        else:
            self.engine = BatchEngine(session, max_batch, tokenizer.eos_token_id)
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="codegen-batcher", daemon=True)

    # -- the event loop's side -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the worker after its current step; waiting and running rows get an error update. Returns
        whether the worker has ended (a step still running after `timeout` seconds keeps it alive)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def submit(self, specs: list[RowSpec], sinks: list[Callable[[RowUpdate], None]]) -> list[Row]:
        """Queue rows (all or none); raises QueueFull when they do not fit in the queue."""
        rows = [Row(spec, sink, self.tokenizer, self.eos) for spec, sink in zip(specs, sinks, strict=True)]
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue + self.engine.capacity():
                raise QueueFull(f"{len(self._waiting)} rows are waiting (the queue holds {self.max_queue})")
            self._waiting.extend(rows)
            self._cond.notify()
        self._gauges()
        return rows

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return len(self._running)

    # -- the worker thread ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
                for row in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(row)
                    self._ended(row, "cancelled")
                self._leave([r for r in self._running if r.cancelled], "cancelled")
                admitted = self.engine.take(self._waiting)
            try:
                groups = [[r] for r in admitted] if self.engine.joins_running else [admitted] if admitted else []
                stepping = [r for r in self._running if not r.cancelled]
                self._running.extend(admitted)
                for group in groups:
                    self._accept(group, self.engine.prefill(group))
                if stepping:
                    self._accept(stepping, self.engine.step(stepping))
            except Exception as e:  # a backend failure fails the rows it touched; the server goes on
                message = str(e) if isinstance(e, CodegenDeployError) else f"{type(e).__name__}: {e}"
                for row in list(self._running):
                    self._send(row, RowUpdate("", [], error=f"generation failed: {message}"))
                self._leave(list(self._running), "error")
            self._gauges()
        for row in list(self._waiting) + self._running:
            self._send(row, RowUpdate("", [], error="the server is shutting down"))
        self._waiting.clear()
        self._leave(list(self._running), "error")

    def _accept(self, rows: list[Row], logits: np.ndarray) -> None:
        """Sample each row's next token from its logits [len(rows), V]; send updates; finished rows leave."""
        now = time.perf_counter()
        done, cancelled = [], []
        for row, row_logits in zip(rows, logits, strict=True):
            if row.cancelled:
                cancelled.append(row)
                continue
            update = row.accept(row_logits)
            if self.metrics is not None:
                self.metrics.token(now - (row.last_token_at or row.submitted), first=row.last_token_at is None)
            row.last_token_at = now
            if update is not None:
                self._send(row, update)
            if row.finished:
                done.append(row)
        self._leave(cancelled, "cancelled")
        for row in done:
            self._leave([row], row.finish_reason)

    def _leave(self, rows: list[Row], finish: str) -> None:
        """Rows leave the batch (their slots are free for the next step) and are counted by how they ended."""
        for row in rows:
            self.engine.release(row)
            if row in self._running:
                self._running.remove(row)
                self._ended(row, finish)

    def _ended(self, row: Row, finish: str) -> None:
        if self.metrics is not None:
            self.metrics.row_ended(finish)

    def _send(self, row: Row, update: RowUpdate) -> None:
        try:
            row.sink(update)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            row.cancelled = True

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(queue_depth=len(self._waiting), active_rows=len(self._running))
