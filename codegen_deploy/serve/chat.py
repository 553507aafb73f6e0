"""POST /v1/chat/completions: OpenAI's Chat Completions API over a base code model.

The messages become one prompt through the server's ChatTemplate (chat_template.py: by default instructions
as comments, earlier answers as code), which then goes through the completion core (completions.py) like any
prompt: the same checks, rows, prefix cache, sampling fields, errors and drain. The answer is OpenAI's
chat.completion body, or its chat.completion.chunk stream (a first chunk with the role, then content deltas,
finish_reason on each choice's last chunk, usage when asked, [DONE]).

llama.vim's instruction feature posts here: a warm-up (`n_predict: 0`, llama.cpp's field) that only reads
the conversation into the prefix cache, then the streamed request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from .chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from .completions import (
    CompletionRun,
    check_chars,
    check_fits,
    check_rows,
    disconnected,
    encode_text,
    make_rows,
    off_loop,
    shutting_down,
    sse,
    sse_response,
)
from .schemas import ChatCompletionRequest, bad_request
from .settings import check_model
from .state import ServerState


async def create_chat_completion(request: Request, body: ChatCompletionRequest):
    """Answer one chat completion request: a JSON body, or an SSE stream when body.stream."""
    state: ServerState = request.app.state.server
    check_model(state.settings, body.model, "model")
    if state.draining:
        raise shutting_down()
    template = state.settings.chat_template or DEFAULT_CHAT_TEMPLATE
    ids, max_tokens = await off_loop(chat_prompt, state, body, template)
    run = CompletionRun(state, body, [ids], make_rows(state, body, [ids], max_tokens, stop=template.stop))
    warm_up = body.answer_limit == 0
    if body.stream:
        return sse_response(chat_stream(run, warm_up))
    if not await run.collect(request):
        return disconnected()
    return JSONResponse(chat_json(run, warm_up))


def chat_prompt(state: ServerState, body: ChatCompletionRequest, template: ChatTemplate) -> tuple[list[int], int]:
    """The token ids of the conversation's prompt and the answer's length limit (the rest of the context when
    the request sets none; 1 for a warm-up, whose token is not sent). Refused before tokenizing where the
    prompt's characters cannot fit the context."""
    body.check()
    check_rows(state, 1, body.n or 1)
    prompt = template.render([(m.role, m.text(f"messages[{i}]")) for i, m in enumerate(body.messages)])
    limit = body.answer_limit
    need = limit or 1  # None (the rest of the context) and a warm-up need one token at least
    check_chars(state, [("messages", prompt)], need)
    ids = encode_text(state.tokenizer, prompt)
    if not ids:
        raise bad_request("the messages make an empty prompt: send some text", "messages")
    check_fits(state, [("messages", len(ids))], need)
    return ids, state.session.max_context - len(ids) if limit is None else need


def _meta(run: CompletionRun, kind: str) -> dict:
    return {"id": f"chatcmpl-{run.id}", "object": kind, "created": run.created, "model": run.model}


def _usage(run: CompletionRun, warm_up: bool) -> dict:
    usage = run.usage()
    if warm_up:  # its one token read the prompt; it is not an answer
        usage.update(completion_tokens=0, total_tokens=usage["prompt_tokens"])
    return usage


def chat_json(run: CompletionRun, warm_up: bool = False) -> dict:
    """OpenAI's chat.completion body of a collected run."""
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": "" if warm_up else c.text},
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        for c in run.choices
    ]
    return {**_meta(run, "chat.completion"), "choices": choices, "usage": _usage(run, warm_up)}


async def chat_stream(run: CompletionRun, warm_up: bool = False) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: each choice's role first, then its content as it is decoded, its
    finish_reason on its last chunk; the usage chunk when asked; [DONE]. A client that goes away cancels the
    rows (finally below)."""
    meta = _meta(run, "chat.completion.chunk")
    extra = {"usage": None} if run.include_usage else {}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**meta, "choices": [choice], **extra})

    try:
        for c in run.choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        while run.remaining:
            choice, update, _ = await run.next()
            if update.error:
                yield run.error_event(update.error)
                return
            text = "" if warm_up else update.text
            if text or update.finish_reason:
                yield chunk(choice.index, {"content": text} if text else {}, update.finish_reason)
        if run.include_usage:
            yield sse({**meta, "choices": [], "usage": _usage(run, warm_up)})
        yield sse("[DONE]")
    finally:
        run.cancel()
