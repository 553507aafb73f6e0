"""The Completions endpoint's work: a request becomes rows for the batcher, their updates become OpenAI's
JSON body or its Server-Sent Events stream.

row_specs() encodes and checks the prompts (one RowSpec per prompt and choice); a CompletionRun submits
them and keeps, once for both answers, each choice's text, token count, logprobs and text offsets.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import CodegenDeployError
from .batcher import QueueFull, RowSpec, RowUpdate
from .dialects import handle_suffix, infill_parts, prompt_prefix
from .schemas import CompletionRequest, OpenAIError, bad_request, check_text, error_body
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
    try:
        # Tokenizing a long prompt takes a while: off the event loop, which goes on answering (encode_text
        # releases the GIL).
        prompts, specs = await asyncio.to_thread(row_specs, state, body)
    except CodegenDeployError as e:
        raise bad_request(str(e)) from e
    run = CompletionRun(state, body, prompts, specs)
    if body.stream:
        return StreamingResponse(
            run.stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await run.collect(request)


def shutting_down() -> OpenAIError:
    """The 503 of a request that arrives (or is cut) while the server stops: another replica can take it."""
    return OpenAIError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down")


def row_specs(state: ServerState, body: CompletionRequest) -> tuple[list[list[int]], list[RowSpec]]:
    """Encode the prompts and make one RowSpec per (prompt, choice), in OpenAI's index order. A request's
    suffix and the FIM wrapping of a string prompt go through dialects.py: filled in on a model with CodeGen2's
    tokens (Tokenizer.infill), the prompt continued or the request refused on CodeGen1 (--suffix).

    Everything that can be refused without tokenizing is checked first: the fields, the number of rows, and
    each string prompt's length against what the context can hold at most (state.max_token_chars characters a
    token), so a prompt of megabytes is refused at once rather than tokenized."""
    body.check()
    if state.fim is None:
        handle_suffix(state.settings.suffix, body.suffix)
    texts = body.prompts()
    n = body.n or 1
    holds = state.batcher.max_queue + state.batcher.max_batch
    if len(texts) * n > holds:
        raise bad_request(
            f"{len(texts)} prompts x n={n} make {len(texts) * n} rows, more than this server ever holds "
            f"({holds}): send fewer prompts or a smaller n",
            "n",
        )
    max_tokens = body.max_tokens or 16
    context = state.session.max_context
    prompts = []
    for i, p in enumerate(texts):
        gap = None  # (before, after) of a prompt filled in the middle
        if isinstance(p, str):
            check_text(p, f"prompt {i}", "prompt")
            if state.fim is not None:
                gap = infill_parts(p, body.suffix)
            else:
                p = prompt_prefix(p)
            most = max(context - max_tokens, 0) * state.max_token_chars
            if len(p) + len(body.suffix or "") > most:
                raise bad_request(
                    f"This model's maximum context length is {context} tokens, however you requested "
                    f"{max_tokens} tokens for the completion and a prompt of {len(p)} characters, more than the "
                    f"{max(context - max_tokens, 0)} tokens left can hold. Please reduce your prompt; or completion "
                    "length.",
                    "prompt",
                    "context_length_exceeded",
                )
        elif state.fim is not None and body.suffix is not None:
            raise bad_request("a suffix goes with text prompts: send the prompt as a string", "suffix")
        if gap is not None:
            check_text(gap[1], "suffix", "suffix")
            ids = state.tokenizer.infill(*gap)
        else:
            ids = encode_text(state.tokenizer, p) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request(f"prompt {i} is empty: give at least one character or token", "prompt")
        if min(ids) < 0 or max(ids) >= state.vocab_size:
            raise bad_request(f"prompt {i} has a token id outside 0..{state.vocab_size - 1}", "prompt")
        if len(ids) + max_tokens > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens, however you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the completion). "
                "Please reduce your prompt; or completion length.",
                "prompt",
                "context_length_exceeded",
            )
        prompts.append(ids)
    # The choices of one prompt differ only in their seeds: n configs serve every prompt.
    samplings = [body.sampling(j, state.vocab_size) for j in range(n)]
    specs = [
        RowSpec(tuple(ids), max_tokens, sampling, body.stop_strings, body.logprobs)
        for ids in prompts
        for sampling in samplings
    ]
    return prompts, specs


def encode_text(tokenizer, text: str) -> list[int]:
    """tokenizer.encode(text), through the `tokenizers` backend's batch call where it has one: that call
    releases the GIL while it works, a single encode holds it (0.6 s for 800,000 characters of code), so the
    event loop goes on answering while another thread tokenizes a long prompt."""
    batch = getattr(getattr(tokenizer, "_tok", None), "encode_batch", None)
    if batch is None:
        return tokenizer.encode(text)
    return batch([text], add_special_tokens=False)[0].ids


@dataclass
class _Choice:
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
    """The rows of one completion request, submitted at construction, and the bookkeeping of their choices.

    Answer with collect() (one JSON body) or stream() (SSE); either cancels the rows it leaves unfinished.
    Raises a 429 OpenAIError when the batcher's queue cannot take the rows.
    """

    def __init__(self, state: ServerState, body: CompletionRequest, prompts: list[list[int]], specs: list[RowSpec]):
        self.state = state
        n = body.n or 1
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
        self.echo = [state.tokenizer.decode(p) for p in prompts] if body.echo else None
        self.meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.settings.served_name,
        }
        self.choices = [_Choice(i, i // n) for i in range(len(specs))]
        for c in self.choices:
            c.offset = len(self.prefix(c))
        self.usage_prompt = sum(len(p) for p in prompts)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.remaining = len(self.choices)
        state.runs.add(self)  # until it is answered: a shutdown's grace period ends the runs still there

    def abort(self, message: str) -> None:
        """End this run now with an error (from the event loop): its stream sends an error event, its JSON
        answer is a 503; its rows are cancelled."""
        self.updates.put_nowait((-1, RowUpdate("", [], error=message)))

    def prefix(self, choice: _Choice) -> str:
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
        piece = _logprobs_piece(self.state, update, c.offset)
        c.offset += sum(len(t) for t in piece["tokens"]) if piece else 0
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

    async def collect(self, request: Request, enough: Callable[[], bool] | None = None) -> JSONResponse:
        """Wait for every row to end (cancelling them all if the client goes away, or once `enough()` says the
        text so far will do: those rows end with finish_reason "length"); answer one JSON body."""
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
                        return JSONResponse(error_body("the client disconnected"), status_code=499)
                    checked = time.monotonic()
                try:
                    index, update = await asyncio.wait_for(self.updates.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if update.error and self.state.draining:
                    raise shutting_down()
                if update.error:
                    raise OpenAIError(500, update.error, type="server_error")
                c = self.choices[index]
                c.logprobs = _merge_logprobs(c.logprobs, self.apply(index, update))
        finally:
            self.cancel()
        choices = [
            {
                "index": c.index,
                "text": self.prefix(c) + c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            }
            for c in self.choices
        ]
        return JSONResponse({**self.meta, "choices": choices, "usage": self.usage()})

    async def stream(self) -> AsyncIterator[bytes]:
        """Server-Sent Events: a chunk per new piece of text, finish_reason on each choice's last chunk, the
        usage chunk when asked, then [DONE]. A client that goes away cancels its rows (finally below)."""
        extra = {"usage": None} if self.include_usage else {}

        def chunk(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> bytes:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            return _sse({**self.meta, "choices": [choice], **extra})

        try:
            if self.echo:
                for c in self.choices:
                    yield chunk(c.index, self.prefix(c), None)
            while self.remaining:
                index, update = await self.updates.get()
                if update.error:
                    code = "server_shutting_down" if self.state.draining else None
                    yield _sse(error_body(update.error, type="server_error", code=code))
                    return
                piece = self.apply(index, update)
                if update.text or update.finish_reason or piece:
                    yield chunk(index, update.text, update.finish_reason, piece)
            if self.include_usage:
                yield _sse({**self.meta, "choices": [], "usage": self.usage()})
            yield _sse("[DONE]")
        finally:
            self.cancel()


def _logprobs_piece(state: ServerState, update: RowUpdate, offset: int) -> dict | None:
    """OpenAI's legacy logprobs object for the tokens of one update, text offsets counted from `offset`."""
    if update.logprobs is None:
        return None
    decode = state.tokenizer.decode
    tokens = [decode([t]) for t in update.tokens]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [{decode([t]): lp for t, lp in d.items()} for d in update.top_logprobs]
    return {"tokens": tokens, "token_logprobs": update.logprobs, "top_logprobs": top, "text_offset": offsets}


def _merge_logprobs(into: dict | None, piece: dict | None) -> dict | None:
    if piece is None:
        return into
    if into is None:
        return piece
    for key in into:
        into[key].extend(piece[key])
    return into


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
