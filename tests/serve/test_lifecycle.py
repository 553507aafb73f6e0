"""codegen-serve's start and stop: a busy port, --port 0, the API key's sources, the chat template file, serving
beyond this machine, and a stop (SIGTERM, Ctrl-C) that drains the requests in flight and exits 143 / 130 without
an error line."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from codegen_deploy.cli.serve import API_KEY_ENV, api_key, parse_args
from codegen_deploy.errors import InputError
from tests.serve.conftest import REPO, free_port


def serve_cli(*argv: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "codegen_deploy.cli.serve", *argv],
        capture_output=True,
        text=True,
        env={**environ, **(env or {})},
        timeout=timeout,
    )


def test_a_busy_port_is_one_line_and_exit_2_before_loading(fp32_export):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve_cli(str(fp32_export), "--port", str(port))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # said before the model is loaded: nothing else printed
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in line


def test_port_0_binds_a_free_port_and_prints_it_before_loading(fp32_export, tmp_path):
    """--port 0 asks the system for a free port; the first line says which, before the model is loaded, and the
    server answers there."""
    environ = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "codegen_deploy.cli.serve", str(fp32_export), "--port", "0", "--threads", "1"]
    log = tmp_path / "log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environ)
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"listening on http://127\.0\.0\.1:(\d+)\n", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = int(match[1])
        assert port != 0 and log.read_text().splitlines()[0].startswith("codegen-serve: loading")
        while True:  # connections made while the model loads wait for it
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/health")
                assert conn.getresponse().status == 200
                conn.close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert f"serving on http://127.0.0.1:{port}/v1" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_chat_template_file_is_served(fp32_export, tmp_path, start_server):
    """--chat-template FILE: /v1/chat/completions writes the messages with it (here a docstring to fill in)."""
    import openai

    path = tmp_path / "template.json"
    path.write_text('{"user": "def f():\\n    \\"\\"\\"{content}\\"\\"\\"\\n", "stop": ["\\ndef "]}')
    server = start_server([str(fp32_export), "--chat-template", str(path), "--threads", "1"], tmp_path / "log")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=30)
        user = "Add two numbers."
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": user}], max_tokens=10, temperature=0
        )
        # The same prompt through /v1/completions, with the template's stop.
        plain = client.completions.create(
            model="m", prompt=f'def f():\n    """{user}"""\n', max_tokens=10, temperature=0, stop=["\ndef "]
        )
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (
            plain.choices[0].text,
            plain.choices[0].finish_reason,
        )
    finally:
        server.stop()


def test_a_bad_chat_template_is_one_line_and_exit_2_before_loading(tmp_path):
    path = tmp_path / "template.json"
    path.write_text('{"usr": "{content}"}')
    result = serve_cli(str(tmp_path), "--chat-template", str(path), "--port", "0")  # tmp_path: not a model
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --chat-template {path} has an unknown key 'usr'"), line


def test_serving_beyond_this_machine_without_a_key_warns(tmp_path):
    not_a_model = str(tmp_path)  # fails after the warning, before anything slow
    result = serve_cli(not_a_model, "--host", "0.0.0.0", "--port", str(free_port()))
    first, *_, last = result.stderr.strip().splitlines()
    assert first.startswith("warning: serving on 0.0.0.0") and API_KEY_ENV in first
    assert result.returncode == 2 and last.startswith("error:")
    keyed = serve_cli(not_a_model, "--host", "0.0.0.0", "--port", str(free_port()), env={API_KEY_ENV: "k"})
    local = serve_cli(not_a_model, "--port", str(free_port()))
    assert "warning" not in keyed.stderr and "warning" not in local.stderr
    assert keyed.returncode == local.returncode == 2


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key(parse_args(["x"])) is None
    monkeypatch.setenv(API_KEY_ENV, " from-env\n")
    assert api_key(parse_args(["x"])) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert api_key(parse_args(["x", "--api-key-file", str(key_file)])) == "from-file"  # before the environment
    assert api_key(parse_args(["x", "--api-key", "from-cli"])) == "from-cli"
    (tmp_path / "empty").write_text("\n")
    bad = [
        ["--api-key-file", str(tmp_path / "missing")],
        ["--api-key-file", str(tmp_path / "empty")],
        ["--api-key", "a", "--api-key-file", str(key_file)],
        ["--api-key", "two words"],
    ]
    for argv in bad:
        with pytest.raises(InputError):
            api_key(parse_args(["x", *argv]))


class Stream:
    """A streamed completion read in a thread: its SSE events, and whether the connection was cut."""

    def __init__(self, port: int, body: dict):
        self.events: list[str] = []
        self.cut = False
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(port, body), daemon=True)
        self.thread.start()

    def _read(self, port: int, body: dict) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response, text = conn.getresponse(), b""
        try:
            while chunk := response.read1(65536):
                text += chunk
                self.first.set()
        except (http.client.IncompleteRead, ConnectionError):
            self.cut = True
        finally:
            conn.close()
            self.first.set()
        self.events = [e[len("data: ") :] for e in text.decode().split("\n\n") if e.startswith("data: ")]


def test_sigterm_drains_then_ends_streams_with_an_error_and_exits_143_quietly(fp32_export, tmp_path, start_server):
    argv = [str(fp32_export), "--max-batch", "1", "--max-queue", "300", "--threads", "1", "--shutdown-grace", "2"]
    server = start_server(argv, tmp_path / "log")
    short = Stream(server.port, {"prompt": "x", "n": 4, "max_tokens": 100, "temperature": 0, "stream": True})
    assert short.first.wait(30)
    # 240 rows of 126 tokens, one at a time: some 30,000 steps, far beyond the grace period.
    long = Stream(server.port, {"prompt": list("abcd"), "n": 60, "max_tokens": 126, "stream": True})
    deadline = time.monotonic() + 30
    while server.metric("codegen_queue_depth") + server.metric("codegen_active_rows") < 240:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):  # no new connections while draining
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    short.thread.join(30)
    long.thread.join(30)
    code = server.process.wait(timeout=30)
    took = time.monotonic() - stopped
    log = server.log.read_text()
    assert code == 143, log
    # The request in flight finished within the grace period, whole.
    assert not short.cut and short.events[-1] == "[DONE]", short.events
    assert sum(json.loads(e)["choices"][0]["finish_reason"] is not None for e in short.events[:-1]) == 4
    # The one still running at its end got an error event, then the stream closed (no [DONE]).
    assert not long.cut and "[DONE]" not in long.events, long.events[-3:]
    error = json.loads(long.events[-1])["error"]
    assert "shutting down" in error["message"] and error["code"] == "server_shutting_down"
    assert took < 2 + 3 + 5, took  # the grace, uvicorn's margin, slack for a busy machine
    assert "error:" not in log and "Traceback" not in log and "Cancel" not in log, log


def test_ctrl_c_exits_130_quietly(fp32_export, tmp_path, start_server):
    server = start_server([str(fp32_export), "--threads", "1"], tmp_path / "log")
    assert server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 130
    log = server.log.read_text()
    assert "error:" not in log and "Traceback" not in log, log
