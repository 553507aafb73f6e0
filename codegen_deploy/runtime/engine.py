"""The one engine that every generation loop drives: generate(), stream(), codegen-bench and the server's
scheduler add rows and call step() until no row has work.

A step is three functions, in the shape of vLLM's EngineCore.step: plan() decides which rows read how many
prompt tokens, which rows step together and which rows draft how many tokens (a value a test can inspect
without a model); run() makes the session calls that plan needs; commit() samples, keeps the drafts the model
agrees with, advances each row's `computed`, tells the drafter what was accepted and returns the rows'
updates.

A row is its token ids (prompt, then what it generated) and `computed`, how many of them its slot's cache
holds; every run catches `computed` up towards len(ids). One rule covers chunked prompts (a row reading its
prompt reads the next piece), prefix reuse (a row starts with `computed` = what its slot's cache shares with
its prompt) and speculation (the row's last token and its drafts go into the cache in one run; the commit cuts
what the model did not agree with).

Chunks and reuse change no result by construction: every position of a prompt is computed in a run of at least
Session.min_piece tokens (take_turns: no shorter piece, nor a shorter one left), and a row reuses only what a
cache computed that way (prompt_cache.reusable: the last row's prompt, not its generated tokens). Two things
cannot be made exact so: a speculative check's run rounds otherwise than the one-token steps it stands for
(speculate.py), and chunks reused where they moved (cache_reuse, off by default) were computed after other text.

Each length has one owner; the others are derived from it or reconciled with it in one place:

| length                                  | owner                   | reconciled                                |
| --------------------------------------- | ----------------------- | ----------------------------------------- |
| a row's tokens (prompt + generated)     | Row.ids (its RowText's) | -                                         |
| a row's tokens in its slot's cache      | Row.computed            | the slot is cut back to it in commit()    |
| a free slot's tokens (the prefix cache) | _Slot.cached            | cut to Session.slot_length on admission * |
| an idle prompt's tokens (prompt cache)  | Entry.cached            | its SavedSlot is saved from them          |
| a drafter's copy of a row               | the drafter             | told admit() and accept(slot, n)          |
| the token a generating row feeds next   | Row.ids[-1]             | derived: computed == len(ids) - 1         |

* a step past a full slot may overwrite its last token (Session.extend_slots).

Sessions with row slots run in a SlotEngine (rows join and leave at any step). Sessions without them (the plain
ONNX Runtime graph, TensorRT, the CUDA fused graph) run in a BatchEngine: rows start together, left-padded, in
one prefill, and step together until the last one ends. Both are Engines: the same rows, plan, run and commit.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .costs import CostModel
from .prompt_cache import PromptCache, Reuse, reuse_plan
from .sampling import SamplingConfig, adjust_logits, make_generators, sample, token_logprobs
from .session import Session, piece_size
from .speculate import MAX_DRAFT, Acceptance, Drafter, exact_greedy, runs_several_tokens
from .text import RowText

# Prompt pieces while other rows generate (prefill_chunk None: auto): a round with pieces takes about GAP_STEPS
# plain rounds, which is how long a stream waits for its next token while another row reads a long prompt. The
# target sits half a step below 4 steps so that the longest of many gaps on a noisy machine stays near 4.
# FIRST_CHUNK is the size before anything is measured; MIN_CHUNK the least.
GAP_STEPS = 3.5
FIRST_CHUNK = 32
MIN_CHUNK = 8
# When no row is generating, only the waiting rows' time to first token matters: pieces of the session's own
# best size (the fused graph reads long prompts fastest in pieces), else this many, which run at the machine's
# full GEMM speed; a row that arrives meanwhile still starts within one piece.
IDLE_CHUNK = 512


@dataclass(frozen=True)
class RowSpec:
    """What one row generates: its prompt, length limit, sampling settings and what to report.

    sampling carries OpenAI's logit bias and penalties too (the penalties over the tokens this row
    generated so far). logprobs: None, or how many of the most likely tokens to report with each token
    (0: the chosen one only). prompt_logprobs: the same for each prompt token (the prompt's log-probabilities,
    which OpenAI's echo reports: rows with row slots only). max_tokens 0: the row reads its prompt and ends.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class RowUpdate:
    """What a row produced since its last update: new text (whole characters only), the tokens sampled
    (tokens whose text is held back, a possible stop string start or a split character, come with a
    later update), their log-probabilities when asked, and on the last update its finish_reason
    ("stop" or "length") or an error message. The first update says how many prompt tokens were reused and,
    when asked, the prompt tokens' log-probabilities (None for the first, which nothing predicts)."""

    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int | None = None  # on a row's first update: prompt tokens its slot's cache already held
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class Progress:
    """What one row did in one step: the tokens it chose (chosen), its drafts (drafted, accepted), whether its
    model run was a decode run (a step or a check of drafts: prompt reading is not), and the update to send,
    None while its text is held back."""

    row: Row
    chosen: int = 0
    drafted: int = 0
    accepted: int = 0
    decoded: bool = False
    update: RowUpdate | None = None


class Row:
    """One row while it runs: its ids and computed count (see the table above), its text, and its sampling
    state (a random generator of its own, penalty counts, draft acceptance)."""

    def __init__(self, spec: RowSpec, tokenizer, eos: set[int]):
        self.spec = spec
        self.text = RowText(tokenizer, list(spec.prompt_ids), eos, spec.stop)
        self.ids = self.text.all_ids  # prompt + generated: the RowText's list (one owner)
        self.prompt_len = len(spec.prompt_ids)
        self.computed = 0
        self.slot: int | None = None
        self.cached_tokens = 0  # prompt tokens the slot's cache held when the row came
        self.last_read = 0  # the step in which it last read a prompt piece (turn order)
        self.finish_reason: str | None = None  # OpenAI's: "stop" or "length"
        self.generators = None if spec.sampling.greedy else make_generators(spec.sampling, 1)
        self.counts: np.ndarray | None = None  # [V] tokens generated so far, for the penalties
        self.seen: np.ndarray | None = None  # [1, V] prompt and generated tokens, for the repetition penalty
        self.acceptance = Acceptance()
        self._reported_cache = False
        self._pending: list[int] = []
        self._pending_lp: list[float] = []
        self._pending_top: list[dict[int, float]] = []
        self.prompt_lp: list[float | None] = [None]  # with spec.prompt_logprobs: filled as the prompt is read
        self.prompt_top: list[dict[int, float] | None] = [None]

    @property
    def reading(self) -> bool:
        """Still reading its prompt (no token chosen yet)."""
        return self.computed < self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def speculates(self) -> bool:
        return exact_greedy(self.spec.sampling, self.spec.logprobs)

    def choose(self, logits: np.ndarray) -> int:
        """Sample the next token from this row's logits [V] with its own settings; remember its logprobs."""
        s = self.spec.sampling
        if self.counts is None and (s.presence_penalty or s.frequency_penalty):
            self.counts = np.zeros(logits.shape[-1], np.float32)
        if self.seen is None and s.repetition_penalty != 1.0:
            self.seen = np.zeros((1, logits.shape[-1]), bool)
            self.seen[0, [t for t in self.ids if t < logits.shape[-1]]] = True
        token = int(sample(adjust_logits(logits, s, self.counts)[None, :], s, self.generators, self.seen)[0])
        if self.spec.logprobs is not None:
            # Reported from the model's own distribution (the raw logits), before any sampling setting.
            lp, top = token_logprobs(logits, token, self.spec.logprobs)
            self._pending_lp.append(lp)
            self._pending_top.append(top)
        return token

    def score_prompt(self, start: int, logits: np.ndarray) -> None:
        """Remember the log-probabilities of the prompt tokens that logits [n, V] of positions start.. predict."""
        for j, row_logits in enumerate(logits):
            at = start + j + 1
            if at < self.prompt_len:
                lp, top = token_logprobs(row_logits, self.ids[at], self.spec.prompt_logprobs)
                self.prompt_lp.append(lp)
                self.prompt_top.append(top)

    def end_read(self) -> RowUpdate:
        """End a row of max_tokens 0 once its prompt is read, with no token."""
        self.finish_reason = "length"
        return self._update("", self.finish_reason)

    def record(self, token: int) -> RowUpdate | None:
        """Add a chosen token to the row; return the update to send, if any."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None and token < self.seen.shape[1]:
            self.seen[0, token] = True
        self.text.push(token)
        self._pending.append(token)
        if self.text.done or self.generated >= self.spec.max_tokens:
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
        if self.spec.prompt_logprobs is not None and not self._reported_cache:
            update.prompt_logprobs, update.prompt_top_logprobs = self.prompt_lp, self.prompt_top
        self._reported_cache = True
        self._pending, self._pending_lp, self._pending_top = [], [], []
        return update


def take_turns(needs: list[int], budget: int, least: int = Session.min_piece) -> list[int]:
    """Split `budget` prompt tokens between rows needing `needs` tokens, listed in turn order (the row served
    least recently first): the first row takes what it needs up to the budget, what it leaves goes to the
    next. Each append runs the weights once, so one row per step keeps a step's cost to its budget; rows
    take turns across steps, so each waiting prompt advances in turn. Pieces have at least `least` tokens
    (Session.min_piece; session.piece_size), which may take up to `least` tokens over the budget."""
    shares, left = [], budget
    for need in needs:
        shares.append(piece_size(need, left, least))
        left = max(0, left - shares[-1])
    return shares


def pieces_agree(session: Session, tokens: int = 40) -> bool:
    """Whether this machine's kernels compute a prompt read in pieces of at least Session.min_piece tokens as
    they compute it whole, which the exactness of prefix reuse and chunks rests on: a random prompt of `tokens`
    read whole and split twice in slot 0 (left empty) gives bitwise the same logits, and so does a piece read
    after it (the cache it left)."""
    least = session.min_piece
    tokens = min(tokens, session.max_context - least)
    if tokens < 2 * least:  # a context too short to split
        return True
    if session.slot_count == 0:
        session.open_slots(1)
    prompt = np.random.default_rng(0).integers(0, session.config.vocab_size, tokens + least).tolist()

    def read(pieces: list[int]) -> list[np.ndarray]:
        session.truncate_slot(0, 0)
        at, logits = 0, []
        for n in [*pieces, least]:
            logits.append(session.append_slot(0, prompt[at : at + n]))
            at += n
        return logits[-2:]

    try:
        whole = read([tokens])
        splits = ([least, tokens - least], [tokens // 2, tokens - tokens // 2])
        return all(np.array_equal(a, b) for split in splits for a, b in zip(read(split), whole, strict=True))
    finally:
        session.truncate_slot(0, 0)


@dataclass(frozen=True)
class Plan:
    """What one step runs: reads (row, prompt tokens it reads), steps (rows fed their last token together),
    drafts (row, tokens it may draft: its last token and the drafts are checked in a run of its own; a row
    whose drafter finds nothing steps with the others), and the prompt budget it was planned with (None:
    whole prompts)."""

    reads: tuple[tuple[Row, int], ...] = ()
    steps: tuple[Row, ...] = ()
    drafts: tuple[tuple[Row, int], ...] = ()
    budget: int | None = None


@dataclass
class Outputs:
    """What run() got back: the logits of each row whose prompt is complete [V], of the stepped rows
    [len(steps), V] in `stepped` order, and of each checked row (its drafts, logits [k + 1, V])."""

    read: list[tuple[Row, np.ndarray]] = field(default_factory=list)
    stepped: list[Row] = field(default_factory=list)
    step_logits: np.ndarray | None = None
    checked: list[tuple[Row, list[int], np.ndarray]] = field(default_factory=list)


class Engine(ABC):
    """Rows in a session: add() them, step() until has_work() is False. What every engine shares: the rows,
    the step as plan -> run -> commit, and the commit itself."""

    joins_running: bool  # whether a row may join while others run
    caching = False  # whether prompts' caches are kept for reuse (SlotEngine)
    prefill_chunk: int | None = 0  # prompt tokens read per step while rows generate (None: auto, 0: whole)

    def __init__(self, session: Session):
        self.session = session
        self.rows: list[Row] = []  # running, in the order they came
        self.costs = CostModel()
        self.steps_taken = 0
        self.last_plan = Plan()  # what the last step ran (the server's metrics read its prompt budget)
        self._round: tuple[float, int, list[tuple[int, int]]] | None = None  # the last round: start, rows, pieces

    def has_work(self) -> bool:
        return bool(self.rows)

    def step(self) -> list[Progress]:
        """One step: plan, run, commit; finished rows leave. Returns each running row's progress.

        A round is timed from its start to the next one's, all its caller does in between included, which is
        the gap its generating rows' streams see: the cost model learns how long plain rounds and rounds with
        prompt pieces take (rounds with drafts teach nothing here)."""
        now = time.perf_counter()
        if self._round is not None:
            self.costs.record_round(self._round[1], self._round[2], now - self._round[0])
        self.steps_taken += 1
        self.last_plan = plan = self.plan()
        stepped = len(plan.steps)
        # Only rounds that step generating rows, draft nothing and leave work run back to back (the caller loops
        # while there is work): others may be followed by a wait, and so may a round whose row is then removed
        # from outside (a client went away: remove() forgets the round). A row that joins after it (add()) makes
        # it no plain round either: its admission may copy a cache.
        timed = stepped > 0 and not plan.drafts
        pieces = [(n, r.computed) for r, n in plan.reads]
        progress = self.commit(plan, self.run(plan))
        self._round = (now, stepped, pieces) if timed and self.has_work() else None
        return progress

    @abstractmethod
    def capacity(self) -> int:
        """Rows that add() would take now."""

    @abstractmethod
    def add(self, row: Row) -> bool:
        """Start `row` if there is room for it now; False if not (it may wait and try again)."""

    @abstractmethod
    def plan(self) -> Plan: ...

    @abstractmethod
    def run(self, plan: Plan) -> Outputs: ...

    @abstractmethod
    def remove(self, row: Row) -> None:
        """`row` leaves now (cancelled, failed or finished): it is not stepped again."""

    def reset(self) -> None:
        """Forget every kept cache (after a backend failure, whose effect on the buffers is unknown)."""

    def commit(self, plan: Plan, out: Outputs) -> list[Progress]:
        """Choose the rows' tokens from what run() returned, advance `computed`, keep the accepted drafts and
        cut the rest; finished rows leave."""
        progress: dict[int, Progress] = {}
        for row, n in plan.reads:
            row.computed += n
            row.last_read = self.steps_taken
            progress[id(row)] = Progress(row)
        for row, logits in out.read:
            if row.spec.max_tokens == 0:
                progress[id(row)].update = row.end_read()
            else:
                self._choose(progress[id(row)], logits)
        for i, row in enumerate(out.stepped):
            row.computed += 1
            self._choose(progress.setdefault(id(row), Progress(row, decoded=True)), out.step_logits[i])
        for row, drafts, logits in out.checked:
            progress[id(row)] = self._check(row, drafts, logits)
        for p in progress.values():
            self._settle(p.row)
        return list(progress.values())

    def _choose(self, p: Progress, logits: np.ndarray) -> None:
        p.chosen += 1
        p.update = p.row.record(p.row.choose(logits))

    def _check(self, row: Row, drafts: list[int], logits: np.ndarray) -> Progress:
        """Keep the drafts the model agrees with (its argmax after everything before them: exact for greedy
        rows) and the model's own next token."""
        predicted = adjust_logits(logits, row.spec.sampling).argmax(-1)  # [k + 1]
        n = 0
        while n < len(drafts) and predicted[n] == drafts[n]:
            n += 1
        row.computed += 1 + n  # its last token and the accepted drafts; the settle cuts the rest
        row.acceptance.update(len(drafts), n)
        self.drafter_accepted(row, n)
        p = Progress(row, drafted=len(drafts), accepted=n, decoded=True)
        for token in [*drafts[:n], int(predicted[n])]:
            p.chosen += 1
            update = row.record(token)
            if update is not None:
                p.update = update if p.update is None else _merge(p.update, update)
            if row.finished:
                break
        return p

    def drafter_accepted(self, row: Row, n: int) -> None:
        """Tell the drafter how many of `row`'s drafts were accepted (engines that draft)."""

    def _settle(self, row: Row) -> None:
        """The row's cache holds what it computed of its ids (a row that ended inside its accepted drafts holds
        less); a finished row leaves."""
        row.computed = min(row.computed, len(row.ids))
        if row.finished:
            self.remove(row)


def _merge(first: RowUpdate, then: RowUpdate) -> RowUpdate:
    """Two updates of one row in one step as one."""
    return RowUpdate(
        first.text + then.text,
        first.tokens + then.tokens,
        finish_reason=then.finish_reason,
        cached_tokens=first.cached_tokens,
        prompt_logprobs=first.prompt_logprobs,
        prompt_top_logprobs=first.prompt_top_logprobs,
    )


@dataclass
class _Slot:
    """A row slot: the row running in it, or while free the token ids its cache holds and how many of them were
    the last row's prompt; when it was last used (least-recently-used)."""

    row: Row | None = None
    cached: list[int] = field(default_factory=list)
    prompt: int = 0
    used: int = 0


@dataclass(frozen=True)
class CacheState:
    """What the prompt cache holds: idle prompts (in free slots and in the prompt cache), their tokens and bytes
    (bytes: the prompt cache's copies, and the free slots' tokens at the session's bytes per token), and how
    many prompts it evicted so far."""

    entries: int = 0
    tokens: int = 0
    nbytes: int = 0
    evictions: int = 0


class SlotEngine(Engine):
    """Rows in the session's row slots: a row joins at any step, its prompt read in pieces after whatever
    of it a cache holds; greedy rows draft when it pays.

    rows: rows running at once (the session's slots). cache_memory: bytes of idle prompts' caches kept beyond the
    slots for prefix reuse (runtime/prompt_cache.py; 0: no reuse, a free slot forgets its cache). cache_reuse:
    with N > 0, runs of at least N tokens that a cache holds at later positions are moved to where the prompt
    has them (approximate: they were computed after other text). prefill_chunk: prompt tokens read per step
    while other rows generate (None: sized from the measured costs, see GAP_STEPS; 0: whole prompts). drafter:
    a speculate.Drafter with a slot per session slot, or None.
    """

    joins_running = True

    def __init__(
        self,
        session: Session,
        rows: int,
        cache_memory: int = 0,
        prefill_chunk: int | None = 0,
        drafter: Drafter | None = None,
        max_draft: int = MAX_DRAFT,
        cache_reuse: int = 0,
    ):
        super().__init__(session)
        if drafter is not None and not runs_several_tokens(session):
            raise InputError(
                f"speculative decoding needs a {session.name} session with multi-token row steps (the fused graph "
                "of a current export on the CPU, or torch): export again or decode without speculation"
            )
        if cache_memory < 0 or cache_reuse < 0:
            raise InputError(f"cache_memory and cache_reuse must be >= 0, got {cache_memory} and {cache_reuse}")
        if session.slot_count < rows:
            session.open_slots(rows)
        self.max_rows = rows
        self.store = PromptCache(cache_memory)
        self.cache_reuse = cache_reuse
        self.prefill_chunk = prefill_chunk
        self.drafter, self.max_draft = drafter, max_draft
        if drafter is not None:
            drafter.open(rows)
        self.slots = [_Slot() for _ in range(rows)]
        self._clock = 0

    @property
    def caching(self) -> bool:
        """Whether prompts' caches are kept for reuse (the prompt cache has room)."""
        return self.store.capacity > 0

    # -- admission ---------------------------------------------------------------------------------------

    def capacity(self) -> int:
        return self.max_rows - len(self.rows)

    def add(self, row: Row) -> bool:
        """Start `row` with the cache, in a free slot or in the prompt cache, that gives it the most of its prompt
        (reuse_plan): in that slot, else in an empty one, else in the least recently used (whose cache moves to
        the prompt cache). A cache that gives at least half of the prompt it was made for is taken (the same
        file, edited); one that gives less (a few common tokens) is copied and kept for its own user."""
        if self.capacity() <= 0:
            return False
        self._round = None  # a row joining between two rounds is no plain round (its cache may be copied in)
        prompt = row.spec.prompt_ids
        free = [i for i, slot in enumerate(self.slots) if slot.row is None]
        for i in free:
            del self.slots[i].cached[self.session.slot_length(i) :]
        least = self.session.min_piece
        sources = [self.slots[i] for i in free if self.slots[i].cached] + self.store.entries
        plans = {id(s): reuse_plan(s.cached, s.prompt, prompt, least, self.cache_reuse) for s in sources}
        # A row that reports its prompt's log-probabilities reads all of it: a cache holds no logits.
        scores = row.spec.prompt_logprobs is not None
        hits = [s for s in sources if plans[id(s)].tokens > 0 and not scores]
        best = max(hits, key=lambda s: (plans[id(s)].tokens, isinstance(s, _Slot), s.used), default=None)
        reuse = Reuse(0) if best is None else plans[id(best)]
        same_file = best is not None and 2 * reuse.tokens >= best.prompt
        if isinstance(best, _Slot):
            index = self.slots.index(best)
        else:
            empty = [i for i in free if not self.slots[i].cached]
            index = empty[0] if empty else min(free, key=lambda i: self.slots[i].used)  # the lowest: small steps
        if self.drafter is not None and row.speculates:  # first: a drafter that fails leaves the engine as it was
            self.drafter.admit(index, row.ids)
            row.acceptance = Acceptance(self.max_draft, self.drafter.history)
        if isinstance(best, _Slot):
            if not same_file:
                self._stash(index)
        else:
            if best is not None and same_file:
                self.store.take(best)  # before the stash, which may evict
            self._stash(index)
            if best is not None:
                self.session.load_slot(index, best.saved, best.saved.tokens)
        for source, target, count in reuse.moves:
            self.session.move_slot_tokens(index, source, target, count)
        self.session.truncate_slot(index, reuse.tokens)
        slot = self.slots[index]
        slot.row, slot.cached, slot.prompt = row, [], len(prompt)
        row.slot, row.computed, row.cached_tokens = index, reuse.tokens, reuse.tokens
        self.rows.append(row)
        return True

    def _stash(self, index: int) -> None:
        """Before a free slot takes another prompt: a copy of its cache's prompt part goes to the prompt cache."""
        slot = self.slots[index]
        keep = min(len(slot.cached), slot.prompt)
        if self.caching and self.session.saves_slots and keep >= self.session.min_piece:
            self.store.put(slot.cached[:keep], self.session.save_slot(index, keep), slot.used)

    def remove(self, row: Row) -> None:
        """The row leaves its slot; the slot keeps what the row computed as its cache (while caching)."""
        if row not in self.rows:
            return
        self._round = None
        self.rows.remove(row)
        slot = self.slots[row.slot]
        self.session.truncate_slot(row.slot, row.computed)
        slot.row, slot.cached, slot.prompt = None, row.ids[: row.computed], row.prompt_len
        self._clock += 1
        slot.used = self._clock
        if not self.caching:
            self.drop(row.slot)
        row.slot = None

    def drop(self, index: int) -> None:
        """Forget a free slot's cache."""
        self.session.truncate_slot(index, 0)
        self.slots[index].cached = []
        self.slots[index].prompt = 0

    def reset(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot.row is None:
                self.drop(i)
        self.store.entries.clear()

    def cache_state(self) -> CacheState:
        """What the prompt cache holds now."""
        idle = [len(s.cached) for s in self.slots if s.row is None and s.cached]
        per_token = self.session.kv_bytes_per_token or 0
        return CacheState(
            len(idle) + len(self.store.entries),
            sum(idle) + self.store.tokens,
            sum(idle) * per_token + self.store.nbytes,
            self.store.evictions,
        )

    # -- plan ----------------------------------------------------------------------------------------------

    def budget(self, generating: int, start: int = 0) -> int | None:
        """Prompt tokens to read in a step while `generating` rows generate, the first piece read after `start`
        cached tokens (None: every prompt whole)."""
        if self.prefill_chunk == 0:
            return None
        idle = self.session.prompt_chunk or IDLE_CHUNK
        if not generating:
            return max(self.prefill_chunk or 0, idle)
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        tokens = self.costs.piece_tokens(generating, GAP_STEPS, start)
        return FIRST_CHUNK if tokens is None else int(min(max(tokens, MIN_CHUNK), idle))

    def plan(self) -> Plan:
        """Prompt pieces for the reading rows (taking turns within the budget), drafts for the greedy rows whose
        expected tokens per second beat their share of a plain step, a plain step for the other generating
        rows. Choosing drafts advances the rows' probe clocks (speculate.Acceptance)."""
        reading = [r for r in self.rows if r.reading]
        generating = [r for r in self.rows if not r.reading]
        ordered = sorted(reading, key=lambda r: r.last_read)  # least recently served first (stable: arrival)
        budget = self.budget(len(generating), ordered[0].computed) if reading else None
        needs = [r.prompt_len - r.computed for r in ordered]
        shares = needs if budget is None else take_turns(needs, budget, self.session.min_piece)
        reads = tuple((r, n) for r, n in zip(ordered, shares, strict=True) if n)
        drafts = tuple(self._draft_sizes(generating))
        drafting = {id(r) for r, _ in drafts}
        return Plan(reads, tuple(r for r in generating if id(r) not in drafting), drafts, budget)

    def _draft_sizes(self, generating: list[Row]):
        if self.drafter is None or not generating:
            return
        share = self.costs.share(len(generating))
        step = self.costs.steps.get(1)
        ratio = self.drafter.cost_ratio(step)
        for row in generating:
            if not row.speculates:
                continue
            room = self.session.max_context - row.computed - 1
            limit = min(row.spec.max_tokens - row.generated - 1, room)
            catch_up = self.drafter.catch_up_cost(row.ids, row.slot, step)
            k = row.acceptance.choose(self.costs, ratio, limit, share, catch_up)
            if k:
                yield row, k

    # -- run -----------------------------------------------------------------------------------------------

    def run(self, plan: Plan) -> Outputs:
        """The session calls of `plan`, timed into the cost model: a piece per reading row, the drafter's
        proposals, one step over the stepping rows (and the rows whose drafter found nothing), a run per
        drafting row."""
        out = Outputs()
        for row, n in plan.reads:
            start = time.perf_counter()
            piece = row.ids[row.computed : row.computed + n]
            if row.spec.prompt_logprobs is None:
                logits = self.session.append_slot(row.slot, piece)
            else:
                every = self.session.score_slot(row.slot, piece)  # [n, V]
                row.score_prompt(row.computed, every)
                logits = every[-1]
            self.costs.record_run(n, time.perf_counter() - start, row.computed)
            if row.computed + n == row.prompt_len:
                out.read.append((row, logits))
        proposals = [(row, self.drafter.propose(row.ids, k, row.slot)) for row, k in plan.drafts]
        out.stepped = [*plan.steps, *(row for row, drafts in proposals if not drafts)]
        if out.stepped:
            start = time.perf_counter()
            out.step_logits = self.session.step_slots([r.slot for r in out.stepped], [r.ids[-1] for r in out.stepped])
            self.costs.record_step(len(out.stepped), time.perf_counter() - start)
        for row, drafts in proposals:
            if drafts:
                start = time.perf_counter()
                logits = self.session.extend_slots([row.slot], [[row.ids[-1], *drafts]])[0]  # [k + 1, V]
                self.costs.record_run(len(drafts) + 1, time.perf_counter() - start, row.computed)
                out.checked.append((row, drafts, logits))
        return out

    # -- commit --------------------------------------------------------------------------------------------

    def drafter_accepted(self, row: Row, n: int) -> None:
        self.drafter.accept(row.slot, n)

    def _settle(self, row: Row) -> None:
        super()._settle(row)
        if row.slot is not None and self.session.slot_length(row.slot) > row.computed:
            self.session.truncate_slot(row.slot, row.computed)  # drafts the model did not agree with


class BatchEngine(Engine):
    """Rows through the session's batch API (sessions without row slots): rows added before the first step
    start together (left-padded, one prefill); the batch steps until its last row ends (rows that ended are
    fed the pad token), then takes new rows."""

    joins_running = False

    def __init__(self, session: Session, rows: int, pad_token_id: int):
        super().__init__(session)
        self.max_rows, self.pad = rows, pad_token_id
        self.batch: list[Row] = []  # every row of the running batch, ended ones too (their index is their place)
        self.started = False

    def capacity(self) -> int:
        return 0 if self.started else self.max_rows - len(self.batch)

    def add(self, row: Row) -> bool:
        """Join the batch before it starts, if the batch still fits the context with it (left padding makes
        every row as long as the longest prompt)."""
        if row.spec.prompt_logprobs is not None:
            raise InputError(
                f"the {self.session.name} session returns the last position's logits only: a prompt's "
                "log-probabilities need row slots (the fused graph on the CPU, or torch)"
            )
        if self.capacity() <= 0:
            return False
        longest = max([row.prompt_len, *(r.prompt_len for r in self.batch)])
        most_new = max([row.spec.max_tokens, *(r.spec.max_tokens for r in self.batch)])
        if self.batch and longest + most_new > self.session.max_context:
            return False
        self.batch.append(row)
        self.rows.append(row)
        return True

    def remove(self, row: Row) -> None:
        self._round = None
        if row in self.rows:
            self.rows.remove(row)
        if not self.rows:
            self.batch, self.started = [], False

    def plan(self) -> Plan:
        if not self.started:
            return Plan(reads=tuple((r, r.prompt_len) for r in self.rows))
        return Plan(steps=tuple(self.rows))

    def run(self, plan: Plan) -> Outputs:
        out = Outputs()
        if plan.reads:
            ids, mask = left_pad([list(r.spec.prompt_ids) for r in self.batch], self.pad)
            logits = self.session.prefill(ids, mask)
            self.started = True
            out.read = [(r, logits[self.batch.index(r)]) for r, _ in plan.reads]
        if plan.steps:
            places = [self.batch.index(r) for r in plan.steps]  # rows that ended keep their place, fed the pad
            tokens = np.full(len(self.batch), self.pad, np.int64)
            tokens[places] = [r.ids[-1] for r in plan.steps]
            out.stepped = list(plan.steps)
            out.step_logits = self.session.step(tokens)[places]
        return out


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths -> ids [B, T] and mask [B, T] (0 on the padding at the left)."""
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return ids, mask
