"""Fill-in-the-middle served: `suffix` and FIM-wrapped prompts on a model with CodeGen2's tokens, and POST
/infill in llama.cpp's dialect, with raw payloads shaped like each client's.

Payload shapes come from the clients' sources: llama.vim (autoload/llama.vim: llama#fim's request with its
response_fields, s:ring_update's n_predict 0 warm-up), llama.vscode (src/llama-server.ts:
createRequestPayload, with and without noPredict), Tabby's `openai/completion` kind and Copilot-style clients on
FauxPilot's engine path (prompt + suffix). Greedy answers are compared with the same server given the token ids
of the layout the test builds itself (Tokenizer.infill_ids), so the layout and the way it is served are checked
apart.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from pathlib import Path

import pytest

from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.serve.infill import context_text
from tests.serve.conftest import Server

PREFIX = "def fib(n):\n    if n < 2:\n"
MIDDLE = "        "
SUFFIX = "\n    return fib(n - 1) + fib(n - 2)\n"
EXTRA = [{"text": "import math\n\nPI = math.pi\n", "time": 1700000000.0, "filename": "consts.py"}]
# llama.vim's llama#fim request (its defaults: n_predict 128, t_max_* in ms), here with 8 tokens to predict.
LLAMA_VIM = {
    "input_prefix": PREFIX,
    "input_suffix": SUFFIX,
    "input_extra": EXTRA,
    "prompt": MIDDLE,
    "n_predict": 8,
    "n_indent": 4,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "response_fields": [
        "content",
        "timings/prompt_n",
        "timings/prompt_ms",
        "timings/prompt_per_token_ms",
        "timings/prompt_per_second",
        "timings/predicted_n",
        "timings/predicted_ms",
        "timings/predicted_per_token_ms",
        "timings/predicted_per_second",
        "truncated",
        "tokens_cached",
    ],
}
# llama.vim's s:ring_update: the extra context alone, read into the cache for the next request.
LLAMA_VIM_WARM_UP = {
    "input_prefix": "",
    "input_suffix": "",
    "input_extra": EXTRA,
    "prompt": "",
    "n_predict": 0,
    "temperature": 0.0,
    "stream": False,
    "samplers": [],
    "cache_prompt": True,
    "t_max_prompt_ms": 1,
    "t_max_predict_ms": 1,
    "response_fields": [""],
}
# llama.vscode's createRequestPayload (noPredict false), its defaultRequestParams spread in.
LLAMA_VSCODE = {
    "input_prefix": PREFIX,
    "input_suffix": SUFFIX,
    "input_extra": EXTRA,
    "prompt": MIDDLE,
    "n_predict": 8,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "n_indent": 4,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 2500,
}


@pytest.fixture(scope="module")
def fim_server(codegen2_export, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-fim") / "server.log"
    s = Server([str(codegen2_export), "--model-name", "cg2", "--max-batch", "2", "--threads", "1"], log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(codegen2_export):
    return load_tokenizer(codegen2_export)


def post(server, path: str, payload: dict) -> dict:
    status, _, body = server.request("POST", path, payload)
    assert status == 200, body
    return json.loads(body)


def greedy_ids(server, ids: list[int], max_tokens: int) -> dict:
    """The server's greedy completion of token ids (no layout of its own)."""
    return post(server, "/v1/completions", {"prompt": ids, "max_tokens": max_tokens, "temperature": 0})


def test_the_model_card_says_it_fills_in_the_middle(fim_server):
    (card,) = json.loads(fim_server.request("GET", "/v1/models")[2])["data"]
    assert card["fill_in_the_middle"] is True and card["suffix"] == "filled in"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/engines/cg2/completions"])
def test_a_suffix_is_filled_in(fim_server, tokenizer, path):
    # Tabby's openai/completion kind and a Copilot-style client on FauxPilot's engine path.
    payload = {"model": "cg2", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0}
    if "engines" in path:
        payload = {**payload, "nwo": "me/repo", "extra": {"language": "python"}, "stop": ["\n\n\n"]}
    body = post(fim_server, path, payload)
    ids = tokenizer.infill(PREFIX, SUFFIX)
    assert body["usage"]["prompt_tokens"] == len(ids)
    expected = post(fim_server, "/v1/completions", {**payload, "prompt": ids, "suffix": None})
    assert body["choices"][0]["text"] == expected["choices"][0]["text"]


def test_a_fim_wrapped_prompt_is_filled_in_with_the_models_own_layout(fim_server, tokenizer):
    # Continue's default template for a model it does not know (StarCoder's), and llama.vscode's OpenAI mode.
    for wrapped in (
        f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
        f"Context:\n\nimport math\n<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
    ):
        body = post(fim_server, "/v1/completions", {"prompt": wrapped, "max_tokens": 6, "temperature": 0})
        before = wrapped[: wrapped.index(PREFIX)].replace("<fim_prefix>", "").replace("<|fim_prefix|>", "")
        ids = tokenizer.infill(before + PREFIX, SUFFIX)
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["choices"][0]["text"] == greedy_ids(fim_server, ids, 6)["choices"][0]["text"]


def test_the_middle_stops_at_eom(fim_server, tokenizer):
    eom = tokenizer.fim.eom
    payload = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "logit_bias": {str(eom): 100}}
    body = post(fim_server, "/v1/completions", payload)
    assert body["choices"][0]["text"] == "" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 1


def test_fim_requests_reuse_the_prefix_cache(fim_server, tokenizer):
    """An editor re-sends the file with one more character typed: only the tail is read again."""
    prefix = PREFIX * 6  # a longer file
    first = post(fim_server, "/v1/completions", {"prompt": prefix, "suffix": SUFFIX, "max_tokens": 2})
    again = post(fim_server, "/v1/completions", {"prompt": prefix + "  ", "suffix": SUFFIX, "max_tokens": 2})
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] > 60 and cached >= len(tokenizer.encode(prefix)) - 1


def test_llama_vim_request_and_its_response_fields(fim_server, tokenizer):
    body = post(fim_server, "/infill", LLAMA_VIM)
    assert sorted(body) == sorted(LLAMA_VIM["response_fields"])  # only those, under their paths
    ids = tokenizer.infill_ids(
        tokenizer.encode(context_text_of(EXTRA)) + tokenizer.encode(PREFIX),
        tokenizer.encode(SUFFIX),
        tokenizer.encode(MIDDLE),
    )
    assert body["truncated"] is False and body["tokens_cached"] == len(ids) + body["timings/predicted_n"]
    assert 1 <= body["timings/predicted_n"] <= 8 and body["timings/prompt_n"] <= len(ids)
    assert body["timings/prompt_ms"] > 0 and body["timings/predicted_per_second"] >= 0
    # Greedy, the content is the server's completion of the layout this test builds.
    greedy = post(fim_server, "/infill", {**LLAMA_VIM, "temperature": 0, "response_fields": None})
    assert greedy["content"] == greedy_ids(fim_server, ids, 8)["choices"][0]["text"]
    assert greedy["stop"] is True and greedy["tokens_evaluated"] == len(ids) and "timings" in greedy


def context_text_of(extra: list[dict]) -> str:
    from codegen_deploy.serve.infill import ExtraFile

    return context_text([ExtraFile(**e) for e in extra])


def test_warm_ups_fill_the_cache_for_the_next_request(fim_server):
    extra = [{"text": "x = 1\n" * 40, "time": 0, "filename": "big.py"}]  # context of its own: not cached yet
    warm = post(fim_server, "/infill", {**LLAMA_VIM_WARM_UP, "input_extra": extra})
    assert warm == {}  # response_fields [""] names nothing
    vscode_warm = {**LLAMA_VSCODE, "input_prefix": "", "input_suffix": "", "prompt": "", "n_predict": 0}
    body = post(fim_server, "/infill", {**vscode_warm, "input_extra": extra, "samplers": [], "t_max_predict_ms": 1})
    assert body["content"] == "" and body["tokens_predicted"] == 0
    # The request that follows reads only what the warm-up did not (a few tokens where the prefix starts).
    body = post(fim_server, "/infill", {**LLAMA_VSCODE, "input_extra": extra})
    assert body["timings"]["prompt_n"] < body["tokens_evaluated"] - 100
    assert isinstance(body["content"], str) and body["truncated"] is False


def test_what_does_not_fit_is_cut_from_the_far_ends(fim_server, tokenizer):
    from types import SimpleNamespace

    from codegen_deploy.serve.infill import InfillRequest, infill_ids
    from codegen_deploy.serve.state import longest_token

    state = SimpleNamespace(tokenizer=tokenizer, fim=tokenizer.fim, max_token_chars=longest_token(tokenizer))
    extra = [{"filename": f"f{i}.py", "text": "y = 2\n" * 60} for i in range(4)]  # more than a context holds
    body = InfillRequest(**{**LLAMA_VSCODE, "input_extra": extra})
    context, prefix = tokenizer.encode(context_text(body.input_extra)), tokenizer.encode(PREFIX)
    suffix, middle = tokenizer.encode(SUFFIX), tokenizer.encode(MIDDLE)
    whole = tokenizer.infill_ids(context + prefix, suffix, middle)
    assert infill_ids(state, body, len(whole)) == (whole, False)
    mask = tokenizer.fim.mask
    for room in (len(whole) - 50, len(prefix) + len(suffix) + 20, 30, 12):
        ids, truncated = infill_ids(state, body, room)
        assert truncated and len(ids) == room
        # The layout of: the end of what comes before the gap, the start of the suffix, the whole typed line.
        before = ids[: ids.index(mask)]
        after = ids[ids.index(mask) + 1 : len(ids) - 3 - len(middle)]
        assert ids == tokenizer.infill_ids(before, after, middle)
        assert before == (context + prefix)[len(context + prefix) - len(before) :] and after == suffix[: len(after)]
        # The suffix gives way only where it and the prefix do not fit together, no further than the prefix
        # needs, and never below a quarter of the room the texts have.
        budget = room - 4 - len(middle)
        if len(after) < len(suffix):
            assert len(prefix) + len(suffix) > budget and len(after) >= max(budget // 4, budget - len(prefix))
    # Served: cut to fit the 256-token context with the 8 tokens asked for.
    served = post(fim_server, "/infill", {**LLAMA_VSCODE, "input_extra": extra, "temperature": 0})
    assert served["truncated"] is True and served["tokens_evaluated"] == 256 - 8


def test_n_predict_minus_one_goes_on_until_the_middle_ends_or_the_context_is_full(fim_server):
    body = post(fim_server, "/infill", {**LLAMA_VSCODE, "n_predict": -1, "temperature": 0})
    # Greedy, this random model's middle never reaches <eom> or <|endoftext|>: it fills the 256-token context.
    assert body["tokens_predicted"] > 100 and body["tokens_cached"] == 256


@pytest.mark.parametrize(
    ("payload", "message", "param"),
    [
        ({**LLAMA_VSCODE, "stream": True}, "stream is not supported", "stream"),
        ({**LLAMA_VSCODE, "n_predict": -2}, "n_predict", "n_predict"),
        ({**LLAMA_VSCODE, "prompt": "x = '\ud800'"}, "lone surrogate", "prompt"),
        ({**LLAMA_VSCODE, "input_suffix": "\udfff"}, "lone surrogate", "input_suffix"),
        ({**LLAMA_VSCODE, "temperature": 5}, "temperature", "temperature"),
        ({**LLAMA_VSCODE, "stop": [""]}, "stop sequence is empty", "stop"),
        ({**LLAMA_VSCODE, "prompt": "    x = 1 + 2" * 400}, "typed line (prompt)", "prompt"),  # fits in characters
    ],
)
def test_bad_infill_requests_are_400s_naming_the_field(fim_server, payload, message, param):
    status, _, body = fim_server.request("POST", "/infill", payload)
    error = json.loads(body)["error"]
    assert status == 400 and message in error["message"] and error["param"] == param, error


def test_an_over_long_typed_line_is_refused_before_tokenizing(fim_server):
    start = time.monotonic()
    status, _, body = fim_server.request("POST", "/infill", {**LLAMA_VSCODE, "prompt": "z" * 1_000_000})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "prompt" and "1,000,000 characters" in error["message"], error
    assert time.monotonic() - start < 5  # never tokenized (its million tokens, one a character here, would be)


def test_the_answer_is_compact_json_as_llama_vim_reads_it(fim_server):
    """llama.vim takes a response as an answer only if its raw text has `"content":"` (no space after the colon):
    the bytes, not only the parsed body."""
    for payload in (LLAMA_VIM, {**LLAMA_VIM, "response_fields": None}, LLAMA_VSCODE):
        status, _, raw = fim_server.request("POST", "/infill", {**payload, "temperature": 0})
        assert status == 200 and raw.lstrip().startswith("{") and '"content":"' in raw, raw[:200]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# Texts that repeat a unit: cut anywhere far from their kept end (or start), they give the same tokens there.
EXTRA_UNIT = "def helper_{0}(items):\n    return [item * 2 for item in items]\n\n"
PREFIX_UNIT = "class Node:\n    def __init__(self, value):\n        self.value = value\n\n"
SUFFIX_UNIT = "\n    def walk(self):\n        yield self.value\n"


def big_infill(repeat: int) -> dict:
    extra = "".join(EXTRA_UNIT.format(i % 10) for i in range(repeat))
    return {
        **LLAMA_VSCODE,
        "input_extra": [{"filename": "helpers.py", "text": extra}],
        "input_prefix": PREFIX_UNIT * repeat,
        "input_suffix": SUFFIX_UNIT * repeat,
        "temperature": 0,
    }


def test_a_large_infill_body_stops_nobody_and_is_cut_right(fim_server):
    """A body of 3.6 MB (under the 4 MB default limit, no key needed on loopback) while another client streams:
    its texts are cut in characters before tokenizing, off the event loop, so /health and the stream go on
    answering, the server grows by little, and the answer is that of the same texts cut short by the client."""
    big = big_infill(20_000)
    size = len(json.dumps(big).encode())
    assert 3.4 * 2**20 < size < 4 * 2**20, size
    small = big_infill(200)  # thousands of tokens of each text: still far more than the 256-token context
    expected = post(fim_server, "/infill", small)
    assert expected["truncated"] is True
    pid = fim_server.process.pid
    rss_before = rss_mb(pid)

    stream_times: list[float] = []

    def stream() -> None:
        payload = {"prompt": "x", "max_tokens": 200, "temperature": 0, "stream": True}
        data = json.dumps(payload).encode()
        conn = http.client.HTTPConnection("127.0.0.1", fim_server.port, timeout=120)
        conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        while response.read1(65536):
            stream_times.append(time.monotonic())
        conn.close()

    answers: list[dict] = []
    streaming = threading.Thread(target=stream)
    streaming.start()
    while not stream_times and streaming.is_alive():
        time.sleep(0.01)
    sending = threading.Thread(target=lambda: answers.append(post(fim_server, "/infill", big)))
    sending.start()
    health: list[float] = []
    while sending.is_alive():
        start = time.monotonic()
        assert fim_server.request("GET", "/health", timeout=30)[0] == 200
        health.append(time.monotonic() - start)
        time.sleep(0.05)
    sending.join()
    streaming.join()
    (answer,) = answers
    assert answer["truncated"] is True and answer["content"] == expected["content"]
    assert answer["tokens_evaluated"] == expected["tokens_evaluated"] == 256 - 8
    # Generous bounds for a busy 2-core machine: tokenizing the whole body here held the event loop for seconds
    # and grew the server by hundreds of MB.
    assert max(health) < 1.5, health
    gaps = [b - a for a, b in itertools.pairwise(stream_times)]
    assert max(gaps) < 1.5, max(gaps)
    assert rss_mb(pid) - rss_before < 150, (rss_before, rss_mb(pid))


def test_a_suffix_is_blamed_for_its_own_length(fim_server):
    # Refused in characters, before tokenizing...
    status, _, body = fim_server.request("POST", "/v1/completions", {"prompt": "x", "suffix": "y" * 100_000})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "suffix" and "a suffix of 100,000 characters" in error["message"]
    # ... and in tokens, after.
    payload = {"prompt": "def f():\n", "suffix": "    return g(1, 2)\n" * 60, "max_tokens": 4}
    status, _, body = fim_server.request("POST", "/v1/completions", payload)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "suffix" and "in your suffix" in error["message"], error


def test_echo_returns_the_prompt_not_the_fim_layout(fim_server):
    payload = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4, "temperature": 0}
    plain = post(fim_server, "/v1/completions", payload)["choices"][0]["text"]
    echoed = post(fim_server, "/v1/completions", {**payload, "echo": True})["choices"][0]["text"]
    assert echoed == PREFIX + plain


def test_codegen1_continues_the_text_before_the_cursor(server, fp32_export):
    """A model without fill-in-the-middle tokens: the context, prefix and typed line, continued (the suffix
    ignored), the same as that text sent to /v1/completions."""
    payload = {**LLAMA_VSCODE, "input_extra": [], "temperature": 0}
    body = post(server, "/infill", payload)
    expected = post(server, "/v1/completions", {"prompt": PREFIX + MIDDLE, "max_tokens": 8, "temperature": 0})
    assert body["content"] == expected["choices"][0]["text"]


def test_codegen1_with_suffix_error_answers_501(fp32_export, tmp_path_factory, start_server):
    log = tmp_path_factory.mktemp("serve-501") / "server.log"
    s = start_server([str(fp32_export), "--suffix", "error", "--max-batch", "1", "--threads", "1"], log)
    try:
        status, _, body = s.request("POST", "/infill", LLAMA_VIM)
        assert status == 501 and "Infill is not supported by this model" in json.loads(body)["error"]["message"]
    finally:
        s.stop()


def test_t_max_predict_ms_ends_the_answer_after_a_new_line(fim_server, tokenizer):
    """llama.cpp's time limit, which llama.vim and llama.vscode send: past it, the answer ends once it holds a new
    line. Greedy, this random model writes a new line early after one of these typed lines."""
    base = {**LLAMA_VSCODE, "input_extra": [], "temperature": 0, "n_predict": 64, "t_max_predict_ms": 0}
    for middle in ("", "    ", "    x", "    return", "        if", "  # "):
        full = post(fim_server, "/infill", {**base, "prompt": middle})
        if "\n" in full["content"][:-1]:
            break
    else:
        pytest.fail("no greedy answer with a new line before its end: choose other typed lines")
    cut = post(fim_server, "/infill", {**base, "prompt": middle, "t_max_predict_ms": 1})
    assert "\n" in cut["content"] and full["content"].startswith(cut["content"])
    assert cut["tokens_predicted"] < full["tokens_predicted"]
