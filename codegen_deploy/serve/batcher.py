"""Continuous batching: one worker thread runs the model; rows join and leave the batch at step boundaries.

The event loop never runs the model. It submits rows (one per prompt and choice) to the Batcher, which
keeps a bounded queue of waiting rows; the worker thread admits waiting rows into free row slots of the
Session and, in each round, computes at most `prefill_chunk` prompt tokens of the rows still reading
their prompts (shared fairly between them), then advances every row that is generating by one token in
one step_slots() call, each row at its own length and with its own sampling settings. So a long prompt
never stops the other rows' streams for more than a chunk. A row leaves as soon as it ends (eos, stop
string, max_tokens) or its client goes away, freeing its slot for the next waiting row.

Prefix reuse: a slot whose row has left keeps its cache and the token ids in it. A new row goes to the
free slot whose ids share the longest prefix with its prompt; the slot is cut back to the shared part and
only the rest of the prompt is computed. This is what editors need: they send the whole file again on
nearly every keystroke, and cancel the request they sent a moment ago (its prompt's cache stays). At most
`cache_slots` free slots keep a cache (the least recently used is dropped first), so the memory the
caches hold is bounded: cache_slots x max_context tokens.

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
from ..runtime.session import Session, common_prefix
from ..runtime.speculate import Acceptance, StepCosts, moving_average, verify


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
    ("stop" or "length") or an error message. The first update says how many prompt tokens were reused."""

    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int | None = None  # on a row's first update: prompt tokens its slot's cache already held


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
        self.prompt_done = 0  # prompt tokens in the slot's cache (reused or computed)
        self.cached_tokens = 0  # of those, the ones a previous row left in the slot
        self.last_chunk = 0  # the prefill round that last computed a chunk of its prompt (turn order)
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self._reported_cache = False
        self.generators = None if spec.sampling.greedy else make_generators(spec.sampling, 1)
        self.counts: np.ndarray | None = None  # [V] tokens generated so far, for the penalties
        self._pending: list[int] = []
        self._pending_lp: list[float] = []
        self._pending_top: list[dict[int, float]] = []
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None
        self.acceptance = Acceptance()  # how often its drafts are accepted (speculative decoding)

    def cancel(self) -> None:
        """Stop this row: it sends nothing more and leaves the batch at the next step boundary."""
        self.cancelled = True

    def choose(self, logits: np.ndarray) -> int:
        """Sample the next token from this row's logits [V] with its own settings; remember its logprobs."""
        spec = self.spec
        if self.counts is None and (spec.sampling.presence_penalty or spec.sampling.frequency_penalty):
            self.counts = np.zeros(logits.shape[-1], np.float32)
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
        return self.record(self.choose(logits))

    @property
    def speculates(self) -> bool:
        """Whether drafts can be checked for this row exactly: greedy, no penalties, no logprobs to report."""
        s = self.spec.sampling
        plain = s.repetition_penalty == 1.0 and not s.presence_penalty and not s.frequency_penalty
        return s.greedy and plain and self.spec.logprobs is None

    def record(self, token: int) -> RowUpdate | None:
        """Add a chosen token to the text; return the update to send, if any."""
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
            cached_tokens=None if self._reported_cache else self.cached_tokens,
        )
        self._reported_cache = True
        self._pending, self._pending_lp, self._pending_top = [], [], []
        return update


def take_turns(needs: list[int], budget: int) -> list[int]:
    """Split `budget` prompt tokens between rows needing `needs` tokens, listed in turn order (the row served
    least recently first): the first row takes what it needs up to the budget, what it leaves goes to the
    next. Each append runs the weights once, so one row per round keeps a round's cost to its budget; rows
    take turns across rounds, so each waiting prompt advances in turn."""
    shares, left = [], budget
    for need in needs:
        shares.append(min(need, left))
        left -= shares[-1]
    return shares


@dataclass
class _Slot:
    """A row slot's bookkeeping: the token ids whose keys and values its cache holds (in order), how many of
    them were the last row's prompt, the row running in it, and when it was last used (for least-recently-used
    eviction)."""

    ids: list[int] = field(default_factory=list)
    prompt: int = 0
    row: Row | None = None
    used: int = 0


class SlotEngine:
    """Rows in the Session's row slots: a row joins the running batch at any step, its prompt computed in
    chunks after whatever prefix of it a free slot's cache holds.

    rows: rows running at once; cache_slots: free slots that keep their cache for the next prompt
    (0: none, no prefix reuse). The session gets max(rows, cache_slots) slots.
    """

    joins_running = True

    def __init__(self, session: Session, rows: int, cache_slots: int):
        session.open_slots(max(rows, cache_slots))
        self.session = session
        self.rows = rows
        self.cache_slots = cache_slots
        self.slots = [_Slot() for _ in range(session.slot_count)]
        self._clock = 0
        self._round = 0

    def capacity(self) -> int:
        return self.rows - sum(slot.row is not None for slot in self.slots)

    def take(self, waiting: deque) -> list[Row]:
        """Admit waiting rows into free slots: each into the one whose cache shares the longest prefix with its
        prompt (at least half of the prompt that cache was made for, so that a few common tokens never cost
        another user's file), else an empty one, else the least recently used (cut back to what it shares)."""
        taken = []
        while waiting and self.capacity() > 0:
            row = waiting.popleft()
            prompt = row.spec.prompt_ids
            free = [i for i, slot in enumerate(self.slots) if slot.row is None]
            for i in free:  # a step may cut the last token of a full slot it did not step
                del self.slots[i].ids[self.session.slot_length(i) :]
            # At least the prompt's last token is computed: its logits give the first new token.
            shared = {i: min(common_prefix(self.slots[i].ids, prompt), len(prompt) - 1) for i in free}
            hits = [i for i in free if shared[i] > 0 and 2 * shared[i] >= self.slots[i].prompt]
            empty = [i for i in free if not self.slots[i].ids]
            if hits:
                best = max(hits, key=lambda i: (shared[i], self.slots[i].used))
            elif empty:
                best = empty[0]  # the lowest: keeps steps small
            else:
                best = min(free, key=lambda i: self.slots[i].used)
            slot, keep = self.slots[best], shared[best]
            self.session.truncate_slot(best, keep)
            del slot.ids[keep:]
            slot.row, row.slot, slot.prompt = row, best, len(prompt)
            row.prompt_done = row.cached_tokens = keep
            taken.append(row)
        return taken

    def prefill(self, rows: list[Row], budget: int | None) -> tuple[list[Row], np.ndarray, int]:
        """Compute up to `budget` prompt tokens (None: all) of `rows`, taking turns; return the rows whose prompt
        is now complete, the logits of their last prompt token [n, V], and the number of appends run."""
        self._round += 1
        rows = sorted(rows, key=lambda r: r.last_chunk)  # least recently served first (stable: arrival order)
        needs = [len(r.spec.prompt_ids) - r.prompt_done for r in rows]
        shares = needs if budget is None else take_turns(needs, budget)
        done, logits, appends = [], [], 0
        for row, share in zip(rows, shares, strict=True):
            if share == 0:
                continue
            chunk = list(row.spec.prompt_ids[row.prompt_done : row.prompt_done + share])
            out = self.session.append_slot(row.slot, chunk)
            appends += 1
            self.slots[row.slot].ids.extend(chunk)
            row.prompt_done += share
            row.last_chunk = self._round
            if row.prompt_done == len(row.spec.prompt_ids):
                done.append(row)
                logits.append(out)
        vocab = self.session.config.vocab_size
        return done, (np.stack(logits) if logits else np.zeros((0, vocab), np.float32)), appends

    def step(self, rows: list[Row]) -> np.ndarray:
        logits = self.session.step_slots([r.slot for r in rows], [r.next_token for r in rows])
        for r in rows:
            self.slots[r.slot].ids.append(r.next_token)
        return logits

    def verify(self, row: Row, drafts: list[int]) -> tuple[list[int], int]:
        """Run the row's next token and its drafts in one run; return (the drafts the model agrees with, the
        model's own next token). The slot keeps the next token and the accepted drafts."""
        sampling = row.spec.sampling
        n, token = verify(self.session, row.slot, row.next_token, drafts, lambda x: adjust_logits(x, sampling))
        self.slots[row.slot].ids.extend([row.next_token, *drafts[:n]])
        return drafts[:n], token

    def release(self, row: Row) -> None:
        """The row leaves its slot; the slot keeps its cache unless more than cache_slots free slots hold one."""
        if row.slot is None:
            return
        slot = self.slots[row.slot]
        slot.row, row.slot = None, None
        self._clock += 1
        slot.used = self._clock
        kept = sorted((s for s in self.slots if s.row is None and s.ids), key=lambda s: s.used, reverse=True)
        for s in kept[self.cache_slots :]:
            self.drop(self.slots.index(s))

    def drop(self, index: int) -> None:
        """Forget a free slot's cache."""
        self.session.truncate_slot(index, 0)
        self.slots[index].ids.clear()
        self.slots[index].prompt = 0

    def reset(self) -> None:
        """Forget every free slot's cache (after a backend failure, whose effect on the buffers is unknown)."""
        for i, slot in enumerate(self.slots):
            if slot.row is None:
                self.drop(i)

    def cached(self) -> tuple[int, int]:
        """(free slots holding a cache, tokens in them)."""
        kept = [len(s.ids) for s in self.slots if s.row is None and s.ids]
        return len(kept), sum(kept)


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

    def prefill(self, rows: list[Row], budget: int | None) -> tuple[list[Row], np.ndarray, int]:
        """All the rows' prompts at once, left-padded (the batch API has no chunks): every row is done."""
        ids, mask = left_pad([list(r.spec.prompt_ids) for r in rows], self.pad)
        logits = self.session.prefill(ids, mask)
        for r in rows:
            r.prompt_done = len(r.spec.prompt_ids)
        return rows, logits, 1

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

    def reset(self) -> None:
        """Nothing is kept between batches."""

    def cached(self) -> tuple[int, int]:
        return 0, 0


# --prefill-chunk auto: a chunk of prompt tokens between two decode steps of the generating rows is sized
# so that the chunk and the step together take about GAP_STEPS steps: that is how long a stream waits for
# its next token while another row reads a long prompt. An append runs the weights once, like a step, plus
# a cost per token, both measured while serving (moving averages), so the size follows the model, its
# weights' precision and the machine's load. Measured on the 350M shape, 2 threads: fp32 a step 56 ms, an
# append 60 ms + 2.1 ms per token; int8 21 ms, 27 ms + 0.7 ms per token: about 40 tokens either way. The
# target sits half a step below 4 steps so that the longest of many gaps on a noisy machine stays within 4.
# FIRST_CHUNK is the size before anything is measured.
GAP_STEPS = 3.5
FIRST_CHUNK = 32
MIN_CHUNK = 8
# When no row is generating, only the waiting rows' time to first token matters: chunks of the session's own
# best piece size (the fused graph's reads long prompts fastest in pieces), else this many, which run at the
# machine's full GEMM speed; a row that arrives meanwhile still starts within one chunk.
IDLE_CHUNK = 512
_AVERAGE = 0.2  # weight of the newest measurement in the moving averages


# Speculative decoding: GroupQueryAttention checks a row's drafts in a run of its own on the CPU, so a drafting
# row reads the weights once more, while a plain step reads them once for every row. A row drafts when its
# expected tokens per run beat its share of a plain step over all generating rows (measured per row count);
# beyond SPECULATE_ROWS generating rows nobody drafts (None: no such limit).
SPECULATE_ROWS: int | None = None


class Batcher:
    """The scheduler: a bounded queue of waiting rows and one worker thread that runs the model.

    max_batch: rows running at once (row slots), at most the session's own max_batch (a TensorRT engine's
    built batch); max_queue: rows waiting at most (submit raises QueueFull beyond). metrics: a
    serve.metrics.Metrics or None. cache_slots: free row slots that keep their cache for prefix reuse
    (default max_batch; 0 turns reuse off). prefill_chunk: prompt tokens computed between two decode steps
    while rows are generating (None: sized from measured costs, see GAP_STEPS; 0: whole prompts at once).
    Both apply to sessions with row slots.
    """

    def __init__(
        self,
        session: Session,
        tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        metrics=None,
        cache_slots: int | None = None,
        prefill_chunk: int | None = None,
        drafter=None,
        speculate_rows: int | None = SPECULATE_ROWS,
    ):
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if (cache_slots or 0) < 0 or (prefill_chunk or 0) < 0:
            raise InputError(f"cache_slots and prefill_chunk must be >= 0, got {cache_slots} and {prefill_chunk}")
        if session.max_batch is not None:
            max_batch = min(max_batch, session.max_batch)  # a larger batch would fail every row it holds
        self.session = session
        self.tokenizer = tokenizer
        self.eos = set(tokenizer.end_ids)  # <|endoftext|>, and <eom> on a model that fills in the middle
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.prefill_chunk = prefill_chunk  # None: auto; 0: whole prompts
        if drafter is not None and not (session.supports_slots and session.multi_token_steps):
            raise InputError(
                f"speculative decoding needs a {session.name} session with multi-token row steps (the fused graph "
                "of a current export on the CPU, or torch): export again or serve without --speculate"
            )
        self.drafter = drafter
        self.speculate_rows = speculate_rows
        self._costs = StepCosts()  # one row's run of k tokens (speculation's cost model)
        self._step_rows: dict[int, float] = {}  # a plain step's seconds by the number of rows in it (moving averages)
        self._step_s: float | None = None  # moving averages: a decode step, and an append's cost per token
        self._token_s: float | None = None
        if session.supports_slots:
            cache_slots = max_batch if cache_slots is None else cache_slots
            if session.max_batch is not None:
                cache_slots = min(cache_slots, session.max_batch)
            self.engine = SlotEngine(session, max_batch, cache_slots)
        else:
            self.engine = BatchEngine(session, max_batch, tokenizer.eos_token_id)
        self.cache_slots = getattr(self.engine, "cache_slots", 0)
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="codegen-batcher", daemon=True)

    def describe_cache(self) -> str:
        """One line for the server's start-up: how many caches are kept and the KV memory they may take."""
        per_token = self.session.kv_bytes_per_token
        if not self.cache_slots or per_token is None:
            return "prefix cache: off"
        context = self.session.max_context
        most = self.cache_slots * context * per_token
        return (
            f"prefix cache: up to {self.cache_slots} idle row slots keep their prompt's cache "
            f"({per_token * 1000 / 2**20:.0f} MiB per 1,000 tokens; at most {most / 2**30:.2f} GiB for "
            f"{self.cache_slots} x {context} tokens, resident as filled)"
        )

    def describe_chunks(self) -> str:
        """One line for the server's start-up: how prompts are split while other rows generate."""
        if not self.engine.joins_running or self.prefill_chunk == 0:
            return "prompts: read whole"
        if self.prefill_chunk is None:
            return f"prompts: read in chunks sized to keep other streams' gaps near {GAP_STEPS:g} steps"
        return f"prompts: read in chunks of {self.prefill_chunk} tokens while other rows generate"

    def describe_speculation(self) -> str:
        """One line for the server's start-up: whether greedy rows draft tokens, and how."""
        if self.drafter is None:
            return "speculative decoding: off"
        most = f" while at most {self.speculate_rows} rows generate" if self.speculate_rows else ""
        return (
            f"speculative decoding: {self.drafter.name}, for greedy rows{most} (the same tokens as without; a row "
            "drafts only while its measured acceptance and the costs say it pays at the current load)"
        )

    def chunk_budget(self, generating: bool) -> int | None:
        """Prompt tokens to compute in this round (None: all of every waiting prompt)."""
        if not self.engine.joins_running or self.prefill_chunk == 0:
            return None
        idle = self.session.prompt_chunk or IDLE_CHUNK
        if not generating:
            return max(self.prefill_chunk or 0, idle)
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        if self._step_s is None or self._token_s is None:
            return FIRST_CHUNK
        # chunk + step = (step + tokens x per-token) + step <= GAP_STEPS x step
        tokens = (GAP_STEPS - 2) * self._step_s / self._token_s
        return int(min(max(tokens, MIN_CHUNK), idle))

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
        if self.drafter is not None:
            for row in rows:
                row.acceptance = Acceptance(history=self.drafter.history)
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
                self._count_cache(admitted)
                self._running.extend(admitted)
                self._round()
            except Exception as e:  # a backend failure fails the rows it touched; the server goes on
                message = str(e) if isinstance(e, CodegenDeployError) else f"{type(e).__name__}: {e}"
                for row in list(self._running):
                    self._send(row, RowUpdate("", [], error=f"generation failed: {message}"))
                self._leave(list(self._running), "error")
                self.engine.reset()
            self._gauges()
        for row in list(self._waiting) + self._running:
            self._send(row, RowUpdate("", [], error="the server is shutting down"))
        self._waiting.clear()
        self._leave(list(self._running), "error")

    def _round(self) -> None:
        """One round of the worker: a chunk of the prompts being read, then one step of the generating rows.

        Rows whose prompt completes in this round sample their first token now and step from the next round.
        """
        generating = [r for r in self._running if r.next_token is not None and not r.cancelled]
        reading = [r for r in self._running if r.next_token is None and not r.cancelled]
        if reading:
            budget = self.chunk_budget(bool(generating))
            before = sum(r.prompt_done for r in reading)
            start = time.perf_counter()
            done, logits, appends = self.engine.prefill(reading, budget)
            tokens = sum(r.prompt_done for r in reading) - before
            self._measure_prefill(time.perf_counter() - start, appends, tokens, budget)
            if done:
                self._accept(done, logits)
        if generating and self.drafter is not None and len(generating) <= (self.speculate_rows or len(generating)):
            plain_cost = self._plain_cost(len(generating))
            generating = [r for r in generating if not self._speculate(r, plain_cost)]
        if generating:
            start = time.perf_counter()
            logits = self.engine.step(generating)
            seconds = time.perf_counter() - start
            self._step_s = moving_average(self._step_s, seconds)
            self._step_rows[len(generating)] = moving_average(self._step_rows.get(len(generating)), seconds)
            if len(generating) == 1:
                self._costs.record(1, seconds)
            if self.metrics is not None:
                self.metrics.decode_runs.inc()
            self._accept(generating, logits)

    def _plain_cost(self, rows: int) -> float:
        """A row's share of a plain step over `rows` rows, in one-row steps (measured; until then, a step over
        many rows is taken to cost as much as over one, which favours plain steps)."""
        one, many = self._step_rows.get(1), self._step_rows.get(rows)
        if rows == 1 or one is None or many is None:
            return 1.0 / rows
        return many / rows / one

    def _speculate(self, row: Row, plain_cost: float) -> bool:
        """Draft for one row and check the drafts in a run of its own; False when the row drafts nothing this
        round (it takes the plain step with the others)."""
        if not row.speculates:
            return False
        room = self.session.max_context - self.session.slot_length(row.slot) - 1
        limit = min(row.spec.max_tokens - len(row.text.ids) - 1, room)
        step = self._costs.seconds.get(1)
        context = [*row.spec.prompt_ids, *row.text.ids]
        catch_up = self.drafter.catch_up_cost(context, row.slot, step)
        k = row.acceptance.choose(self._costs, self.drafter.cost_ratio(step), limit, plain_cost, catch_up)
        drafts = self.drafter.propose(context, k, row=row.slot) if k else []
        if not drafts:
            return False
        start = time.perf_counter()
        accepted, token = self.engine.verify(row, drafts)
        self._costs.record(len(drafts) + 1, time.perf_counter() - start)
        row.acceptance.update(len(drafts), len(accepted))
        if self.metrics is not None:
            self.metrics.speculation(drafted=len(drafts), accepted=len(accepted))
        self._record(row, [*accepted, token])
        return True

    def _record(self, row: Row, tokens: list[int]) -> None:
        """Chosen tokens of one row (a speculative round's): send its updates; a finished row leaves."""
        for token in tokens:
            self._sent(row, row.record(token), time.perf_counter())
            if row.finished:
                self._leave([row], row.finish_reason)
                return

    def _sent(self, row: Row, update: RowUpdate | None, now: float) -> None:
        """A token of `row` was chosen at `now`: count it, send the update it made, if any."""
        if self.metrics is not None:
            self.metrics.token(now - (row.last_token_at or row.submitted), first=row.last_token_at is None)
        row.last_token_at = now
        if update is not None:
            self._send(row, update)

    def _measure_prefill(self, seconds: float, appends: int, tokens: int, budget: int | None) -> None:
        """Learn an append's cost per token beyond the step-like cost of running the weights once."""
        if self.metrics is not None and budget is not None:
            self.metrics.prefill_chunk.set(budget)
        if self._step_s is not None and appends == 1 and budget is not None and tokens >= MIN_CHUNK:
            self._token_s = moving_average(self._token_s, max(seconds - self._step_s, 0.0) / tokens + 1e-6)

    def _count_cache(self, rows: list[Row]) -> None:
        if self.metrics is not None:
            for row in rows:
                self.metrics.prompt_cache(hit=row.cached_tokens, miss=len(row.spec.prompt_ids) - row.cached_tokens)

    def _accept(self, rows: list[Row], logits: np.ndarray) -> None:
        """Sample each row's next token from its logits [len(rows), V]; send updates; finished rows leave."""
        now = time.perf_counter()
        done, cancelled = [], []
        for row, row_logits in zip(rows, logits, strict=True):
            if row.cancelled:
                cancelled.append(row)
                continue
            self._sent(row, row.accept(row_logits), now)
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
            slots, tokens = self.engine.cached()
            self.metrics.set_load(
                queue_depth=len(self._waiting), active_rows=len(self._running), cached_slots=slots, cached_tokens=tokens
            )
