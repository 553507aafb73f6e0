"""A real codegen-serve in a subprocess on 127.0.0.1 (a free port) over the tiny fused export."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A codegen-serve process; `url` is its base (http://127.0.0.1:PORT), `base_url` the /v1 root."""

    def __init__(self, argv: list[str], log: Path, timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with open(log, "wb") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "codegen_deploy.cli.serve",
                    *argv,
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"codegen-serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if self.request("GET", "/health", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"codegen-serve did not answer /health in {timeout} s:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30.0):
        """(status, headers, body text) of a raw request; `body` is sent as JSON (bytes as they are)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    def metric(self, name: str, headers: dict | None = None) -> float:
        """The value of one sample line of /metrics (name with labels, as printed); 0 when absent."""
        for line in self.request("GET", "/metrics", headers=headers)[2].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def server(fp32_export, tmp_path_factory):
    """The main test server: model name `tiny`, 4 row slots, one thread."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server([str(fp32_export), "--model-name", "tiny", "--max-batch", "4", "--threads", "1"], log)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def small_server(fp32_export, tmp_path_factory):
    """A server with an API key, one row slot and a queue of one: for 401 and 429."""
    log = tmp_path_factory.mktemp("serve-small") / "server.log"
    argv = [str(fp32_export), "--api-key", "sekret", "--max-batch", "1", "--max-queue", "1", "--threads", "1"]
    s = Server(argv, log)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def async_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def start_server():
    """Server(argv, log, timeout): start another codegen-serve (the test stops it)."""
    return Server


@pytest.fixture(params=["torch", "onnxruntime-fused"])
def slot_session(request, fp32_export, tiny_checkpoint):
    """A session with row slots over the tiny checkpoint: torch, and the export's fused ONNX Runtime graph."""
    from codegen_deploy.runtime import open_session

    if request.param == "torch":
        s = open_session("torch", tiny_checkpoint, threads=1)
    else:
        s = open_session("onnxruntime", fp32_export, threads=1)
    with s:
        yield s
