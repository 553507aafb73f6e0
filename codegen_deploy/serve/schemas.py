"""The request bodies of the OpenAI legacy Completions and Chat Completions APIs, their checks, and OpenAI's error
envelope.

Unknown fields are ignored (editors send their own); known fields with bad values are a 400 in
OpenAI's shape, never FastAPI's 422.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from ..runtime.sampling import SamplingConfig


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error envelope. Text the client sent may be quoted in it: a lone surrogate (JSON allows
    "\\ud800") is written as its escape, since it has no UTF-8 form."""
    message, param = _printable(message), None if param is None else _printable(param)
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode() if _SURROGATE.search(text) else text


def check_text(text: str, what: str, param: str) -> None:
    """Raise a 400 for a string that is not Unicode text: JSON's escapes can carry a lone surrogate
    ("\\ud800"), which has no UTF-8 form and no tokens."""
    bad = _SURROGATE.search(text)
    if bad:
        raise bad_request(
            f"{what} is not valid Unicode: a lone surrogate {bad.group()!a} at character {bad.start()}; "
            "send UTF-8 text (a surrogate pair for characters beyond U+FFFF)",
            param,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# OpenAI takes 4 stop sequences; editors send more (Continue's autocomplete sends its template's list, 10 for
# an unknown model), and vLLM and llama.cpp take any number.
MAX_STOP = 32
# The longest stop sequence: the worker looks for each stop in the tail of every row's text after each token, so
# a bound keeps that look small (an editor's stops are a few characters).
MAX_STOP_CHARS = 1000
# The largest seed, as OpenAI's (a signed 64-bit integer, here without negatives: numpy seeds are >= 0).
MAX_SEED = 2**63 - 1
# A logit_bias key: a token id in decimal ASCII digits (a sign is allowed, and refused later as out of range).
_TOKEN_KEY = re.compile(r"-?[0-9]{1,18}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class SamplingFields(BaseModel):
    """The fields every completion endpoint shares (/v1/completions, /v1/chat/completions; /infill maps its own
    onto them): the model's name, the answer's length, sampling, stop sequences, streaming. Defaults are
    OpenAI's; top_k is an extension (vLLM's name). Fields not listed are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None

    def least_max_tokens(self) -> int:
        return 1

    def check(self) -> None:
        """Raise a 400 OpenAIError for values the API refuses (ranges from OpenAI's reference)."""
        least = self.least_max_tokens()
        if self.max_tokens is not None and self.max_tokens < least:
            raise bad_request(f"max_tokens must be >= {least}, got {self.max_tokens}", "max_tokens")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise bad_request(f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad_request(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 0:
            raise bad_request(f"top_k must be >= 0 (0 = off), got {self.top_k}", "top_k")
        if self.n is not None and not 1 <= self.n <= 128:
            raise bad_request(f"n must be between 1 and 128, got {self.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise bad_request(f"{name} must be between -2 and 2, got {value}", name)
        if self.stop is not None:
            check_stops([self.stop] if isinstance(self.stop, str) else self.stop, "stop")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise bad_request(f"seed must be between 0 and 2**63 - 1, got {self.seed}", "seed")
        for key, value in (self.logit_bias or {}).items():
            if not _TOKEN_KEY.fullmatch(key):
                shown = repr(key[:20]) + ("..." if len(key) > 20 else "")
                raise bad_request(f"logit_bias keys must be token ids (decimal digits), got {shown}", "logit_bias")
            if not -100 <= value <= 100:
                raise bad_request(f"logit_bias values must be between -100 and 100, got {value}", "logit_bias")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, choice_index: int, vocab_size: int) -> SamplingConfig:
        """The sampling settings of one row: choice `choice_index` (0..n-1) of its prompt, for a model of
        `vocab_size` tokens. Raises a 400 for a logit_bias token outside the vocabulary (check() has vetted
        the rest); SamplingConfig's own InputError for anything it refuses."""
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not 0 <= int(key) < vocab_size:
                raise bad_request(f"logit_bias token {key} is outside 0..{vocab_size - 1}", "logit_bias")
            bias.append((int(key), float(value)))
        return SamplingConfig(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            # Each choice its own stream of random numbers: seed, seed + 1, ... (reproducible with a seed).
            seed=None if self.seed is None else self.seed + choice_index,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple(bias),
        )


def check_stops(stops: list[str], param: str) -> None:
    """Raise a 400 for stop sequences the server does not take: too many, empty or too long."""
    if len(stops) > MAX_STOP:
        raise bad_request(f"{param} takes at most {MAX_STOP} sequences, got {len(stops)}", param)
    if any(not s for s in stops):
        raise bad_request(f"a {param} sequence is empty: give non-empty strings", param)
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        longest = max(len(s) for s in stops)
        raise bad_request(
            f"a {param} sequence has {longest} characters, more than {MAX_STOP_CHARS}: send shorter ones", param
        )


class CompletionRequest(SamplingFields):
    """The body of POST /v1/completions (and the FauxPilot engine path): the shared fields, and the prompt,
    suffix, echo, logprobs and best_of."""

    prompt: str | list[str] | list[int] | list[list[int]] = "<|endoftext|>"
    suffix: str | None = None  # filled in on CodeGen2; on CodeGen1 dialects.handle_suffix() decides
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None

    def least_max_tokens(self) -> int:
        """max_tokens 0 goes with echo: the prompt alone (with its log-probabilities when asked: a
        log-likelihood, as lm-evaluation-harness asks for one)."""
        return 0 if self.echo else 1

    def check(self) -> None:
        """Raise a 400 OpenAIError for values the API refuses (ranges from OpenAI's reference)."""
        super().check()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise bad_request("best_of other than n is not supported: leave best_of out", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise bad_request(f"logprobs must be between 0 and 5, got {self.logprobs}", "logprobs")
        if self.suffix is not None:
            check_text(self.suffix, "suffix", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt is an empty list: give at least one prompt", "prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


# The roles a chat message may have; "developer" is OpenAI's newer name for "system".
CHAT_ROLES = ("system", "developer", "user", "assistant")


class ContentPart(BaseModel):
    """One part of a message's content given as a list: only {"type": "text", "text": ...} parts are taken."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self, where: str) -> str:
        """The message's text (text parts joined by new lines, as vLLM joins them); a 400 naming `where` for a
        role or part this server cannot take."""
        if self.role not in CHAT_ROLES:
            raise bad_request(
                f"{where}.role is {self.role!r}: this server takes {', '.join(CHAT_ROLES)} messages (no tools)",
                "messages",
            )
        if self.content is None or isinstance(self.content, str):
            text = self.content or ""
        else:
            for j, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"{where}.content[{j}] is a {part.type!r} part: this server takes text parts only "
                        '({"type": "text", "text": ...})',
                        "messages",
                    )
            text = "\n".join(part.text for part in self.content)
        check_text(text, f"{where}.content", "messages")
        return text


class ChatCompletionRequest(SamplingFields):
    """The body of POST /v1/chat/completions: the shared fields and `messages`. max_tokens (or
    max_completion_tokens) defaults to the rest of the context, as OpenAI's; llama.cpp's `n_predict` is taken
    where neither is given (0: read the prompt into the prefix cache only, as llama.vim's warm-up asks)."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n_predict: int | None = None
    logprobs: bool | None = None

    def check(self) -> None:
        """Raise a 400 OpenAIError for values the API refuses."""
        super().check()
        if not self.messages:
            raise bad_request("messages is empty: send at least one message", "messages")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise bad_request(
                f"max_completion_tokens must be >= 1, got {self.max_completion_tokens}", "max_completion_tokens"
            )
        if self.n_predict is not None and self.n_predict < -1:
            raise bad_request(
                f"n_predict must be -1 (no limit), 0 (read only) or more, got {self.n_predict}", "n_predict"
            )
        if self.logprobs:
            raise bad_request(
                "logprobs is not supported on /v1/chat/completions: leave it out (or ask /v1/completions, which "
                "reports logprobs 0-5)",
                "logprobs",
            )

    @property
    def answer_limit(self) -> int | None:
        """The most tokens the answer may have: None for the rest of the context, 0 for a warm-up."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        if self.max_tokens is not None:
            return self.max_tokens
        return None if self.n_predict in (None, -1) else self.n_predict
