"""The completion core that /v1/completions, /v1/chat/completions and /infill share, and the Completions API's
own work.

An endpoint turns its request into token-id prompts (row_specs() here for /v1/completions, chat.py, infill.py),
checked against the context (check_chars() before tokenizing, check_fits() after) and tokenized off the event
loop (encode_texts); make_rows() makes one RowSpec per prompt and choice. A CompletionRun submits them and
collects, once for every dialect, each choice's text, token count, logprobs and how it ended. Rendering is
separate: completion_json() / completion_stream() here write OpenAI's legacy Completions answer, chat.py the
Chat Completions answer, infill.py llama.cpp's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import CodegenDeployError
from .batcher import QueueFull, RowSpec, RowUpdate
from .dialects import handle_suffix, infill_parts, prompt_prefix
from .schemas import CompletionRequest, OpenAIError, SamplingFields, bad_request, check_text, error_body
from .settings import check_model
from .state import SHUTTING_DOWN, ServerState

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1


async def create_completion(request: Request, body: CompletionRequest, model: str | None, param: str):
    """Answer one completion request: a JSON body, or an SSE stream when body.stream. `model` is the name the
    request gave (its `model` field or the engine path), `param` where it came from (for the 404)."""
    state: ServerState = request.app.state.server
    check_model(state.settings, model, param)
    if state.draining:
        raise shutting_down()
    prompts, specs = await off_loop(row_specs, state, body)
    # echo returns the prompt as the client sent it: a string prompt itself (not the text before the cursor of
    # a FIM-wrapped one, nor CodeGen2's layout), token ids as their text.
    echo = None
    if body.echo:
        echo = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in body.prompts()]
    run = CompletionRun(state, body, prompts, specs, echo)
    if body.stream:
        return sse_response(completion_stream(run))
    if not await run.collect(request):
        return disconnected()
    return JSONResponse(completion_json(run))


async def off_loop(fn: Callable, *args):
    """fn(*args) in a worker thread, its CodegenDeployError (a value the runtime refused) a 400: checking and
    tokenizing a long prompt takes a while, and the event loop goes on answering meanwhile."""
    try:
        return await asyncio.to_thread(fn, *args)
    except CodegenDeployError as e:
        raise bad_request(str(e)) from e


def shutting_down() -> OpenAIError:
    """The 503 of a request that arrives (or is cut) while the server stops: another replica can take it."""
    return OpenAIError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down")


def disconnected() -> JSONResponse:
    """The answer to a client that went away (nobody reads it; the access log shows 499, as nginx's)."""
    return JSONResponse(error_body("the client disconnected"), status_code=499)


# ---------------------------------------------------------------------------------------------------------
# Prompts -> rows


def row_specs(state: ServerState, body: CompletionRequest) -> tuple[list[list[int]], list[RowSpec]]:
    """The token ids of a Completions request's prompts and one RowSpec per (prompt, choice), in OpenAI's index
    order. A request's suffix and the FIM wrapping of a string prompt go through dialects.py: filled in on a
    model with CodeGen2's tokens, the prompt continued or the request refused on CodeGen1 (--suffix).

    Everything that can be refused without tokenizing is checked first: the fields, the number of rows, and
    each string prompt's length in characters against what the context can hold (check_chars), so a prompt of
    megabytes is refused at once rather than tokenized."""
    body.check()
    if state.fim is None:
        handle_suffix(state.settings.suffix, body.suffix)
    texts = body.prompts()
    check_rows(state, len(texts), body.n or 1)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    scores = body.logprobs if body.echo else None
    if scores is not None and not state.batcher.session.supports_slots:
        raise bad_request(
            "echo with logprobs needs the prompt's log-probabilities, which this server's backend does not return "
            "(they need row slots: the fused graph on the CPU, or torch): drop echo or logprobs",
            "logprobs",
        )
    prompts = [_prompt_ids(state, i, p, body.suffix, max_tokens) for i, p in enumerate(texts)]
    return prompts, make_rows(state, body, prompts, max_tokens, logprobs=body.logprobs, prompt_logprobs=scores)


def _prompt_ids(state: ServerState, i: int, prompt: str | list[int], suffix: str | None, max_tokens: int) -> list[int]:
    """The token ids of prompt `i` of a Completions request (its suffix, on a model that fills in the middle,
    laid out with it)."""
    if not isinstance(prompt, str):
        if state.fim is not None and suffix is not None:
            raise bad_request("a suffix goes with text prompts: send the prompt as a string", "suffix")
        ids = list(prompt)
        if ids and (min(ids) < 0 or max(ids) >= state.vocab_size):
            raise bad_request(f"prompt {i} has a token id outside 0..{state.vocab_size - 1}", "prompt")
        counts = [("prompt", len(ids))]
    else:
        check_text(prompt, f"prompt {i}", "prompt")
        gap = infill_parts(prompt, suffix) if state.fim is not None else None
        if gap is None:
            text = prompt if state.fim is not None else prompt_prefix(prompt)
            check_chars(state, [("prompt", text)], max_tokens)
            ids = encode_text(state.tokenizer, text)
            counts = [("prompt", len(ids))]
        else:
            # The suffix field is blamed for its own length; a FIM-wrapped prompt's suffix is the prompt's.
            texts = [("prompt", gap[0]), ("suffix" if suffix is not None else "prompt", gap[1])]
            check_chars(state, texts, max_tokens)
            before, after = encode_texts(state.tokenizer, list(gap))
            ids = state.tokenizer.infill_ids(before, after)
            # CodeGen2's layout tokens count with the prompt.
            counts = [("prompt", len(ids) - len(after)), (texts[1][0], len(after))]
    if not ids:
        raise bad_request(f"prompt {i} is empty: give at least one character or token", "prompt")
    check_fits(state, counts, max_tokens)
    return ids


def check_rows(state: ServerState, prompts: int, n: int) -> None:
    """Refuse a request of more rows (prompts x n) than the server ever holds, before anything is tokenized."""
    holds = state.batcher.max_queue + state.batcher.max_batch
    if prompts * n > holds:
        raise bad_request(
            f"{prompts} prompts x n={n} make {prompts * n} rows, more than this server ever holds "
            f"({holds}): send fewer prompts or a smaller n",
            "n",
        )


def context_exceeded(message: str, param: str) -> OpenAIError:
    """OpenAI's 400 for a request that does not fit the context (its wording, then what to do)."""
    return bad_request(message, param, "context_length_exceeded")


def check_chars(state: ServerState, texts: list[tuple[str, str]], max_tokens: int) -> None:
    """Refuse, before tokenizing, texts ((param, text) pairs, together one prompt) that cannot fit what the
    context leaves for them with the answer's `max_tokens`, whatever their tokens: no token covers more than
    state.max_token_chars characters, so C characters are at least C / max_token_chars tokens. The field with
    the most characters is blamed."""
    context = state.session.max_context
    left = context - max_tokens
    if left < 1:
        raise context_exceeded(
            f"This model's maximum context length is {context} tokens, however you requested {max_tokens} tokens "
            f"for the completion, which leaves no room for the prompt. Please reduce your completion length "
            f"(max_tokens below {context}).",
            "max_tokens",
        )
    chars = sum(len(text) for _, text in texts)
    least = math.ceil(chars / state.max_token_chars)
    if least > left:
        raise context_exceeded(
            f"This model's maximum context length is {context} tokens, however you requested {max_tokens} tokens "
            f"for the completion and {_described(texts)}: at least {least:,} tokens (a token is "
            f"at most {state.max_token_chars} characters), more than the {left:,} tokens left. Please reduce your "
            f"{_names(texts)}; or completion length.",
            _most(texts),
        )


def check_fits(state: ServerState, counts: list[tuple[str, int]], max_tokens: int) -> None:
    """Refuse a prompt whose tokens ((param, count) pairs) and the answer's `max_tokens` exceed the context, in
    OpenAI's words; the field with the most tokens is blamed."""
    context = state.session.max_context
    total = sum(n for _, n in counts)
    if total + max_tokens > context:
        detail = ", ".join(f"{n} in your {param}" for param, n in _merged(counts))
        raise context_exceeded(
            f"This model's maximum context length is {context} tokens, however you requested "
            f"{total + max_tokens} tokens ({detail}; {max_tokens} for the completion). Please reduce your "
            f"{_names(counts)}; or completion length.",
            _most(counts),
        )


def _merged(pairs: list[tuple[str, str | int]]) -> list[tuple[str, int]]:
    """(param, total size) per param, in first-seen order; a size is a text's length or a count."""
    sizes: dict[str, int] = {}
    for param, value in pairs:
        sizes[param] = sizes.get(param, 0) + (value if isinstance(value, int) else len(value))
    return list(sizes.items())


def _described(texts: list[tuple[str, str]]) -> str:
    return " and ".join(f"a {param} of {n:,} characters" for param, n in _merged(texts))


def _names(pairs: list[tuple[str, str | int]]) -> str:
    return " and ".join(param for param, _ in _merged(pairs))


def _most(pairs: list[tuple[str, str | int]]) -> str:
    """The param with the most characters or tokens (the first of equals)."""
    return max(_merged(pairs), key=lambda p: p[1])[0]


def make_rows(
    state: ServerState,
    fields: SamplingFields,
    prompts: list[list[int]],
    max_tokens: int,
    logprobs: int | None = None,
    stop: tuple[str, ...] = (),
    prompt_logprobs: int | None = None,
) -> list[RowSpec]:
    """One RowSpec per (prompt, choice) in OpenAI's index order, every prompt already checked against the
    context (check_fits) and the number of rows against the server (check_rows). `stop`: sequences added to
    the request's own (a chat template's); prompt_logprobs: report the prompt's (echo)."""
    # The choices of one prompt differ only in their seeds: n configs serve every prompt.
    samplings = [fields.sampling(j, state.vocab_size) for j in range(fields.n or 1)]
    stops = fields.stop_strings + tuple(s for s in stop if s not in fields.stop_strings)
    return [
        RowSpec(tuple(ids), max_tokens, sampling, stops, logprobs, prompt_logprobs)
        for ids in prompts
        for sampling in samplings
    ]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """[tokenizer.encode(t) for t in texts], through the `tokenizers` backend's batch call where it has one:
    that call releases the GIL while it works, a single encode holds it (0.6 s for 800,000 characters of
    code), so the event loop goes on answering while another thread tokenizes a long prompt."""
    batch = getattr(getattr(tokenizer, "_tok", None), "encode_batch", None)
    if batch is None:
        return [tokenizer.encode(t) for t in texts]
    return [e.ids for e in batch(list(texts), add_special_tokens=False)]


def encode_text(tokenizer, text: str) -> list[int]:
    """encode_texts() of one text."""
    return encode_texts(tokenizer, [text])[0]


# ---------------------------------------------------------------------------------------------------------
# Collecting


@dataclass
class Choice:
    """One choice being assembled: its prompt, text so far, tokens and logprobs, and how it ended.

    offset: where its next token's text starts in the answered text (after the echoed prompt), for
    logprobs' text_offset.
    """

    index: int
    prompt_index: int
    offset: int = 0
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: dict | None = None
    cached_tokens: int = 0
    first_token_at: float | None = None  # perf_counter() when its first tokens arrived


class CompletionRun:
    """The rows of one request, submitted at construction, and the bookkeeping of their choices, the same for
    every endpoint.

    Wait for the whole answer with collect(), or take the updates one by one with next() (a stream); either
    way, cancel() the rows left unfinished (collect() does). Raises a 429 OpenAIError when the batcher's queue
    cannot take the rows. echo: per prompt, the text the answer starts with (Completions' echo), or None.
    """

    def __init__(
        self,
        state: ServerState,
        fields: SamplingFields,
        prompts: list[list[int]],
        specs: list[RowSpec],
        echo: list[str] | None = None,
    ):
        self.state = state
        self.prompts = prompts
        n = fields.n or 1
        loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[tuple[int, RowUpdate]] = asyncio.Queue()

        def sink(index: int):
            # Updates come from the batcher's worker thread: hand them to this loop's queue.
            return lambda update: loop.call_soon_threadsafe(self.updates.put_nowait, (index, update))

        try:
            self.rows = state.batcher.submit(specs, [sink(i) for i in range(len(specs))])
        except QueueFull as e:
            if state.draining:
                raise shutting_down() from e
            raise OpenAIError(
                429,
                f"The server is busy ({e}): retry after a moment",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from e
        state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * n)
        self.echo = echo
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.model = state.settings.served_name
        self.choices = [Choice(i, i // n) for i in range(len(specs))]
        for c in self.choices:
            c.offset = len(self.prefix(c))
        self.usage_prompt = sum(len(p) for p in prompts)
        self.include_usage = fields.include_usage
        self.remaining = len(self.choices)
        state.runs.add(self)  # until it is answered: a shutdown's grace period ends the runs still there

    def abort(self, message: str) -> None:
        """End this run now with an error (from the event loop): its stream sends an error event, its JSON
        answer is a 503; its rows are cancelled."""
        self.updates.put_nowait((-1, RowUpdate("", [], error=message)))

    def prefix(self, choice: Choice) -> str:
        """The echoed prompt of a choice ("" without echo)."""
        return self.echo[choice.prompt_index] if self.echo else ""

    def apply(self, index: int, update: RowUpdate) -> dict | None:
        """Book one row update into its choice (text, tokens, offsets, finish); return its logprobs piece."""
        c = self.choices[index]
        if c.first_token_at is None and update.tokens:
            c.first_token_at = time.perf_counter()
        c.text += update.text
        c.tokens += len(update.tokens)
        if update.cached_tokens is not None:
            c.cached_tokens = update.cached_tokens
        generated = _logprobs_piece(self.state, update, c.offset)
        c.offset += sum(len(t) for t in generated["tokens"]) if generated else 0
        piece = _merge_logprobs(_prompt_logprobs_piece(self.state, update, self.prompts[c.prompt_index]), generated)
        if update.finish_reason:
            c.finish_reason = update.finish_reason
            self.remaining -= 1
        return piece

    def usage(self) -> dict:
        """OpenAI's usage object: prompt tokens once per prompt, completion tokens over every choice; cached
        tokens: prompt tokens taken from the prefix cache, per prompt the most any of its choices reused."""
        completion_tokens = sum(c.tokens for c in self.choices)
        cached: dict[int, int] = {}
        for c in self.choices:
            cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), c.cached_tokens)
        return {
            "prompt_tokens": self.usage_prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": self.usage_prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
        }

    def cancel(self) -> None:
        """Cancel every row (those already ended ignore it): they leave the batch at the next step."""
        for row in self.rows:
            row.cancel()
        self.state.runs.discard(self)

    def failure(self, message: str) -> OpenAIError:
        """The error of a run that a row's error ended: a 503 while the server stops, else a 500."""
        return shutting_down() if self.state.draining else OpenAIError(500, message, type="server_error")

    def error_event(self, message: str) -> bytes:
        """The SSE event that ends a stream a row's error (or the end of a shutdown's grace) ended."""
        code = "server_shutting_down" if self.state.draining else None
        return sse(error_body(message, type="server_error", code=code))

    async def next(self) -> tuple[Choice | None, RowUpdate, dict | None]:
        """The next row update, booked: (its choice, the update, its logprobs piece); an update with `error`
        is not booked (choice None): the run is over."""
        index, update = await self.updates.get()
        if update.error:
            return None, update, None
        return self.choices[index], update, self.apply(index, update)

    async def collect(self, request: Request, enough: Callable[[], bool] | None = None) -> bool:
        """Wait for every row to end, or until `enough()` says the text so far will do (those rows end with
        finish_reason "length"); False when the client went away first. Raises failure() on a row's error.
        Every row is cancelled on the way out."""
        checked = time.monotonic()
        try:
            while self.remaining:
                if enough is not None and enough():
                    for c in self.choices:
                        c.finish_reason = c.finish_reason or "length"
                    break
                # Updates may arrive every few ms: look at the connection on a clock, not only when idle.
                if time.monotonic() - checked > DISCONNECT_POLL_S:
                    if await request.is_disconnected():
                        return False
                    checked = time.monotonic()
                try:
                    choice, update, piece = await asyncio.wait_for(self.next(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if update.error:
                    raise self.failure(update.error)
                choice.logprobs = _merge_logprobs(choice.logprobs, piece)
            return True
        finally:
            self.cancel()


# ---------------------------------------------------------------------------------------------------------
# The Completions API's answers


def completion_json(run: CompletionRun) -> dict:
    """OpenAI's text_completion body of a collected run."""
    choices = [
        {"index": c.index, "text": run.prefix(c) + c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
        for c in run.choices
    ]
    return {**_meta(run), "choices": choices, "usage": run.usage()}


async def completion_stream(run: CompletionRun) -> AsyncIterator[bytes]:
    """Server-Sent Events: a chunk per new piece of text, finish_reason on each choice's last chunk, the usage
    chunk when asked, then [DONE]. A client that goes away cancels its rows (finally below)."""
    meta = _meta(run)
    extra = {"usage": None} if run.include_usage else {}

    def chunk(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**meta, "choices": [choice], **extra})

    try:
        if run.echo:
            for c in run.choices:
                yield chunk(c.index, run.prefix(c), None)
        while run.remaining:
            choice, update, piece = await run.next()
            if update.error:
                yield run.error_event(update.error)
                return
            if update.text or update.finish_reason or piece:
                yield chunk(choice.index, update.text, update.finish_reason, piece)
        if run.include_usage:
            yield sse({**meta, "choices": [], "usage": run.usage()})
        yield sse("[DONE]")
    finally:
        run.cancel()


def _meta(run: CompletionRun) -> dict:
    return {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created, "model": run.model}


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    """A Server-Sent Events response of `events`, not cached or buffered by proxies."""
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _logprobs_object(state: ServerState, ids, logprobs: list, tops: list, offset: int) -> dict:
    """OpenAI's legacy logprobs object of tokens `ids`, text offsets counted from `offset`; a logprob and its
    alternatives may be None (a prompt's first token: nothing predicts it)."""
    decode = state.tokenizer.decode
    tokens = [decode([t]) for t in ids]
    offsets = [offset + n for n in itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)]
    top = [None if d is None else _by_text(decode, d) for d in tops]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def _logprobs_piece(state: ServerState, update: RowUpdate, offset: int) -> dict | None:
    """The logprobs object of one update's tokens, text offsets counted from `offset`."""
    if update.logprobs is None:
        return None
    return _logprobs_object(state, update.tokens, update.logprobs, update.top_logprobs, offset)


def _prompt_logprobs_piece(state: ServerState, update: RowUpdate, prompt: list[int]) -> dict | None:
    """The logprobs object of the prompt's tokens (echo), on the update that carries them."""
    if update.prompt_logprobs is None:
        return None
    return _logprobs_object(state, prompt, update.prompt_logprobs, update.prompt_top_logprobs, 0)


def _by_text(decode, top: dict[int, float]) -> dict[str, float]:
    """{token text: logprob} of {token: logprob}, most likely first; of tokens whose texts are equal (pieces of
    one character) the most likely one stands."""
    out: dict[str, float] = {}
    for t, lp in top.items():
        out.setdefault(decode([t]), lp)
    return out


def _merge_logprobs(into: dict | None, piece: dict | None) -> dict | None:
    if piece is None:
        return into
    if into is None:
        return piece
    for key in into:
        into[key].extend(piece[key])
    return into


def sse(payload: dict | str) -> bytes:
    """One Server-Sent Event: `data: ` and compact JSON (or a bare string: [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
