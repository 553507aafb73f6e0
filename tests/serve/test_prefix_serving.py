"""Prefix reuse in codegen-serve, end to end: an editor's growing file reuses the cache (usage reports
cached_tokens, /metrics counts hits and misses), and every answer equals the one a server without reuse or
chunks gives, for greedy, n > 1 and seeded sampled requests, streamed or not."""

from __future__ import annotations

import json

import openai
import pytest

from tests.serve.conftest import Server

FILE = "def fibonacci(n):\n    if n < 2:\n        return n\n"
TYPED = [FILE, FILE + "    ret", FILE + "    return fib", FILE + "    return fibonacci(n - 1)\n", "# x\n" + FILE]


@pytest.fixture(scope="module")
def plain_server(fp32_export, tmp_path_factory):
    """A server with neither prefix reuse nor chunked prompts: every prompt computed whole, from nothing."""
    log = tmp_path_factory.mktemp("serve-no-cache") / "server.log"
    argv = [str(fp32_export), "--model-name", "tiny", "--threads", "1", "--cache-memory", "0", "--prefill-chunk", "0"]
    s = Server(argv, log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cache_server(fp32_export, tmp_path_factory):
    """Prefix reuse and chunks on (the defaults), with a chunk small enough to split these prompts."""
    log = tmp_path_factory.mktemp("serve-cache") / "server.log"
    argv = [str(fp32_export), "--model-name", "tiny", "--threads", "1", "--max-batch", "2", "--prefill-chunk", "8"]
    argv += ["--cache-memory", "256MiB"]
    s = Server(argv, log)
    yield s
    s.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _texts(response) -> list[str]:
    return [c.text for c in response.choices]


def test_typing_reuses_the_cache_and_changes_no_answer(cache_server, plain_server):
    cached, plain = _client(cache_server), _client(plain_server)
    hits_before = cache_server.metric('codegen_prompt_cache_tokens_total{result="hit"}')
    reused = []
    for prompt in TYPED:
        kw = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        r = cached.completions.create(**kw)
        assert _texts(r) == _texts(plain.completions.create(**kw))
        details = r.usage.prompt_tokens_details
        assert 0 <= details.cached_tokens < r.usage.prompt_tokens
        reused.append(details.cached_tokens)
    assert reused[1] > 0 and reused[2] > reused[1] - 4 and reused[3] > 0  # each keystroke reuses the file
    assert reused[4] == 0  # a line added at the top shares no prefix
    hits = cache_server.metric('codegen_prompt_cache_tokens_total{result="hit"}') - hits_before
    assert hits == sum(reused)
    assert cache_server.metric("codegen_prompt_cache_entries") >= 1
    assert cache_server.metric("codegen_prompt_cache_held_tokens") >= len(TYPED[-1]) // 8  # tokens, not characters
    assert cache_server.metric("codegen_prompt_cache_bytes") > 0
    assert cache_server.metric('codegen_prompt_cache_lookups_total{result="hit"}') >= 3
    assert cache_server.metric('codegen_prompt_cache_lookups_total{result="miss"}') >= 1
    assert cache_server.metric("codegen_prompt_cache_evictions_total") == 0
    plain_usage = plain.completions.create(model="tiny", prompt=FILE, max_tokens=2, temperature=0).usage
    assert plain_usage.prompt_tokens_details.cached_tokens == 0  # reuse off: never a hit


@pytest.mark.parametrize(
    "kw",
    [
        {"n": 3, "temperature": 0},
        {"n": 2, "temperature": 0.9, "top_p": 0.95, "seed": 11},
        {"temperature": 1.0, "seed": 5, "logprobs": 2},
    ],
    ids=["greedy-n3", "sampled-n2-seed", "sampled-logprobs"],
)
def test_reuse_never_changes_n_and_seeded_rows(cache_server, plain_server, kw):
    cached, plain = _client(cache_server), _client(plain_server)
    for prompt in TYPED[:3]:
        args = {"model": "tiny", "prompt": prompt, "max_tokens": 8, **kw}
        got, expected = cached.completions.create(**args), plain.completions.create(**args)
        assert _texts(got) == _texts(expected)
        if "logprobs" in kw:
            for a, b in zip(got.choices, expected.choices, strict=True):
                assert a.logprobs.tokens == b.logprobs.tokens
                assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-4)


def test_streamed_usage_reports_cached_tokens(cache_server):
    client = _client(cache_server)
    client.completions.create(model="tiny", prompt=FILE, max_tokens=4, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=FILE + "    return n",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens > 0
    status, _, body = cache_server.request("POST", "/v1/completions", {"prompt": FILE, "max_tokens": 2})
    assert status == 200 and json.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_cancelled_request_leaves_its_prompt_for_the_next(cache_server):
    """An editor cancels the request it sent a moment ago (closes the stream at its first token) and sends the
    file again with a few more characters: the cancelled row's cache serves the new one."""
    import http.client

    prompt = "import numpy as np\n\n\ndef mean(values):\n    return sum(values) / len(values)\n"
    connection = http.client.HTTPConnection("127.0.0.1", cache_server.port, timeout=60)
    body = json.dumps({"prompt": prompt, "max_tokens": 60, "stream": True})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    while not response.readline().startswith(b"data: "):  # the first token, then close
        pass
    connection.close()
    r = _client(cache_server).completions.create(model="tiny", prompt=prompt + "\n\ndef", max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(prompt) // 4
