"""Every editor's dialect: raw payloads shaped like each client's, against a real codegen-serve.

The payload shapes come from the clients' sources: Tabby's `openai/completion` kind
(crates/http-api-bindings/src/completion/openai.rs: model, prompt, suffix, max_tokens, temperature, stream,
presence_penalty), Continue's autocomplete through the openai provider (core/llm/llms/OpenAI.ts: the
template-rendered prompt, stop list not cut for a local apiBase), llama.vscode's OpenAI mode
(src/llama-server.ts: "Context:" + its openai_prompt_template, model "" by default), and Copilot-style clients
on FauxPilot's engine path (prompt and suffix, nwo, extra). Greedy (temperature 0), each must give what the
text before the cursor gives alone.
"""

from __future__ import annotations

import json

import openai
import pytest

from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.serve.dialects import SUFFIX_UNSUPPORTED

PREFIX = "def fib(n):\n    if n < 2:\n        "
SUFFIX = "\n    return fib(n - 1) + fib(n - 2)\n"
# Continue's prefix: its (empty) snippets and the file's path as a comment, joined by newlines.
CONTINUE_PREFIX = "\n# demo/fib.py\n" + PREFIX
# The stop list Continue sends with its default template (stableCodeFimTemplate + getStopTokens' common stops).
CONTINUE_STOPS = [
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<file_sep>",
    "<|endoftext|>",
    "</fim_middle>",
    "</code>",
    "/src/",
    "#- coding: utf-8",
    "```",
]


def completion(server, path: str, payload: dict) -> tuple[int, dict]:
    """(status, body) of one request; a stream is joined into {"text", "finish_reason", "usage"}."""
    status, _, body = server.request("POST", path, payload)
    if status != 200 or not payload.get("stream"):
        return status, json.loads(body)
    events = [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return status, {"text": text, "finish_reason": chunks[-1]["choices"][0]["finish_reason"]}


def alone(server, prompt: str, max_tokens: int, stop: list[str] | None = None) -> str:
    """The greedy text of `prompt` alone, no suffix: what every dialect must reproduce."""
    payload = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": stop}
    status, body = completion(server, "/v1/completions", payload)
    assert status == 200, body
    return body["choices"][0]["text"]


def test_copilot_payload_with_suffix_on_the_engine_path_equals_the_prefix_alone(server):
    copilot = {
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "max_tokens": 12,
        "temperature": 0,
        "top_p": 1,
        "n": 1,
        "stop": ["\n\n\n"],
        "stream": True,
        "nwo": "me/repo",
        "extra": {"language": "python", "next_indent": 0, "trim_by_indentation": True},
    }
    status, body = completion(server, "/v1/engines/tiny/completions", copilot)
    assert status == 200, body
    assert body["text"] == alone(server, PREFIX, 12, ["\n\n\n"]) and body["finish_reason"]


def test_tabby_openai_completion_payload_with_suffix_equals_the_prefix_alone(server):
    tabby = {
        "model": "tiny",
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "presence_penalty": 0.0,
    }
    status, body = completion(server, "/v1/completions", tabby)
    assert status == 200, body
    assert body["text"] == alone(server, PREFIX, 12)
    # Tabby sends "suffix": null when its prompt has no cursor mark.
    status, body = completion(server, "/v1/completions", {**tabby, "suffix": None})
    assert status == 200 and body["text"] == alone(server, PREFIX, 12)


def test_continue_fim_wrapped_prompt_and_its_ten_stops_equal_the_prefix_alone(server):
    wrapped = f"<fim_prefix>{CONTINUE_PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    payload = {
        "model": "tiny",
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stop": CONTINUE_STOPS,
        "prompt": wrapped,
    }
    status, body = completion(server, "/v1/completions", payload)
    assert status == 200, body
    assert body["text"] == alone(server, CONTINUE_PREFIX, 12, CONTINUE_STOPS)


def test_llama_vscode_openai_mode_with_context_and_no_model_name(server):
    # openai_prompt_template's default, after "Context:" and one chunk; openai_client_model's default "".
    prompt = f"Context:\n\nimport math\n<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    payload = {"model": "", "prompt": prompt, "max_tokens": 12, "temperature": 0, "top_p": 0.99, "stream": False}
    status, body = completion(server, "/v1/completions", payload)
    assert status == 200, body
    assert body["choices"][0]["text"] == alone(server, PREFIX, 12)


def test_only_string_prompts_are_unwrapped(server, fp32_export):
    tokenizer = load_tokenizer(fp32_export)
    wrapped = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    base = {"model": "tiny", "max_tokens": 2, "temperature": 0}
    status, body = completion(server, "/v1/completions", {**base, "prompt": wrapped})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(tokenizer.encode(PREFIX))
    ids = tokenizer.encode(wrapped)
    status, body = completion(server, "/v1/completions", {**base, "prompt": ids})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(ids)
    # Code that merely mentions the sentinels is sent as it is.
    code = 'TEMPLATE = "<fim_prefix>{p}<fim_suffix>{s}<fim_middle>"\n'
    status, body = completion(server, "/v1/completions", {**base, "prompt": code})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(tokenizer.encode(code))


def test_model_card_says_suffix_is_ignored_and_the_log_says_it_once(server):
    status, _, body = server.request("GET", "/v1/models")
    (card,) = json.loads(body)["data"]
    assert status == 200 and card["fill_in_the_middle"] is False and card["suffix"] == "ignored"
    assert json.loads(server.request("GET", "/v1/models/tiny")[2])["suffix"] == "ignored"
    for _ in range(2):
        completion(server, "/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 1})
        completion(server, "/v1/completions", {"prompt": f"<fim_prefix>{PREFIX}<fim_suffix>x<fim_middle>"})
    log = server.log.read_text()
    assert log.count("requests send `suffix`") == 1
    assert log.count("wrapped in the starcoder fill-in-the-middle layout") == 1


@pytest.fixture
def strict_server(fp32_export, tmp_path_factory, start_server):
    """A server started with --suffix error."""
    log = tmp_path_factory.mktemp("serve-strict") / "server.log"
    argv = [str(fp32_export), "--model-name", "tiny", "--suffix", "error", "--max-batch", "1", "--threads", "1"]
    s = start_server(argv, log)
    yield s
    s.stop()


def test_suffix_error_answers_vllms_400(strict_server):
    copilot = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4, "temperature": 0, "stream": True}
    for path in ("/v1/engines/tiny/completions", "/v1/completions"):
        status, _, body = strict_server.request("POST", path, copilot)
        error = json.loads(body)["error"]
        assert status == 400 and error["message"] == SUFFIX_UNSUPPORTED and error["param"] == "suffix"
    # As vLLM: an empty suffix is refused too, a null one is no suffix.
    assert strict_server.request("POST", "/v1/completions", {**copilot, "suffix": ""})[0] == 400
    assert strict_server.request("POST", "/v1/completions", {**copilot, "suffix": None})[0] == 200
    client = openai.OpenAI(base_url=strict_server.base_url, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError, match=SUFFIX_UNSUPPORTED):
        client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=2)
    assert client.completions.create(model="tiny", prompt=PREFIX, max_tokens=2).choices[0].finish_reason
    assert client.models.retrieve("tiny").model_extra["suffix"] == "refused"
