"""POST /infill in llama.cpp's server dialect, so llama.vscode and llama.vim (which post there) work unchanged.

A request carries the text before the cursor's line (`input_prefix`), after it (`input_suffix`), what is typed
of the cursor's line (`prompt`), other files as context (`input_extra`: [{filename, text}]), `n_predict` (0: a
warm-up that only reads the context into the prefix cache) and `t_max_predict_ms` (past it, the answer ends
once it holds a new line). The context goes before the prefix, each file as `--- FILENAME ---` and its text,
then the tokenizer's fill-in-the-middle layout (Tokenizer.infill_ids), with `prompt` as the start of the
middle. When it does not fit, the start of the context goes first, then the start of the prefix, then the end
of the suffix, as llama.cpp does ("truncated": true). Each text is first cut in characters to what the room
could hold at the tokenizer's longest token, so a body of megabytes costs no more to tokenize than one that
fills the context; tokenizing runs off the event loop.

The prompt goes through the completion core (completions.py: its rows, queue, prefix cache, cancellation and
drain); the answer is llama.cpp's compact JSON (llama.vim finds it by the raw text `"content":"`): `content`,
`tokens_cached`, `timings`, `truncated`, `stop`, and only `response_fields` when asked (llama.vim asks for
"timings/prompt_n" and the like, answered under those names). Neither client streams, so neither does this
endpoint. A model without fill-in-the-middle tokens (CodeGen1) continues the context, prefix and typed line
with `--suffix ignore` (the default), and answers 501 with `--suffix error`, as llama.cpp answers for a model it
cannot infill with.
"""

from __future__ import annotations

import math
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .completions import CompletionRun, disconnected, encode_texts, make_rows, off_loop, shutting_down
from .dialects import note_once
from .schemas import OpenAIError, SamplingFields, bad_request, check_text
from .state import ServerState

# Tokens the prompt is cut to leave for the answer (at most half the context) when a request gives n_predict -1
# (no limit: the answer then goes on until the middle ends or the context is full).
OPEN_PREDICT = 256


class ExtraFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    filename: str = ""
    text: str = ""


class InfillRequest(BaseModel):
    """The body of POST /infill: llama.cpp's fields (and defaults) that matter here; the rest (samplers,
    cache_prompt, t_max_prompt_ms, n_indent, id_slot, lora, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraFile] = []
    prompt: str = ""
    n_predict: int = -1
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    seed: int = -1
    stop: list[str] = []
    stream: bool = False
    response_fields: list[str] | None = None
    t_max_predict_ms: float = 0

    def check(self) -> None:
        """Raise a 400 naming the field for values refused here."""
        if self.stream:
            raise bad_request(
                "stream is not supported on /infill: send stream false (llama.vim and llama.vscode do)", "stream"
            )
        if self.n_predict < -1:
            raise bad_request(
                f"n_predict must be -1 (no limit), 0 (read only) or more, got {self.n_predict}", "n_predict"
            )
        for name in ("input_prefix", "input_suffix", "prompt"):
            check_text(getattr(self, name), name, name)
        for i, extra in enumerate(self.input_extra):
            check_text(extra.text, f"input_extra[{i}].text", "input_extra")
            check_text(extra.filename, f"input_extra[{i}].filename", "input_extra")

    def sampling_fields(self) -> SamplingFields:
        """llama.cpp's sampling fields as the completion core's (out-of-range top_k and top_p mean "off" in
        llama.cpp), checked: a 400 names the field, whose name is the same here."""
        fields = SamplingFields(
            temperature=max(self.temperature, 0.0),
            top_k=max(self.top_k, 0),
            top_p=self.top_p if 0 < self.top_p <= 1 else 1.0,
            seed=None if self.seed < 0 else self.seed,
            stop=self.stop or None,
        )
        fields.check()
        return fields


def context_text(extra: list[ExtraFile]) -> str:
    """The other files as one text before the prefix."""
    return "".join(f"--- {e.filename} ---\n{e.text}\n\n" if e.filename else f"{e.text}\n\n" for e in extra)


def tail(text: str, most: int) -> str:
    """The last `most` characters of text (none for 0)."""
    return text[len(text) - most :] if len(text) > most else text


def infill_ids(state: ServerState, body: InfillRequest, room: int) -> tuple[list[int], bool]:
    """The prompt's token ids, at most `room` of them, and whether anything was cut to fit.

    Before anything is tokenized, each text is cut to the characters its share of the room could hold at most
    (state.max_token_chars characters a token): the end of the other files and of the prefix, the start of the
    suffix; a typed line that cannot fit is refused. What is cut that way would be cut as tokens anyway."""
    tokenizer, per_token = state.tokenizer, state.max_token_chars
    extra = context_text(body.input_extra)
    if state.fim is None:  # CodeGen1: the text before the cursor, continued
        note_once(
            "infill-prefix",
            "codegen-serve: /infill requests on a model that cannot fill in the middle: the text after the cursor "
            "is ignored (--suffix error answers 501 instead) (said once)",
        )
        before = body.input_prefix + body.prompt
        texts = [tail(extra, room * per_token), tail(before, room * per_token)]
        context, text = encode_texts(tokenizer, texts)
        ids = [*context, *text]
        cut = len(texts[0]) < len(extra) or len(texts[1]) < len(before)
        return ids[-room:], cut or len(ids) > room
    layout = len(tokenizer.infill_ids([], [], []))
    # The layout and the typed line are always kept whole: what the room leaves them is refused at once when the
    # typed line's characters cannot fit it, and after tokenizing when its tokens do not.
    if len(body.prompt) > max(room - layout, 0) * per_token:
        raise _typed_line_too_long(
            f"{len(body.prompt):,} characters, at least {math.ceil(len(body.prompt) / per_token):,} tokens",
            room - layout,
        )
    most = max(room - layout - math.ceil(len(body.prompt) / per_token), 0) * per_token
    texts = [tail(extra, most), tail(body.input_prefix, most), body.input_suffix[:most], body.prompt]
    context, prefix, suffix, middle = encode_texts(tokenizer, texts)
    budget = room - layout - len(middle)
    if budget < 0:
        raise _typed_line_too_long(f"{len(middle):,} tokens", room - layout)
    # The suffix keeps its start, up to a quarter of the room; the prefix its end; the context what is left.
    suffix_kept = suffix[: max(budget // 4, budget - len(prefix))]
    prefix_kept = prefix[max(0, len(prefix) - (budget - len(suffix_kept))) :]
    context_kept = context[max(0, len(context) - (budget - len(suffix_kept) - len(prefix_kept))) :]
    kept = [len(t) for t in texts[:3]] + [len(suffix_kept), len(prefix_kept), len(context_kept)]
    whole = [len(extra), len(body.input_prefix), len(body.input_suffix), len(suffix), len(prefix), len(context)]
    return tokenizer.infill_ids([*context_kept, *prefix_kept], suffix_kept, middle), kept != whole


def _typed_line_too_long(size: str, left: int) -> OpenAIError:
    return bad_request(
        f"the typed line (prompt) is {size}, more than the {max(left, 0):,} tokens the context leaves it with the "
        "answer (n_predict): shorten it, or ask for a shorter answer",
        "prompt",
    )


async def create_infill(request: Request, body: InfillRequest):
    """Answer one /infill request with llama.cpp's JSON."""
    state: ServerState = request.app.state.server
    if state.draining:
        raise shutting_down()
    body.check()
    if state.fim is None and state.settings.suffix == "error":
        raise OpenAIError(
            501,
            "Infill is not supported by this model: it has no fill-in-the-middle tokens (CodeGen1); serve a CodeGen2 "
            "export, or start codegen-serve with --suffix ignore to continue the text before the cursor",
            type="not_supported_error",
        )
    fields = body.sampling_fields()
    context = state.session.max_context
    # The prompt is cut to leave the answer what it asks for, but keeps at least half the context; an answer
    # that asks for more than is left goes on until the context is full, as llama.cpp's.
    reserve = OPEN_PREDICT if body.n_predict == -1 else max(body.n_predict, 1)
    ids, truncated = await off_loop(infill_ids, state, body, context - min(reserve, context // 2))
    start = time.perf_counter()
    content, predicted, cached, first = "", 0, 0, start
    if ids:  # (CodeGen1 with nothing before the cursor: nothing to read)
        max_tokens = context - len(ids) if body.n_predict == -1 else min(reserve, context - len(ids))
        run = CompletionRun(state, fields, [ids], make_rows(state, fields, [ids], max_tokens))
        choice = run.choices[0]
        if not await run.collect(request, lambda: over_time(choice, body.t_max_predict_ms)):
            return disconnected()
        if body.n_predict != 0:  # a warm-up's one token is not the client's
            content, predicted = choice.text, choice.tokens
        cached, first = choice.cached_tokens, choice.first_token_at or time.perf_counter()
    done = time.perf_counter()
    prompt_n = len(ids) - cached
    prompt_ms, predicted_ms = (first - start) * 1e3, (done - first) * 1e3
    result = {
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": -1,
        "stop": True,
        "model": state.settings.served_name,
        "tokens_predicted": predicted,
        "tokens_evaluated": len(ids),
        "tokens_cached": len(ids) + predicted,
        "truncated": truncated,
        "has_new_line": "\n" in content,
        "timings": {
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
            "prompt_per_second": prompt_n / max(prompt_ms / 1e3, 1e-9),
            "predicted_n": predicted,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(predicted, 1),
            "predicted_per_second": predicted / max(predicted_ms / 1e3, 1e-9),
        },
    }
    if body.response_fields is not None:
        result = pick_fields(result, body.response_fields)
    # Starlette's JSONResponse writes compact JSON ("content":"...", no spaces), which llama.vim looks for.
    return JSONResponse(result)


def over_time(choice, limit_ms: float) -> bool:
    """llama.cpp's t_max_predict_ms: the answer ends once it has taken more than `limit_ms` since its first
    token and holds a new line (an editor shows a whole line now rather than more lines later); 0: no limit."""
    started = choice.first_token_at
    return (
        limit_ms > 0 and started is not None and "\n" in choice.text and time.perf_counter() - started > limit_ms / 1e3
    )


def pick_fields(result: dict, paths: list[str]) -> dict:
    """llama.cpp's response_fields: each path ("content", "timings/prompt_n") that names a value, answered
    under that path as one key; paths that name nothing are left out."""
    picked = {}
    for path in paths:
        value = result
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            picked[path] = value
    return picked
