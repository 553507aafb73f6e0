"""POST /v1/chat/completions against a real codegen-serve: the official openai client (streaming and not), raw
payloads shaped like llama.vim's instruction feature (autoload/llama.vim: llama#inst's warm-up with n_predict 0
and llama#inst_send's streamed request), errors, and the chat template (default and --chat-template FILE).

Greedy, a chat answer must be the completion of the prompt the template writes, which this file writes itself
(instructions as `# ` comments, answers as code), so the template and the way it is served are checked apart.
"""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from codegen_deploy.errors import InputError
from codegen_deploy.serve.chat_template import MAX_TEMPLATE_BYTES, ChatTemplate, load_chat_template

SYSTEM = "You write Python.\nKeep it short."
USER = "Write a function that adds two numbers."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
# What the default template writes for MESSAGES: each instruction line commented out, the answer after them.
PROMPT = "# You write Python.\n# Keep it short.\n# Write a function that adds two numbers.\n"
DEFAULT_STOP = ["\n\n\n"]
CONTEXT = 256  # the tiny export's

# llama.vim's llama#inst_build: the system prompt (its instructions, here only their first sentence to fit the tiny
# model's 256-token context, and the code around the selection under its markers), then the instruction as the
# user's message.
LLAMA_VIM_SYSTEM = (
    "You are a text-editing assistant. Respond ONLY with the result of applying INSTRUCTION to SELECTION given the "
    "CONTEXT.\n\n"
    f"--- CONTEXT     {'-' * 40}\n\n"
    f"--- PREFIX      {'-' * 40}\nimport math\n"
    f"--- SELECTION   {'-' * 40}\ndef area(r):\n    return 3.14 * r * r\n"
    f"--- SUFFIX      {'-' * 40}\n\n"
)
# llama#inst: a warm-up while the user types the instruction (the answer is not read).
LLAMA_VIM_WARM_UP = {
    "id_slot": 0,
    "messages": [{"role": "system", "content": LLAMA_VIM_SYSTEM}, {"role": "user", "content": ""}],
    "samplers": [],
    "n_predict": 0,
    "stream": False,
    "cache_prompt": True,
    "response_fields": [""],
}
# llama#inst_send: the instruction, streamed.
LLAMA_VIM_INSTRUCT = {
    "id_slot": 0,
    "messages": [
        {"role": "system", "content": LLAMA_VIM_SYSTEM},
        {"role": "user", "content": "INSTRUCTION: use math.pi"},
    ],
    "min_p": 0.1,
    "temperature": 0.1,
    "samplers": ["min_p", "temperature"],
    "stream": True,
    "cache_prompt": True,
}


def completion_text(client, prompt: str, max_tokens: int, stop=DEFAULT_STOP) -> tuple[str, str]:
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stop=stop)
    return r.choices[0].text, r.choices[0].finish_reason


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def test_a_chat_completion_is_the_completion_of_the_templates_prompt(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert isinstance(r, ChatCompletion) and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    ChatCompletion.model_validate(r.model_dump())
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == completion_text(client, PROMPT, 12)
    prompt_tokens = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens


def test_a_streamed_chat_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(isinstance(c, ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    first, *deltas, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in deltas]
    assert reasons[-1] == whole.choices[0].finish_reason and all(r is None for r in reasons[:-1])
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_text_parts_n_seed_and_the_rest_of_the_context(client):
    parts = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "You write Python."}, {"type": "text", "text": "Keep it short."}],
        }
    ]
    as_parts = client.chat.completions.create(model="tiny", messages=[*parts, MESSAGES[1]], max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == completion_text(client, PROMPT, 8)[0]  # parts joined by "\n"
    kw = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 3}
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    # No max_tokens: as OpenAI's, the answer may take the rest of the context.
    open_ended = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0)
    text, reason = completion_text(client, PROMPT, CONTEXT - open_ended.usage.prompt_tokens)
    assert (open_ended.choices[0].message.content, open_ended.choices[0].finish_reason) == (text, reason)
    assert open_ended.usage.total_tokens <= CONTEXT


def test_llama_vim_instruction_payloads(server):
    """The warm-up reads the conversation into the prefix cache and answers nothing; the streamed request then
    reuses it and streams deltas the way llama.vim reads them (`data: ` lines, choices[0].delta.content)."""
    status, _, body = server.request("POST", "/v1/chat/completions", LLAMA_VIM_WARM_UP)
    warm = json.loads(body)
    assert status == 200 and warm["choices"][0]["message"]["content"] == ""
    assert warm["usage"]["completion_tokens"] == 0
    payload = {**LLAMA_VIM_INSTRUCT, "temperature": 0, "stream_options": {"include_usage": True}}
    status, headers, body = server.request("POST", "/v1/chat/completions", payload)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > usage["prompt_tokens"] // 2  # the warm-up's
    status, _, body = server.request("POST", "/v1/chat/completions", {**payload, "stream": False})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == content
    # As llama.vim sends it (sampled at 0.1): a stream of deltas and one finish_reason.
    status, _, body = server.request("POST", "/v1/chat/completions", LLAMA_VIM_INSTRUCT)
    chunks = [json.loads(e) for e in sse_events(body)[:-1]]
    assert status == 200 and sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1


CHAT_ERRORS = [
    ({"messages": []}, 400, "messages is empty", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role is 'tool'", "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0] is a 'image_url' part",
        "messages",
    ),
    ({"messages": [{"role": "user", "content": "x\ud800"}]}, 400, "lone surrogate", "messages"),
    ({"messages": MESSAGES, "logprobs": True}, 400, "logprobs is not supported", "logprobs"),
    ({"messages": MESSAGES, "temperature": 3}, 400, "temperature", "temperature"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens", "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "y" * 100_000}]}, 400, "at least", "messages"),
    ({"messages": [{"role": "user", "content": "x = 1\n" * 200}]}, 400, "in your messages", "messages"),
    ({"messages": MESSAGES, "max_tokens": 256}, 400, "leaves no room", "max_tokens"),
    ({"messages": MESSAGES, "model": "gpt-4o"}, 404, "does not exist", "model"),
    ({"prompt": "x"}, 400, "messages", "messages"),
]


@pytest.mark.parametrize(("fields", "status", "message", "param"), CHAT_ERRORS, ids=[e[2][:30] for e in CHAT_ERRORS])
def test_chat_mistakes_are_openai_errors_naming_the_field(server, fields, status, message, param):
    got, _, body = server.request("POST", "/v1/chat/completions", {"model": "tiny", **fields})
    error = json.loads(body)["error"]
    assert got == status and message in error["message"] and error["param"] == param, error


def test_the_api_key_guards_chat_as_every_route(small_server):
    body = {"messages": MESSAGES, "max_tokens": 2}
    status, _, text = small_server.request("POST", "/v1/chat/completions", body)
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=small_server.base_url, api_key="sekret", max_retries=0, timeout=30)
    assert client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2).choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match="messages is empty"):
        client.chat.completions.create(model="m", messages=[])


# ---------------------------------------------------------------------------------------------------------
# The template


def test_the_default_template_comments_instructions_and_keeps_answers_as_code():
    messages = [("system", SYSTEM), ("user", USER), ("assistant", "def add(a, b):\n    return a + b\n"), ("user", "")]
    # Templates are literal: "{content}\n" after an answer that ends with a new line leaves an empty line.
    assert ChatTemplate().render(messages) == PROMPT + "def add(a, b):\n    return a + b\n\n#\n"
    assert ChatTemplate().render([("developer", "a\n\nb")]) == "# a\n#\n# b\n"
    # A text that looks like a placeholder is the client's text, never filled in again.
    assert ChatTemplate().render([("assistant", "x = '{comment}'")]) == "x = '{comment}'\n"


def write(tmp_path, text: str | bytes):
    path = tmp_path / "template.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"user": "# {content}\\n", "stpo": []}', "unknown key 'stpo'"),
        ('{"user": "Instruction: "}', "the user template has neither {content} nor {comment}"),
        ('{"user": 3}', "user must be a string"),
        ('{"stop": [""]}', "stop must be a list of non-empty strings"),
        ('{"stop": "x"}', "stop must be a list"),
        ("[1]", "must be a JSON object"),
        ('{"user": "x"', "is not valid JSON (Expecting"),
        (b'{"comment": "\xff"}', "is not UTF-8 text"),
        (" " * (MAX_TEMPLATE_BYTES + 1), "larger than 64 KB"),
    ],
)
def test_a_bad_template_file_is_one_line_naming_the_option(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(InputError, match="--chat-template") as info:
        load_chat_template(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_missing_template_file_is_one_line(tmp_path):
    with pytest.raises(InputError, match="cannot read --chat-template"):
        load_chat_template(tmp_path / "missing.json")


def test_a_template_file_keeps_the_defaults_it_does_not_give(tmp_path):
    template = load_chat_template(write(tmp_path, '{"user": "\\"\\"\\"{content}\\"\\"\\"\\n", "system": ""}'))
    assert template == ChatTemplate(user='"""{content}"""\n', system="")
    assert template.render([("system", "dropped"), ("user", "Add two numbers.")]) == '"""Add two numbers."""\n'
