"""Speculative decoding for greedy rows: draft a few tokens cheaply, check them in one run of the model, keep
the longest prefix the model agrees with and the model's own next token.

Decoding one token at a time reads every weight once per token; a run over k + 1 new tokens reads them once
for all of them (Session.extend_slots), so a draft the model agrees with is nearly free. For greedy decoding
a drafted token is kept only where it is the model's own argmax after everything before it. Sampled rows, and
rows whose sampling depends on the tokens generated so far (repetition, presence and frequency penalties), are
decoded plainly.

Exact in its choices, not in its numbers: a check runs several tokens per row, which the kernels round otherwise
than the one-token steps it stands for (Session.min_piece), so where a step's two best logits are closer than
that rounding the check may choose the other. In float32 that is about 1e-6 of a logit, in float16 about 1e-4;
in int8 and int4 exports a rounding can move an activation to another quantization step, and greedy answers
part from plain decoding's (benchmarks/exactness.py). So `--speculate auto` drafts on SPECULATE_BY_DEFAULT
exports only; elsewhere it is asked for by name.

Drafters: PromptLookup (the continuation of the row's latest n-gram where it occurred before: code repeats
identifiers, signatures and lines) and DraftModel (a smaller model with the same tokenizer, greedy).

Never slower: each row keeps an estimate of how often a drafted token is accepted (Acceptance); with the
session's measured cost of a run with j new tokens (costs.CostModel), the drafter's cost per token and what it
must read before it drafts (a draft model catching up on the row's context), a round drafts the k that
maximises expected tokens per second, and none when plain decoding is expected faster. While none pays, a
probe of one token now and then finds out whether drafting pays again; probes are spaced so that they cost
at most PROBE_SHARE of the decode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import CodegenDeployError, InputError
from .costs import APPEND_TOKEN_COST, CostModel
from .session import Session, common_prefix

# Drafted tokens per round at most: beyond 8 a run's cost grows faster than a typical draft is accepted.
MAX_DRAFT = 8
# The prior of a row's acceptance before it has drafted (weight: PRIOR_WEIGHT rounds), and the forgetting of
# older rounds: code alternates between stretches that repeat and stretches that do not.
PRIOR_ACCEPTANCE, PRIOR_WEIGHT, FORGET = 0.5, 2.0, 0.9
# Rounds between two probes while drafting does not pay (a probe drafts one token to learn whether it does
# now); the gap doubles after each probe that finds nothing, up to PROBE_MAX, so a drafter that never agrees
# costs a handful of probes over a long decode.
PROBE_EVERY, PROBE_MAX = 16, 256
# The most of a decode's time that probes may cost: a probe that costs c steps more than a plain step waits at
# least c / PROBE_SHARE rounds after the last draft (a draft model catching up on 64 tokens waits ~60 rounds).
PROBE_SHARE = 0.02


class Drafter:
    """What every drafter does: propose up to k tokens after a row's ids, learn which of them were accepted
    (accept: it is told, it does not compare contexts), meet a new row in a slot (admit), say what a drafted
    token costs and what it reads before drafting (in steps of the model), and keep `history`, how often its
    drafts were accepted over all rows (a new row starts from it: a drafter that is never right does not try
    again on every request)."""

    name = "drafter"

    def __init__(self):
        self.history = Acceptance()

    def propose(self, ids: Sequence[int], k: int, row: int = 0) -> list[int]:
        """Up to k tokens to follow `ids` (a row's prompt and output so far) in row slot `row`."""
        raise NotImplementedError

    def open(self, slots: int) -> None:
        """Have a place for each of `slots` row slots (the engine's count: a row drafts in its own slot's)."""

    def admit(self, row: int, ids: Sequence[int]) -> None:
        """A new row, whose ids so far are `ids`, starts in slot `row`."""

    def accept(self, row: int, n: int) -> None:
        """The first n tokens of the last proposal for slot `row` were accepted (the row then holds them and
        the model's own next token)."""

    def cost_ratio(self, step_seconds: float | None) -> float:
        """A drafted token's cost in steps of the model (step_seconds: a step's, when measured)."""
        return 0.0

    def catch_up_cost(self, ids: Sequence[int], row: int, step_seconds: float | None) -> float:
        """What drafting after `ids` costs before the first drafted token, in steps of the model."""
        return 0.0

    def close(self) -> None:
        pass


class PromptLookup(Drafter):
    """Drafts the tokens that followed the latest earlier occurrence of the row's last n tokens (n from
    max_ngram down to min_ngram) in its prompt and output: prompt-lookup decoding. Costs no model run."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        super().__init__()
        if not 1 <= min_ngram <= max_ngram:
            raise InputError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids: Sequence[int], k: int, row: int = 0) -> list[int]:
        """Up to k tokens to follow `ids` (a row's prompt and output so far); [] when no n-gram recurs."""
        context = np.asarray(ids, dtype=np.int64)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)  # [len - n, n], not the tail
            hits = np.flatnonzero((windows == context[-n:]).all(axis=1)) + n  # where each continuation starts
            if len(hits):
                # The latest occurrence with k tokens after it (code repeats what is near), else the one with
                # the longest continuation (in a loop, the latest is followed by the tail only).
                whole = hits[hits + k <= len(context)]
                start = int(whole[-1] if len(whole) else hits[0])
                return context[start : start + k].tolist()
        return []


# A draft model reads at most this many tokens of a row's context to catch up before a draft (the start of a
# long prompt is left out): what a row pays before it knows whether the draft model's tokens are accepted.
DRAFT_WINDOW = 64


class DraftModel(Drafter):
    """Drafts greedily with a smaller model that shares the tokenizer (its own Session with row slots, one per
    row). Its cache follows each row over a window of the row's context: admit() keeps what a slot's cache
    shares with a new row's prompt, accept() cuts the drafts the model did not agree with, and when catching
    up would mean reading more than DRAFT_WINDOW tokens it starts again from the last DRAFT_WINDOW (drafts need
    the recent context; an exact result never depends on them). relative_cost: a draft step's cost in steps of
    the model it drafts for, until measured (make_drafter sets it from the parameter counts)."""

    name = "draft"

    def __init__(self, session: Session, rows: int = 1, relative_cost: float = 1.0):
        if not session.supports_slots:
            raise InputError(f"the draft model's {session.name} session has no row slots: use an ONNX export on CPU")
        super().__init__()
        self.session = session
        self.relative_cost = relative_cost
        self.costs = CostModel()  # the draft model's own runs
        self.held: list[list[int]] = []  # what each slot holds: the row's ids[start:]
        self.start: list[int] = []  # where in the row's ids each slot's window begins
        self.fed: list[tuple[int, int]] = []  # each slot's last proposal: its length before the drafts, drafts fed
        self.open(rows)

    def open(self, slots: int) -> None:
        """Row slots in the draft model's session, as many as the engine it drafts for has (more kept). Slots
        the session had before (another drafter's) start empty: what they hold is not known here."""
        if len(self.held) >= slots:
            return
        if self.session.slot_count < slots:
            self.session.open_slots(slots)
        for i in range(self.session.slot_count):
            self.session.truncate_slot(i, 0)
        count = self.session.slot_count
        self.held, self.start, self.fed = [[] for _ in range(count)], [0] * count, [(0, 0)] * count

    def admit(self, row: int, ids: Sequence[int]) -> None:
        """A new row in slot `row`: keep what the slot's cache shares with its ids (a window that began past
        the start of the old row's ids shares nothing with the new one's start)."""
        shared = common_prefix(self.held[row], ids) if self.start[row] == 0 else 0
        self._keep(row, 0, shared)

    def accept(self, row: int, n: int) -> None:
        """Of the last proposal for slot `row`, the first n drafts were accepted: the rest leave its cache."""
        before, fed = self.fed[row]
        self._keep(row, self.start[row], before + min(n, fed))

    def _keep(self, row: int, start: int, length: int) -> None:
        self.start[row] = start
        del self.held[row][length:]
        self.session.truncate_slot(row, length)

    def cost_ratio(self, step_seconds: float | None) -> float:
        """A drafted token's cost in steps of the model (measured when both are, else relative_cost)."""
        own = self.costs.steps.get(1)
        if own is None or not step_seconds:
            return self.relative_cost
        return own / step_seconds

    def catch_up_cost(self, ids: Sequence[int], row: int, step_seconds: float | None) -> float:
        """What the draft model reads of `ids` before its first draft, beyond one draft step, in steps of the
        model: little while it drafts every round, a window of the context after it has not for a while."""
        start, shared = self._window(ids, row, 1)
        behind = len(ids) - start - shared
        if self.costs.token_s is None or self.costs.steps.get(1) is None or not step_seconds:
            return (behind - 1) * APPEND_TOKEN_COST * self.relative_cost
        return (behind - 1) * self.costs.token_s / step_seconds

    def _window(self, ids: Sequence[int], row: int, k: int) -> tuple[int, int]:
        """Where the slot's window over `ids` begins and how much of what it holds stays (the rest is read)."""
        start, held = self.start[row], len(self.held[row])
        room = self.session.max_context - k - 1
        shared = min(held, len(ids) - start - 1)
        if len(ids) - start - shared > DRAFT_WINDOW or len(ids) - start > room:
            return max(0, len(ids) - min(DRAFT_WINDOW, room)), 0  # a new window over the recent context
        return start, shared

    def propose(self, ids: Sequence[int], k: int, row: int = 0) -> list[int]:
        """k greedy tokens of the draft model after `ids` (a row's whole context, of which the slot holds
        what admit() and accept() told it)."""
        if k == 0:
            return []
        start, shared = self._window(ids, row, k)
        new = list(ids[start + shared :])
        if max(new) >= self.session.config.vocab_size:
            return []  # a token the draft model does not know: no draft
        self._keep(row, start, shared)
        held = self.held[row]
        begin = time.perf_counter()
        logits = self.session.append_slot(row, new)
        self.costs.record_run(len(new), time.perf_counter() - begin, len(held))
        held.extend(new)
        drafts = [int(logits.argmax())]
        self.fed[row] = (len(held), k - 1)
        while len(drafts) < k:
            begin = time.perf_counter()
            logits = self.session.step_slots([row], [drafts[-1]])[0]
            self.costs.record_step(1, time.perf_counter() - begin)
            held.append(drafts[-1])
            drafts.append(int(logits.argmax()))
        return drafts

    def close(self) -> None:
        self.session.close()


class Acceptance:
    """How often a row's drafted tokens are accepted: accepted tokens against the first rejection of each
    round (the geometric model's estimate), with older rounds forgotten, and the k it pays to draft. A row
    starts from its drafter's history (what the drafter's drafts did on earlier rows), which it updates, and
    probes on the history's clock: rounds of every row count, so a drafter whose probes are dear still probes
    when each request is shorter than the gap between two probes."""

    def __init__(self, max_draft: int = MAX_DRAFT, history: Acceptance | None = None):
        self.max_draft, self.history = max_draft, history
        prior = PRIOR_ACCEPTANCE if history is None else history.rate
        self.accepted, self.rejected = prior * PRIOR_WEIGHT, (1 - prior) * PRIOR_WEIGHT
        self.idle = 0  # rounds since the last draft
        self.probe_gap = PROBE_EVERY

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.accepted = FORGET * self.accepted + accepted
            self.rejected = FORGET * self.rejected + (accepted < drafted)
            self.probe_gap = PROBE_EVERY if accepted else min(2 * self.probe_gap, PROBE_MAX)
            if self.history is not None:
                self.history.update(drafted, accepted)

    def choose(
        self, costs: CostModel, draft_ratio: float, limit: int, plain_cost: float = 1.0, catch_up: float = 0.0
    ) -> int:
        """Tokens to draft this round (0: a plain step): the k that maximises expected tokens per second,
        E(k) = (1 - a^(k+1)) / (1 - a) tokens for a run of k + 1 tokens, k drafted ones (each draft_ratio
        steps) and what the drafter reads before it drafts (catch_up steps), if that beats a plain token, which
        costs `plain_cost` one-row steps (less than 1 when the row steps with others). While none pays, a
        probe of 1 now and then: further apart while probes find nothing, and never costing more than
        PROBE_SHARE of the rounds in between."""
        a = min(self.rate, 0.999)
        best, best_speed = 0, 1.0 / plain_cost
        for k in range(1, min(self.max_draft, limit) + 1):
            speed = (1 - a ** (k + 1)) / (1 - a) / (costs.run(k + 1) + k * draft_ratio + catch_up)
            if speed > best_speed:
                best, best_speed = k, speed
        clock = self.history if self.history is not None else self
        clock.idle = 0 if best else clock.idle + 1
        probe_cost = costs.run(2) + draft_ratio + catch_up - plain_cost  # beyond the plain step it replaces
        if not best and clock.idle >= max(clock.probe_gap, probe_cost / PROBE_SHARE) and limit >= 1:
            clock.idle = 0
            return 1
        return best


@dataclass
class SpeculationStats:
    """Counts over a decode: tokens drafted and accepted, runs of the model (the prompt's included), tokens
    produced. Plain decoding makes one token per run; each accepted draft adds one to a run."""

    drafted: int = 0
    accepted: int = 0
    runs: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_run(self) -> float:
        return self.tokens / self.runs if self.runs else 0.0

    def describe(self) -> str:
        """The counts in words for people: what was drafted and accepted, and tokens per run next to plain
        decoding's 1.00 (a speedup needs more, and drafts that cost little)."""
        if not self.drafted:
            return (
                "no tokens drafted (the drafter found nothing, or drafting was not expected to pay): every token "
                "came from a plain step"
            )
        return (
            f"{self.accepted} of {self.drafted} drafted tokens accepted ({self.acceptance:.0%}): "
            f"{self.tokens_per_run:.2f} tokens per run of the model (plain decoding makes 1.00)"
        )

    def to_dict(self) -> dict:
        return {**self.__dict__, "acceptance": self.acceptance, "tokens_per_run": self.tokens_per_run}


SPECULATE_MODES = ("auto", "lookup", "draft", "off")
# The export kinds (Session.export_kind) on which --speculate auto drafts: those whose checks changed no greedy
# answer in benchmarks/exactness.py (60 requests each, always drafting; int8 and int4 changed some).
SPECULATE_BY_DEFAULT = ("float32", "float16")


def this_export(session: Session) -> str:
    """ "this int8 export" (the session's export kind where known, else "this export"), for messages."""
    return f"this {session.export_kind} export" if session.export_kind else "this export"


def speculation_note(session: Session) -> str | None:
    """A note for a user who asks for speculative decoding on an export whose checks may change a greedy answer
    (not SPECULATE_BY_DEFAULT), else None."""
    if session.export_kind in SPECULATE_BY_DEFAULT:
        return None
    return (
        f"note: on {this_export(session)} a speculative check rounds otherwise than plain steps, so a greedy "
        "answer may part from plain decoding's where two tokens are nearly tied: --speculate off gives plain "
        "decoding's"
    )


def exact_greedy(sampling, logprobs: int | None = None) -> bool:
    """Whether a row's tokens can be checked exactly against drafts: greedy, no penalties (they depend on the
    tokens chosen so far), no logprobs to report (a checked run yields no distribution per token)."""
    s = sampling
    plain = s.repetition_penalty == 1.0 and not s.presence_penalty and not s.frequency_penalty
    return s.greedy and plain and logprobs is None


def runs_several_tokens(session: Session) -> bool:
    """Whether a session can check drafts: row slots whose runs take several tokens per slot."""
    return session.supports_slots and session.multi_token_steps


def make_drafter(mode: str, session: Session, sampling, draft: str | None = None, tokenizer=None, **options):
    """The drafter a command asks for: "off" (None), "lookup", "draft" (a DraftModel over the export `draft`,
    opened with onnxruntime `options`), or "auto": the draft model when one is given (refused where it cannot
    run, never ignored), else prompt lookup where speculation is exact enough (greedy, a session with
    multi-token steps, a SPECULATE_BY_DEFAULT export), else None. The engine it drafts for opens its row
    slots (Drafter.open). tokenizer: the model's (a Tokenizer or a folder), which the draft model's must equal
    (check_draft_tokenizer); None compares the vocabulary sizes only."""
    from .backends import open_session

    if mode not in SPECULATE_MODES:
        raise InputError(f"unknown speculation {mode!r}: choose one of {', '.join(SPECULATE_MODES)}")
    check_draft(mode, draft)
    if draft is not None and tokenizer is not None:
        check_draft_tokenizer(draft, tokenizer)
    if mode == "auto" and draft is not None:
        mode = "draft"
    by_default = session.export_kind in SPECULATE_BY_DEFAULT
    if mode == "off" or (
        mode == "auto" and not (exact_greedy(sampling) and runs_several_tokens(session) and by_default)
    ):
        return None
    check_speculation(session, sampling)
    if mode == "lookup" or (mode == "auto" and draft is None):
        return PromptLookup()
    if draft is None:
        raise InputError(
            "--speculate draft needs a draft model: give --draft EXPORT (a smaller export of the same family)"
        )
    draft_session = open_session("onnxruntime", draft, **options)
    if draft_session.config.vocab_size != session.config.vocab_size:
        vocab = draft_session.config.vocab_size
        draft_session.close()
        raise InputError(
            f"the draft model {draft} has {vocab} token ids, the model {session.config.vocab_size}: a draft model "
            "must share the tokenizer (e.g. codegen-350M drafting for codegen-2B of the same family)"
        )
    ratio = draft_session.config.num_parameters() / session.config.num_parameters()
    return DraftModel(draft_session, relative_cost=ratio)


def check_draft(mode: str, draft: str | Path | None) -> None:
    """Refuse in one line, before anything is loaded, a draft model (`draft`, an export folder) that would go
    unused (speculation `mode` off or lookup) or does not exist."""
    if draft is None:
        return
    if mode in ("off", "lookup"):
        raise InputError(
            f"--draft is used by --speculate draft or auto, not {mode}: drop --draft, or use --speculate draft"
        )
    if not Path(draft).exists():
        from ..model.hub import no_such_folder

        raise no_such_folder(draft, "--draft")


def check_draft_tokenizer(draft: str | Path, tokenizer) -> None:
    """Refuse in one line a draft model whose tokenizer is not the model's `tokenizer` (a Tokenizer, or a folder
    or hub id holding one): a tokenizer with other entries gives the same text other ids, even at the same
    vocabulary size, so its drafts would never be accepted."""
    from ..model.tokenizer import load_tokenizer

    ours = load_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
    try:
        theirs = load_tokenizer(draft)
    except CodegenDeployError as e:
        raise InputError(f"the draft model's tokenizer cannot be compared with the model's: {e}") from e
    if theirs.fingerprint != ours.fingerprint:
        raise InputError(
            f"the draft model {draft} has another tokenizer than the model (its vocabulary or merges differ, "
            f"{theirs.vocab_size} and {ours.vocab_size} tokens): a draft model must share the tokenizer (e.g. "
            "codegen-350M-mono drafting for codegen-2B-mono)"
        )


def check_speculation(session: Session | None, sampling) -> None:
    """Refuse in one line what speculative decoding cannot do exactly here (session None: the sampling only,
    before a model is loaded): exact_greedy() and runs_several_tokens(), with the remedy."""
    if not exact_greedy(sampling):
        only_frequency = exact_greedy(replace(sampling, frequency_penalty=0.0))
        fix = "drop the frequency penalty" if only_frequency else "use temperature 0 or --speculate off"
        raise InputError(f"speculative decoding is exact for greedy decoding only: {fix}")
    if session is None or runs_several_tokens(session):
        return
    if session.supports_slots:
        raise InputError(
            "speculative decoding needs a fused graph that checks several tokens per run; this one was exported "
            "before that existed: export it again with codegen-export, or use --speculate off"
        )
    raise InputError(
        f"speculative decoding needs a session with multi-token row steps (the fused ONNX Runtime graph on the "
        f"CPU, or torch), not {session.name}: use --speculate off or another backend/export"
    )
