"""codegen-serve end to end: a real server process, the official openai client, raw editor payloads."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import time

import numpy as np
import openai
import pytest
from openai.types import Completion

from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.runtime import generate, open_session
from codegen_deploy.runtime.sampling import log_softmax
from codegen_deploy.serve.schemas import MAX_STOP, MAX_STOP_CHARS

PROMPT = "def fibonacci(n):\n    "
PROMPTS = [
    "import os\n",
    "class Stack:\n    def push(self, item):\n",
    "def add(a, b):\n    return",
    "# sort a list\n",
    "for i in range(10):\n",
    "x = [",
    "def parse(text: str) -> dict:\n    '''Parse the text.'''\n",
    "while True:\n    line = input()\n",
]


@pytest.fixture(scope="module")
def tokenizer(fp32_export):
    return load_tokenizer(fp32_export)


@pytest.fixture(scope="module")
def greedy(client_factory):
    """Greedy text of one prompt, one request at a time (cached)."""
    cache: dict[tuple, str] = {}

    def run(prompt, max_tokens: int = 16) -> str:
        key = (json.dumps(prompt), max_tokens)
        if key not in cache:
            r = client_factory().completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
            cache[key] = r.choices[0].text
        return cache[key]

    return run


@pytest.fixture(scope="module")
def client_factory(server):
    return lambda: openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=30)


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def test_completion_is_an_openai_completion_equal_to_the_library(client, fp32_export, tokenizer):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert isinstance(r, Completion)
    Completion.model_validate(r.model_dump())
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    with open_session("onnxruntime", fp32_export, threads=1) as session:
        expected = generate(session, tokenizer, PROMPT, max_new_tokens=12)
    assert choice.text == expected.text
    assert choice.index == 0 and choice.logprobs is None
    n_prompt = len(tokenizer.encode(PROMPT))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(expected.ids)
    assert r.usage.total_tokens == n_prompt + len(expected.ids)
    assert choice.finish_reason == ("length" if expected.completions[0].finish_reason == "length" else "stop")


def test_stream_equals_the_non_streamed_text_with_one_finish_reason_and_usage(client, server, greedy):
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *text_chunks, usage_chunk = chunks
    assert len(text_chunks) >= 2  # streamed piece by piece, not all at the end
    assert "".join(c.choices[0].text for c in text_chunks) == greedy(PROMPT, 20)
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert all(c.usage is None for c in text_chunks)
    status, headers, body = server.request(
        "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


def test_n_and_list_prompts_give_the_right_indices(client, tokenizer, greedy):
    a, b = PROMPTS[0], PROMPTS[2]
    r = client.completions.create(model="tiny", prompt=[a, b], n=2, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [greedy(a, 8)] * 2 + [greedy(b, 8)] * 2
    ids = client.completions.create(
        model="tiny", prompt=[tokenizer.encode(a), tokenizer.encode(b)], max_tokens=8, temperature=0
    )
    assert [c.text for c in ids.choices] == [greedy(a, 8), greedy(b, 8)]
    one = client.completions.create(model="tiny", prompt=tokenizer.encode(b), max_tokens=8, temperature=0)
    assert one.choices[0].text == greedy(b, 8)
    # Sampling with a seed: reproducible, and the n choices differ from each other.
    kw = {"model": "tiny", "prompt": a, "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    streamed = client.completions.create(**kw, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in first.choices]


def test_stop_is_trimmed_across_token_boundaries(client, greedy):
    text = greedy(PROMPT, 30)
    stop = text[9:12]  # three characters from the middle, likely spanning tokens
    assert stop.strip(), text
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "@@never@@"])
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(stop)]


def test_length_echo_and_real_logprobs(client, fp32_export, tokenizer):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 3
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    with open_session("onnxruntime", fp32_export, threads=1) as session:
        first = log_softmax(session.prefill(np.array([tokenizer.encode(PROMPT)])))[0]
    assert lp.token_logprobs[0] == pytest.approx(first.max(), abs=1e-4)  # greedy: the most likely token
    assert len(lp.top_logprobs[0]) == 2 and max(lp.top_logprobs[0].values()) == pytest.approx(first.max(), abs=1e-4)
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + choice.text


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_with_logprobs_gives_each_prompt_tokens_log_probability(client, tiny_model, tokenizer, as_ids):
    """What lm-evaluation-harness asks for a log-likelihood: echo, logprobs, max_tokens 0 (or 1). Each prompt
    token's log-probability is the reference model's over the whole prompt, even after the same prompt primed
    the prefix cache (a cache holds no logits: such a row reads its whole prompt)."""
    import torch

    ids = tokenizer.encode(PROMPT + "return n")
    with torch.no_grad():
        expected = torch.log_softmax(tiny_model(torch.tensor([ids]))[0][0].double(), -1).numpy()  # [T, V]
    prompt = ids if as_ids else PROMPT + "return n"
    client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)  # primes the cache
    for max_tokens in (0, 1):
        r = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True, logprobs=2
        )
        choice = r.choices[0]
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens and r.usage.completion_tokens == max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = [expected[i - 1, ids[i]] for i in range(1, len(ids))]
        np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], want, atol=1e-4)
        for i in range(1, len(ids)):
            assert max(lp.top_logprobs[i].values()) == pytest.approx(expected[i - 1].max(), abs=1e-4)
        assert "".join(lp.tokens) == choice.text and lp.text_offset[1] == len(lp.tokens[0])
        if max_tokens == 0:
            assert choice.text == PROMPT + "return n" and choice.finish_reason == "length"


ERRORS = [
    ({"temperature": 3}, openai.BadRequestError, "temperature"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"n": 0}, openai.BadRequestError, "n must be"),
    ({"logprobs": 9}, openai.BadRequestError, "logprobs"),
    ({"presence_penalty": 5}, openai.BadRequestError, "presence_penalty"),
    ({"prompt": ""}, openai.BadRequestError, "empty"),
    ({"prompt": [[5, 999999]]}, openai.BadRequestError, "token id"),
    ({"prompt": "x " * 400}, openai.BadRequestError, "maximum context length"),
    ({"max_tokens": 100000}, openai.BadRequestError, "maximum context length"),
    ({"stop": [f"s{i}" for i in range(MAX_STOP + 1)]}, openai.BadRequestError, "stop takes at most"),
    ({"stop": ["\n", "x" * (MAX_STOP_CHARS + 1)]}, openai.BadRequestError, "more than 1000"),
    ({"max_tokens": -1, "echo": True}, openai.BadRequestError, "max_tokens must be >= 0"),
    ({"best_of": 3}, openai.BadRequestError, "best_of"),
    ({"model": "gpt-3.5-turbo-instruct"}, openai.NotFoundError, "does not exist"),
]


@pytest.mark.parametrize(("fields", "error", "message"), ERRORS, ids=[str(e[0])[:40] for e in ERRORS])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, server, fields, error, message):
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **fields}
    with pytest.raises(error, match=message) as info:
        client.completions.create(**kw)
    assert info.value.status_code in (400, 404)
    assert set(info.value.body) >= {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices[0].finish_reason


RAW_ERRORS = [
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("POST", "/v1/completions", b"{not json", 400, "JSON"),
    ("POST", "/v1/completions", [1, 2], 400, "body"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages is empty"),
    ("POST", "/v1/embeddings", {"input": "x"}, 404, "Unknown request URL"),
    ("GET", "/v1/completions", None, 405, "not allowed"),
    ("POST", "/v1/engines/codex/completions", {"prompt": "x"}, 404, "does not exist"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), RAW_ERRORS)
def test_raw_mistakes_are_openai_errors_never_422(server, method, path, body, status, message):
    got, _, text = server.request(method, path, body)
    assert got == status
    error = json.loads(text)["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_body_that_is_not_json_says_where_and_what_to_send(server):
    # Invalid JSON: the parser's reason and where, and no `param` (FastAPI puts the position where a field goes).
    status, _, text = server.request("POST", "/v1/completions", b'{"prompt": "x",\n "n": }')
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] is None, error
    assert error["message"] == (
        "The body is not valid JSON (Expecting value at line 2, column 7): send one JSON object, encoded in UTF-8"
    )
    # Not UTF-8 (Latin-1 here): said as such, with the remedy, instead of "There was an error parsing the body".
    status, _, text = server.request("POST", "/v1/completions", '{"prompt": "café"}'.encode("latin-1"))
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] is None, error
    assert error["message"] == (
        "The body is not UTF-8 text (byte 0xe9 at position 15): send the JSON body encoded in UTF-8"
    )


def test_echo_returns_the_prompt_as_sent(client, tokenizer):
    """echo gives back the prompt the client sent, not what the server made of it: here a FIM-wrapped prompt, of
    which CodeGen1 reads only the text before the cursor."""
    wrapped = f"<fim_prefix>{PROMPT}<fim_suffix>\n    return x\n<fim_middle>"
    plain = client.completions.create(model="tiny", prompt=wrapped, max_tokens=3, temperature=0)
    echoed = client.completions.create(model="tiny", prompt=wrapped, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == wrapped + plain.choices[0].text
    streamed = client.completions.create(
        model="tiny", prompt=wrapped, max_tokens=3, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text
    # Token ids are echoed as their text.
    ids = client.completions.create(model="tiny", prompt=tokenizer.encode(PROMPT), max_tokens=1, echo=True)
    assert ids.choices[0].text.startswith(PROMPT)


def test_the_context_error_counts_in_one_unit(server):
    """A prompt refused before tokenizing is measured in characters and said in tokens ("at least N tokens"),
    never "N characters, more than M tokens"; an answer that takes the whole context blames max_tokens."""
    status, _, text = server.request("POST", "/v1/completions", {"prompt": "y" * 200_000, "max_tokens": 8})
    error = json.loads(text)["error"]
    assert status == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    pattern = r"a prompt of 200,000 characters: at least ([\d,]+) tokens \(a token is at most (\d+) characters\)"
    match = re.search(pattern, error["message"])
    assert match and int(match[1].replace(",", "")) == math.ceil(200_000 / int(match[2])), error["message"]
    assert "more than the 248 tokens left" in error["message"]  # a 256-token context, 8 for the answer
    status, _, text = server.request("POST", "/v1/completions", {"prompt": "123456789", "max_tokens": 256})
    error = json.loads(text)["error"]
    assert status == 400 and error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "leaves no room for the prompt" in error["message"] and "characters" not in error["message"]


def test_a_suffix_codegen1_ignores_is_not_counted_against_the_context(server):
    status, _, text = server.request(
        "POST", "/v1/completions", {"prompt": PROMPT, "suffix": "z" * 100_000, "max_tokens": 2}
    )
    assert status == 200, text


def test_unknown_routes_are_counted_as_unknown_not_completions(server):
    completions_404 = 'codegen_requests_total{endpoint="completions",status="404"}'
    unknown_404 = 'codegen_requests_total{endpoint="unknown",status="404"}'
    before, unknown_before = server.metric(completions_404), server.metric(unknown_404)
    for path in ("/v2/completions", "/v1/engines/a/b/completions", "/completions"):
        assert server.request("POST", path, {"prompt": "x"})[0] == 404
    assert server.metric(unknown_404) == unknown_before + 3
    assert server.metric(completions_404) == before
    ok = 'codegen_requests_total{endpoint="chat_completions",status="200"}'
    chat_before = server.metric(ok)
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert server.request("POST", "/v1/chat/completions", body)[0] == 200
    assert server.metric(ok) == chat_before + 1


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, _, body = server.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in (
        "codegen_requests_total",
        "codegen_generated_tokens_total",
        "codegen_queue_depth",
        "codegen_active_rows",
        "codegen_time_to_first_token_seconds_bucket",
        "codegen_time_per_output_token_seconds_bucket",
    ):
        assert name in text
    assert server.metric('codegen_requests_total{endpoint="completions",status="200"}') > 0


def test_16_concurrent_requests_equal_their_one_at_a_time_outputs(server, greedy):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    lengths = [6 + 3 * (i % 5) for i in range(16)]
    alone = [greedy(p, n) for p, n in zip(prompts, lengths, strict=True)]

    async def one(client, prompt, n, stream):
        if not stream:
            r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
            return r.choices[0].text
        chunks = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in chunks])

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
        async with client:
            jobs = [one(client, p, n, i % 2 == 1) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
            return await asyncio.gather(*jobs)

    assert asyncio.run(all_at_once()) == alone


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_goes_away_frees_its_row(server, client):
    cancelled = 'codegen_rows_total{finish="cancelled"}'
    before = server.metric(cancelled)
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=250, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    assert wait_for(lambda: server.metric("codegen_active_rows") == 0 and server.metric(cancelled) == before + 1)
    assert server.metric("codegen_generated_tokens_total") > 0


def test_tabby_continue_and_fauxpilot_payloads(server, greedy):
    tabby_fim = {
        "model": "tiny",
        "prompt": "def fib(n):\n    ",
        "suffix": "\n    return fib(n - 1)\n",
        "max_tokens": 16,
        "temperature": 0.1,
        "stream": True,
        "presence_penalty": 0.0,
    }
    status, _, body = server.request("POST", "/v1/completions", {**tabby_fim, "user": "tabby"})  # suffix ignored
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]
    continue_payload = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "stream": False,
        "stop": ["\n\n", "```"],
        "raw": True,
        "keep_alive": 1800,
        "options": {"num_predict": 12},
        "frequency_penalty": 0,
    }
    status, _, body = server.request("POST", "/v1/completions", continue_payload)
    text = greedy(PROMPT, 12)
    cut = min((i for i in (text.find("\n\n"), text.find("```")) if i >= 0), default=len(text))
    assert status == 200 and json.loads(body)["choices"][0]["text"] == text[:cut]
    copilot = {
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "top_p": 1,
        "n": 1,
        "stop": ["\n\n\n"],
        "stream": True,
        "nwo": "me/repo",
        "extra": {"language": "python", "next_indent": 0},
    }
    status, _, body = server.request("POST", "/v1/engines/tiny/completions", copilot)
    events = sse_events(body)
    joined = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert status == 200 and events[-1] == "[DONE]"
    assert joined == (text[: text.find("\n\n\n")] if "\n\n\n" in text else text)


def test_api_key_and_a_full_queue(small_server):
    url = small_server.base_url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).completions.create(model="m", prompt="x")
    status, _, body = small_server.request("POST", "/v1/completions", {"prompt": "x"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert small_server.request("GET", "/health")[0] == 200  # liveness probes carry no key
    assert small_server.request("GET", "/metrics")[0] == 401

    async def burst():
        client = openai.AsyncOpenAI(base_url=url, api_key="sekret", max_retries=0, timeout=60)
        async with client:
            jobs = [
                client.completions.create(model="any-name", prompt="x", max_tokens=200, temperature=0)
                for _ in range(12)
            ]
            return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(burst())
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    done = [r for r in results if isinstance(r, Completion)]
    assert limited and done and len(limited) + len(done) == len(results)
    assert limited[0].response.headers["retry-after"] == "1"
    assert all(d.choices[0].text == done[0].choices[0].text for d in done)
    ok = openai.OpenAI(base_url=url, api_key="sekret", max_retries=0).completions.create(model="m", prompt="x")
    assert ok.choices[0].finish_reason == "length"


def test_a_non_streaming_client_that_goes_away_frees_its_rows(server):
    cancelled = 'codegen_rows_total{finish="cancelled"}'
    before = server.metric(cancelled)
    body = json.dumps({"model": "tiny", "prompt": "x", "n": 16, "max_tokens": 250, "temperature": 0}).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head.encode() + body)
        assert wait_for(lambda: server.metric("codegen_active_rows") > 0)
    # 16 rows of 250 tokens on 4 slots take several rounds; all of them are cancelled instead.
    assert wait_for(lambda: server.metric("codegen_active_rows") == 0 and server.metric("codegen_queue_depth") == 0)
    assert server.metric(cancelled) > before
