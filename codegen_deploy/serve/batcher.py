"""Continuous batching: one worker thread drives the engine (runtime/engine.py); rows join and leave the batch at
step boundaries.

The event loop never runs the model. It submits rows (one per prompt and choice) to the Batcher, which keeps a
bounded queue of waiting rows; the worker thread moves waiting rows into the engine while it has room, drops
the rows whose clients went away, and calls engine.step(), which reads pieces of the prompts being read, steps
the generating rows together and lets greedy rows draft when it pays; the worker sends each row's updates to
its sink and counts them. So a long prompt never stops the other rows' streams for more than a piece, a row
leaves as soon as it ends or its client goes away, and its slot is free for the next waiting row.

Prefix reuse (engines with row slots): a slot whose row has left keeps its cache, and when another row needs
the slot that cache moves to the prompt cache, which keeps idle prompts up to `cache_memory` bytes (the least
recently used evicted first); a new row takes the cache that shares the longest prefix with its prompt and
computes only the rest. Editors need it: they send the whole file again on nearly every keystroke and cancel the
request they sent a moment ago; a team's editors each need their own file kept. So the memory the caches hold is
bounded: cache_memory, plus the row slots' own.

Sessions without row slots (the plain ONNX Runtime graph, TensorRT) run rows in batches (BatchEngine): waiting
rows start together when the previous batch has ended, and a row that ends or is cancelled stops producing
output while the batch finishes the others.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import CodegenDeployError, InputError
from ..memory import available_memory_bytes
from ..runtime.engine import GAP_STEPS, BatchEngine, Progress, Row, RowSpec, RowUpdate, SlotEngine, pieces_agree
from ..runtime.session import Session
from ..runtime.speculate import SPECULATE_BY_DEFAULT, runs_several_tokens, speculation_note, this_export

__all__ = ["Batcher", "QueueFull", "Request", "RowSpec", "RowUpdate"]

# The prompt cache's default size: this share of the memory available when the server starts.
DEFAULT_CACHE_SHARE = 0.25

_PIECES_DIFFER = (
    "this machine's kernels compute a prompt read in pieces otherwise than whole, so reuse and chunks would change "
    "answers"
)


class QueueFull(Exception):
    """More rows are waiting than the queue holds: the client should retry later."""


class Request(Row):
    """An engine Row with its client: `sink` receives its RowUpdates (from the worker thread); cancel() comes
    from the event loop when the client goes away."""

    def __init__(self, spec: RowSpec, sink: Callable[[RowUpdate], None], tokenizer, eos: set[int]):
        super().__init__(spec, tokenizer, eos)
        self.sink = sink
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        """Stop this row: it sends nothing more and leaves the batch at the next step boundary."""
        self.cancelled = True


class Batcher:
    """The scheduler: a bounded queue of waiting rows and one worker thread that drives the engine.

    max_batch: rows running at once (row slots), at most the session's own max_batch (a TensorRT engine's
    built batch); max_queue: rows waiting at most (submit raises QueueFull beyond). metrics: a
    serve.metrics.Metrics or None. cache_memory: bytes of idle prompts' caches kept for prefix reuse (None:
    DEFAULT_CACHE_SHARE of the memory available at start; 0 turns reuse off). cache_reuse: runs of at least this
    many tokens reused where they moved (0: off; approximate). prefill_chunk: prompt tokens read between two
    decode steps while rows are generating (None: sized from measured costs, see engine.GAP_STEPS; 0: whole
    prompts at once). drafter: speculative decoding for greedy rows. The last four apply to sessions with row
    slots.
    """

    def __init__(
        self,
        session: Session,
        tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        metrics=None,
        cache_memory: int | None = None,
        prefill_chunk: int | None = None,
        drafter=None,
        cache_reuse: int = 0,
    ):
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if (cache_memory or 0) < 0 or (prefill_chunk or 0) < 0 or cache_reuse < 0:
            raise InputError(
                f"cache_memory, prefill_chunk and cache_reuse must be >= 0, got {cache_memory}, {prefill_chunk} "
                f"and {cache_reuse}"
            )
        if session.max_batch is not None:
            max_batch = min(max_batch, session.max_batch)  # a larger batch would fail every row it holds
        self.session = session
        self.tokenizer = tokenizer
        self.eos = set(tokenizer.end_ids)  # <|endoftext|>, and <eom> on a model that fills in the middle
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.drafter = drafter
        # Reuse and chunks are exact only where the kernels compute a prompt in pieces as they compute it whole:
        # checked here, on this machine, before they are turned on.
        self.pieces_agree = True
        if session.supports_slots:
            if cache_memory is None:
                cache_memory = int(DEFAULT_CACHE_SHARE * available_memory_bytes())
            self.engine = SlotEngine(session, max_batch, cache_memory, prefill_chunk, drafter, cache_reuse=cache_reuse)
            if (cache_memory or prefill_chunk != 0) and not pieces_agree(session):
                self.pieces_agree = False
                self.engine.store.shrink(0)
                self.engine.prefill_chunk = 0
        else:
            if drafter is not None:
                SlotEngine(session, 1, drafter=drafter)  # refuses it in the words every engine uses
            self.engine = BatchEngine(session, max_batch, tokenizer.eos_token_id)
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="codegen-batcher", daemon=True)

    def describe_cache(self) -> str:
        """One line for the server's start-up: what the prompt cache keeps, in bytes and in tokens of this model,
        and what the row slots may take besides."""
        if not self.pieces_agree:
            return f"prefix cache: off ({_PIECES_DIFFER})"
        if not self.engine.caching:
            return "prefix cache: off"
        capacity, per_token = self.engine.store.capacity, self.session.kv_bytes_per_token
        holds = f" = {capacity // per_token:,} tokens of this model at {per_token / 2**10:.0f} KiB" if per_token else ""
        line = f"prefix cache: {capacity / 2**30:.2f} GiB of idle prompts{holds}, least recently used evicted first"
        if per_token:
            rows = self.engine.max_rows * self.session.max_context * per_token
            line += f"; the {self.engine.max_rows} row slots take up to {rows / 2**30:.2f} GiB more, resident as filled"
        if self.engine.cache_reuse:
            line += (
                f"; chunks of >= {self.engine.cache_reuse} tokens reused where they moved (approximate: answers may "
                "depend on earlier requests)"
            )
        return line

    def describe_chunks(self) -> str:
        """One line for the server's start-up: how prompts are split while other rows generate."""
        chunk = self.engine.prefill_chunk
        if not self.pieces_agree:
            return f"prompts: read whole ({_PIECES_DIFFER})"
        if chunk == 0:
            return "prompts: read whole"
        if chunk is None:
            return f"prompts: read in chunks sized to keep other streams' gaps near {GAP_STEPS:g} steps"
        return f"prompts: read in chunks of {chunk} tokens while other rows generate"

    def describe_speculation(self) -> str:
        """One line for the server's start-up: whether greedy rows draft tokens, and how."""
        if self.drafter is None:
            if self.session.export_kind in SPECULATE_BY_DEFAULT or not runs_several_tokens(self.session):
                return "speculative decoding: off"
            return (
                f"speculative decoding: off (auto drafts on {', '.join(SPECULATE_BY_DEFAULT)} exports only: on "
                f"{this_export(self.session)} a check rounds otherwise than plain steps; --speculate lookup drafts "
                "anyway)"
            )
        line = f"speculative decoding: {self.drafter.name}, for greedy rows (a row drafts only while its measured "
        line += "acceptance and the costs say it pays at the current load)"
        note = speculation_note(self.session)
        return line if note is None else f"{line}; {note}"

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

    def submit(self, specs: list[RowSpec], sinks: list[Callable[[RowUpdate], None]]) -> list[Request]:
        """Queue rows (all or none); raises QueueFull when they do not fit in the queue."""
        rows = [Request(spec, sink, self.tokenizer, self.eos) for spec, sink in zip(specs, sinks, strict=True)]
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
        return len(self.engine.rows)

    # -- the worker thread ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.engine.has_work():
                    self._cond.wait()
                if self._stopping:
                    break
                for row in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(row)
                    self._ended(row, "cancelled")
                for row in [r for r in self.engine.rows if r.cancelled]:
                    self._leave(row, "cancelled")
                admitted = self._admit()
            try:
                self._count_cache(admitted)
                if self.engine.has_work():
                    self._report(self.engine.step())
            except Exception as e:  # a backend failure fails the rows it touched; the server goes on
                self._fail(f"generation failed: {_describe(e)}")
                self.engine.reset()
            self._gauges()
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for row in waiting:
            self._send(row, RowUpdate("", [], error="the server is shutting down"))
        self._fail("the server is shutting down")

    def _admit(self) -> list[Request]:
        """Move waiting rows into the engine while it takes them (call holding the lock); a row the engine fails
        to take gets the error and leaves, and the worker goes on with the next."""
        taken = []
        while self._waiting:
            row = self._waiting[0]
            try:
                if not self.engine.add(row):
                    break
            except Exception as e:
                self._waiting.popleft()
                self._send(row, RowUpdate("", [], error=f"generation failed: {_describe(e)}"))
                self._ended(row, "error")
                continue
            taken.append(self._waiting.popleft())
        return taken

    def _report(self, progress: list[Progress]) -> None:
        """Send each row's update; count its tokens, its drafts (a check is a decode run of its own) and the
        step's one run over the rows that stepped."""
        now = time.perf_counter()
        for p in progress:
            row = p.row
            if self.metrics is not None:
                for _ in range(p.chosen):
                    self.metrics.token(now - (row.last_token_at or row.submitted), first=row.last_token_at is None)
                    row.last_token_at = now
                if p.drafted:
                    self.metrics.speculation(drafted=p.drafted, accepted=p.accepted)
            if p.update is not None and not row.cancelled:
                self._send(row, p.update)
            if row.finished:
                self._ended(row, row.finish_reason)
        if self.metrics is not None:
            if any(p.decoded and not p.drafted for p in progress):
                self.metrics.decode_runs.inc()
            plan = self.engine.last_plan
            if plan.reads and plan.budget is not None:
                self.metrics.prefill_chunk.set(plan.budget)

    def _fail(self, message: str) -> None:
        """Every running row gets `message` as its error and leaves."""
        for row in list(self.engine.rows):
            self._send(row, RowUpdate("", [], error=message))
            self._leave(row, "error")

    def _leave(self, row: Request, finish: str) -> None:
        self.engine.remove(row)
        self._ended(row, finish)

    def _ended(self, row: Request, finish: str) -> None:
        if self.metrics is not None:
            self.metrics.row_ended(finish)

    def _count_cache(self, rows: list[Request]) -> None:
        if self.metrics is not None:
            for row in rows:
                self.metrics.prompt_cache(hit=row.cached_tokens, miss=row.prompt_len - row.cached_tokens)

    def _send(self, row: Request, update: RowUpdate) -> None:
        try:
            row.sink(update)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            row.cancelled = True

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(queue_depth=len(self._waiting), active_rows=len(self.engine.rows))
            if self.engine.caching:
                self.metrics.set_cache(self.engine.cache_state())


def _describe(error: Exception) -> str:
    """An error as the rows it failed are told it: our own errors' one line, else the exception's type too."""
    return str(error) if isinstance(error, CodegenDeployError) else f"{type(error).__name__}: {error}"
