"""generate() and stream(): prompts in, text out, on every backend, by driving the one engine (runtime/engine.py).

Plain decoding runs the prompts as one batch through the session's batch API (BatchEngine: every backend has
it): left padding with real position ids (the Session counts them from the mask), one random generator per
row seeded alike, and rows that ended fed the pad token until every row is done, so each row's tokens equal
running its prompt alone. Speculative decoding (a drafter) runs each prompt in a row slot (SlotEngine).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from ..errors import InputError
from .engine import BatchEngine, Engine, Progress, Row, RowSpec, SlotEngine
from .sampling import SamplingConfig
from .session import Session
from .speculate import SpeculationStats, check_speculation


@dataclass(frozen=True)
class GenerationConfig:
    """When to stop and how to pick tokens.

    eos_token_ids: ids that end a row (default: the tokenizer's end_ids, <|endoftext|> and CodeGen2's <eom>
    where it has one). stop: strings that
    end a row; the output text is cut before the first one. pad_token_id: fed for left padding and
    for finished rows (default: the first eos id).
    """

    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InputError("a stop sequence is empty: give non-empty strings")


@dataclass
class Timings:
    """Wall-clock times of one generate() call. Decode speed counts steps after the first token, per row."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def add(self, other: Timings) -> None:
        """Count another prompt's times in (prompts run one after another): the first one's time to first token."""
        self.time_to_first_token_s = self.time_to_first_token_s or other.time_to_first_token_s
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s
        self.decode_steps += other.decode_steps

    def to_dict(self) -> dict:
        return {
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "decode_steps": self.decode_steps,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "time_to_first_token_s": self.time_to_first_token_s,
            "total_s": self.total_s,
        }


@dataclass
class Completion:
    """One row's result. ids: the new tokens (an ending eos included); text: their decode without the
    eos, cut before a stop sequence. finish_reason: "eos", "stop" or "length"."""

    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "ids": self.ids, "text": self.text, "finish_reason": self.finish_reason}


@dataclass
class GenerationResult:
    """All rows of one generate() call, in prompt order, and its timings."""

    completions: list[Completion]
    timings: Timings
    speculation: SpeculationStats | None = None  # drafted and accepted tokens when decoded speculatively

    @property
    def text(self) -> str:
        """The first (for one prompt, the only) row's text."""
        return self.completions[0].text

    @property
    def ids(self) -> list[int]:
        """The first (for one prompt, the only) row's new token ids."""
        return self.completions[0].ids

    def to_dict(self) -> dict:
        out = {"completions": [c.to_dict() for c in self.completions], "timings": self.timings.to_dict()}
        if self.speculation is not None:
            out["speculation"] = self.speculation.to_dict()
        return out


# ---------------------------------------------------------------------------------------------
# Checks and inputs


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt (strings are encoded; id lists pass through). Empty prompts are refused."""
    rows = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise InputError(f"prompt {i} is empty: give at least one character of prompt text")
        rows.append(ids)
    if not rows:
        raise InputError("no prompts given: give at least one prompt")
    return rows


def check_context(session: Session, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a prompt that leaves no room for max_new_tokens in the session's context."""
    _check_fits(prompt_len, max_new_tokens, session.max_context)


def check_prompt_fits(ids: Sequence[int], max_new_tokens: int, max_context: int | None) -> None:
    """The checks generate() makes, before a session exists: a prompt loaded with the model only to be
    refused costs the user the load time. max_context None: unknown yet (the session checks later)."""
    if not ids:
        raise InputError("prompt 0 is empty: give at least one character of prompt text")
    if max_context is not None:
        _check_fits(len(ids), max_new_tokens, max_context)


def _check_fits(prompt_len: int, max_new_tokens: int, max_context: int) -> None:
    if prompt_len + max_new_tokens > max_context:
        raise InputError(
            f"the prompt has {prompt_len} tokens and max_new_tokens is {max_new_tokens}: {prompt_len + max_new_tokens} "
            f"exceeds the context of {max_context} tokens; shorten the prompt or lower max_new_tokens"
        )


def check_logit_bias(session: Session, sampling: SamplingConfig) -> None:
    """Refuse a logit_bias token outside the session's vocabulary."""
    vocab = session.config.vocab_size
    if any(not 0 <= token < vocab for token, _ in sampling.logit_bias):
        raise InputError(f"a logit_bias token is outside the vocabulary 0..{vocab - 1}: give ids below {vocab}")


def _resolve(tokenizer, config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    """A GenerationConfig from an explicit one or keyword options, with the tokenizer's eos as default."""
    if config is None:
        known = {f.name for f in fields(GenerationConfig)} | {f.name for f in fields(SamplingConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"unknown generation option {', '.join(unknown)}: use one of {', '.join(sorted(known))}")
        sampling = overrides.pop("sampling", None) or SamplingConfig(
            **{k: overrides.pop(k) for k in [f.name for f in fields(SamplingConfig)] if k in overrides}
        )
        if "stop" in overrides and isinstance(overrides["stop"], str):
            overrides["stop"] = (overrides["stop"],)
        if "stop" in overrides:
            overrides["stop"] = tuple(overrides["stop"])
        if "eos_token_ids" in overrides and overrides["eos_token_ids"] is not None:
            overrides["eos_token_ids"] = tuple(overrides["eos_token_ids"])
        config = GenerationConfig(sampling=sampling, **overrides)
    elif overrides:
        raise InputError(f"give either a GenerationConfig or options, not both (got {', '.join(overrides)})")
    if config.eos_token_ids is None:
        config = replace(config, eos_token_ids=tuple(tokenizer.end_ids))
    return config


def _prompt_rows(tokenizer, prompts, suffix: str | None) -> list[list[int]]:
    """The token ids of each prompt; with a suffix, the one prompt is the text before the gap and the row is
    the tokenizer's fill-in-the-middle prompt (Tokenizer.infill)."""
    if suffix is None:
        prompt_list = [prompts] if isinstance(prompts, str) or _is_id_list(prompts) else list(prompts)
        return encode_prompts(tokenizer, prompt_list)
    if not isinstance(prompts, str):
        raise InputError("a suffix goes with one text prompt (the code before the gap): give the prompt as a string")
    return [tokenizer.infill(prompts, suffix)]


def _engine(session: Session, config: GenerationConfig, drafter, rows: int) -> Engine:
    """The engine for `rows` prompts: a row slot with the drafter when decoding speculatively, else one batch."""
    if drafter is not None:
        check_speculation(session, config.sampling)
        return SlotEngine(session, rows=1, drafter=drafter)
    eos = config.eos_token_ids or ()
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return BatchEngine(session, rows, pad)


def _rows(session: Session, tokenizer, prompt_rows: list[list[int]], config: GenerationConfig) -> list[Row]:
    """One engine Row per prompt, after the checks: the prompts fit the context (left padding makes every row
    as long as the longest), the logit bias is inside the vocabulary."""
    check_context(session, max(len(r) for r in prompt_rows), config.max_new_tokens)
    check_logit_bias(session, config.sampling)
    eos = set(config.eos_token_ids)
    return [
        Row(RowSpec(tuple(r), config.max_new_tokens, config.sampling, config.stop), tokenizer, eos) for r in prompt_rows
    ]


def drive(engine: Engine, rows: list[Row], timings: Timings | None = None, stats=None) -> Iterator[Progress]:
    """Add `rows` to `engine` and step it until they have ended, yielding each row's progress of each step.

    timings (a Timings), when given, is filled in as it runs: the first step's time is the prompt's, the rest
    decoding (decode_steps: tokens after the first, per row); stats (a SpeculationStats) counts drafts, decode
    runs and tokens.
    """
    for row in rows:
        if not engine.add(row):
            raise InputError(f"the engine took {len(engine.rows)} rows at once: give at most that many prompts")
    start = time.perf_counter()
    decode_start = None
    while engine.has_work():
        progress = engine.step()
        now = time.perf_counter()
        if timings is not None:
            if decode_start is None and any(p.chosen for p in progress):
                decode_start = now
                timings.prefill_s = timings.time_to_first_token_s = now - start
            elif decode_start is not None:
                timings.decode_steps = max(r.generated for r in rows) - 1
                timings.decode_s = now - decode_start
        if stats is not None:
            for p in progress:
                stats.drafted += p.drafted
                stats.accepted += p.accepted
                stats.runs += p.chosen > 0  # a run that made tokens: the prompt's last piece, a step, a check
                stats.tokens += p.chosen
        yield from progress


# ---------------------------------------------------------------------------------------------
# Public entry points


def generate(
    session: Session,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    drafter=None,
    suffix: str | None = None,
    **options,
) -> GenerationResult:
    """Generate from one prompt or a batch of prompts (strings or token id lists).

    Options (when no `config` is given): max_new_tokens, temperature, top_k, top_p, repetition_penalty,
    presence_penalty, frequency_penalty, logit_bias ((token id, bias) pairs), seed, stop, eos_token_ids,
    pad_token_id. drafter: a speculate.PromptLookup or speculate.DraftModel to decode greedily and
    speculatively, each prompt in turn (the same tokens as without; the result's `speculation` counts them).
    suffix: the code after the gap, on a model that fills in the middle (CodeGen2): the one string prompt is
    the code before it, and the text is the middle (it ends at <eom>).
    """
    config = _resolve(tokenizer, config, dict(options))
    prompt_rows = _prompt_rows(tokenizer, prompts, suffix)
    rows = _rows(session, tokenizer, prompt_rows, config)
    timings = Timings()
    start = time.perf_counter()
    stats = SpeculationStats() if drafter is not None else None
    groups = [[row] for row in rows] if drafter is not None else [rows]  # speculation: each prompt in turn
    for group in groups:
        group_timings = Timings()
        for _ in drive(_engine(session, config, drafter, len(group)), group, group_timings, stats):
            pass
        timings.add(group_timings)
    timings.total_s = time.perf_counter() - start
    completions = [
        Completion(r.text.prompt_ids, r.text.ids, r.text.final_text(), r.text.finish_reason or "length") for r in rows
    ]
    return GenerationResult(completions, timings, stats)


def stream(
    session: Session,
    tokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    timings: Timings | None = None,
    drafter=None,
    stats: SpeculationStats | None = None,
    suffix: str | None = None,
    **options,
) -> Iterator[str]:
    """Generate from one prompt, yielding text pieces as soon as they decode cleanly.

    A piece is released only when the text decodes without a trailing U+FFFD (a multi-byte character
    split across tokens) and cannot be the start of a stop sequence, so the pieces joined equal
    generate()'s text. Options as for generate(); `timings`, when given, is filled in as it runs; with a
    drafter, decoding is speculative (greedy) and `stats`, when given, counts its drafts; with a suffix, the
    middle between prompt and suffix (as generate()).
    """
    config = _resolve(tokenizer, config, dict(options))
    prompt_rows = _prompt_rows(tokenizer, prompt if suffix is not None else [prompt], suffix)
    rows = _rows(session, tokenizer, prompt_rows, config)
    start = time.perf_counter()
    try:
        for p in drive(_engine(session, config, drafter, 1), rows, timings, stats):
            if p.update is not None and p.update.text:
                yield p.update.text
    finally:
        if timings is not None:
            timings.total_s = time.perf_counter() - start


def _is_id_list(prompts) -> bool:
    return len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))
