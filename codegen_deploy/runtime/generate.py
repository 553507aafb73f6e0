"""The one generation loop for every backend: encode, left-pad, prefill, step, sample, stop.

Small functions in the order they run (gpt-fast style). The loop sees a Session only through
prefill(ids, mask) and step(ids), so the same code drives PyTorch, ONNX Runtime and TensorRT.

Rows of a batch are independent: left padding with real position ids (the Session counts them from
the mask), one random generator per row seeded alike, and finished rows keep feeding the pad token
until every row is done, so each row's tokens equal running its prompt alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from ..errors import InputError
from .sampling import SamplingConfig, adjust_logits, make_generators, sample
from .session import Session
from .speculate import SpeculationStats, check_speculation, speculative_tokens

REPLACEMENT_CHAR = "\ufffd"


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
# The steps of the loop


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


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths -> ids [B, T] and mask [B, T] (0 on the padding at the left)."""
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return ids, mask


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


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop sequence in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def generate_tokens(
    session: Session,
    rows: list[list[int]],
    config: GenerationConfig,
    finished: np.ndarray | None = None,
    timings: Timings | None = None,
) -> Iterator[np.ndarray]:
    """Prefill the rows, then yield one sampled token per row [B] per step, up to max_new_tokens steps.

    Stopping is the caller's business: it sets finished[i] (a [B] bool array it owns) for rows that are
    done, so they are fed the pad token from then on, and closes the iterator when every row is done.
    timings, when given, is filled in as the loop runs.
    """
    eos = config.eos_token_ids or ()
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    ids, mask = left_pad(rows, pad)
    check_context(session, ids.shape[1], config.max_new_tokens)
    sampling = config.sampling
    check_logit_bias(session, sampling)
    generators = None if sampling.greedy else make_generators(sampling, len(rows))
    t0 = time.perf_counter()
    logits = session.prefill(ids, mask)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = np.zeros(logits.shape, dtype=bool)  # [B, V]
        for i, r in enumerate(rows):
            seen[i, [t for t in r if t < logits.shape[-1]]] = True
    counts = np.zeros(logits.shape, np.float32) if sampling.presence_penalty or sampling.frequency_penalty else None
    token = sample(adjust_logits(logits, sampling, counts), sampling, generators, seen)
    if timings is not None:
        timings.prefill_s = timings.time_to_first_token_s = time.perf_counter() - t0
    decode_start = time.perf_counter()
    for n in range(1, config.max_new_tokens + 1):
        yield token
        if n == config.max_new_tokens:
            break
        if finished is not None:
            token = np.where(finished, pad, token)
        if seen is not None:
            seen[np.arange(len(rows)), token] = True
        if counts is not None:  # OpenAI's penalties count generated tokens only
            counts[np.arange(len(rows)), token] += 1
        logits = session.step(token)
        token = sample(adjust_logits(logits, sampling, counts), sampling, generators, seen)
        if timings is not None:
            timings.decode_steps = n
            timings.decode_s = time.perf_counter() - decode_start


class RowText:
    """One row's new tokens turned into text while it generates: it ends at an eos id or a stop string
    (found across token boundaries), and releases streaming pieces that are safe to show.

    push() each sampled token; piece() returns the new text that decodes cleanly (no multi-byte character
    split across tokens) and cannot be the start of a stop string; once done, rest() returns the last
    piece, so all pieces joined equal final_text(). finish_reason: "eos", "stop", or None while running.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], eos: set[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.eos = eos
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.emitted = 0  # characters of the text already released by piece()
        # A character takes at most 4 byte tokens, so this many last tokens hold the longest stop sequence.
        self._window = 4 * max((len(s) for s in self.stop), default=0) + 4
        self._clean_ids = 0  # ids[:_clean_ids] decode to _clean_text, which ends on a whole character
        self._clean_text = ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Append a sampled token (ignored once the row is done) and check for eos and stop strings."""
        if self.done:
            return
        self.ids.append(token)
        if token in self.eos:
            self.finish_reason = "eos"
        elif self.stop and find_stop(self.tokenizer.decode(self.ids[-self._window :]), self.stop) >= 0:
            self.finish_reason = "stop"

    def text(self) -> str:
        """The decode of all ids, decoding only those after the last clean point (constant work per step).

        Byte-level BPE decodes to the bytes of its tokens joined, so text that ends on a whole character
        (no trailing U+FFFD) is a prefix of every longer decode and can be kept as is.
        """
        text = self._clean_text + self.tokenizer.decode(self.ids[self._clean_ids :])
        if not text.endswith(REPLACEMENT_CHAR):
            self._clean_ids, self._clean_text = len(self.ids), text
        return text

    def piece(self) -> str:
        """New text that is safe to stream now ("" if none): whole characters, no possible stop start."""
        if self.done:
            return ""
        text = self.text()
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        safe = len(text) - _held_back(text, self.stop)
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : safe], safe
        return piece

    def final_text(self) -> str:
        """The text of all new ids, an ending eos left out, cut before the first stop string."""
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.eos else self.ids
        text = self.tokenizer.decode(ids)
        cut = find_stop(text, self.stop) if self.stop else -1
        return text if cut < 0 else text[:cut]

    def rest(self) -> str:
        """The final text not yet released by piece() (call once the row is done or stopped)."""
        text = self.final_text()
        piece, self.emitted = text[self.emitted :], max(self.emitted, len(text))
        return piece


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
    eos = set(config.eos_token_ids)
    rows = [RowText(tokenizer, r, eos, config.stop) for r in prompt_rows]
    timings = Timings()
    start = time.perf_counter()
    stats = None
    if drafter is not None:
        stats = SpeculationStats()
        for row in rows:
            row_timings = Timings()
            for token in _speculative(session, row.prompt_ids, config, drafter, stats, row_timings):
                row.push(token)
                if row.done:
                    break
            timings.add(row_timings)
    else:
        finished = np.zeros(len(rows), dtype=bool)
        tokens = generate_tokens(session, prompt_rows, config, finished, timings)
        for token in tokens:
            for row, t in zip(rows, token.tolist(), strict=True):
                row.push(t)
            finished[:] = [r.done for r in rows]
            if finished.all():
                tokens.close()
                break
    timings.total_s = time.perf_counter() - start
    completions = [Completion(r.prompt_ids, r.ids, r.final_text(), r.finish_reason or "length") for r in rows]
    return GenerationResult(completions, timings, stats)


def _speculative(session: Session, prompt: list[int], config: GenerationConfig, drafter, stats, timings):
    """speculative_tokens() for one prompt, after the checks generate_tokens() makes."""
    check_speculation(session, config.sampling)
    check_context(session, len(prompt), config.max_new_tokens)
    check_logit_bias(session, config.sampling)
    sampling = config.sampling
    return speculative_tokens(
        session, prompt, config.max_new_tokens, drafter, lambda logits: adjust_logits(logits, sampling), stats, timings
    )


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
    eos = set(config.eos_token_ids)
    row = RowText(tokenizer, prompt_rows[0], eos, config.stop)
    start = time.perf_counter()
    if drafter is not None:
        tokens = _speculative(session, prompt_rows[0], config, drafter, stats, timings)
    else:
        tokens = (int(t[0]) for t in generate_tokens(session, prompt_rows, config, timings=timings))
    try:
        for token in tokens:
            row.push(token)
            if row.done:
                break
            piece = row.piece()
            if piece:
                yield piece
    finally:
        tokens.close()
        if timings is not None:
            timings.total_s = time.perf_counter() - start
    piece = row.rest()
    if piece:
        yield piece


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop sequence."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


def _is_id_list(prompts) -> bool:
    return len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))
