"""codegen-serve --ray: the same app as Ray Serve replicas (slow: starts a local Ray)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import time

import openai
import psutil
import pytest

pytest.importorskip("ray")

PROMPTS = ["def add(a, b):\n", "import sys\n", "class Point:\n", "x = 1\n"]


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_like_one_server(server, start_server, fp32_export, tmp_path):
    expected = []
    for p in PROMPTS:
        _, _, body = server.request("POST", "/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0})
        expected.append(json.loads(body)["choices"][0]["text"])
    argv = [str(fp32_export), "--ray", "--replicas", "2", "--replica-cpus", "0.5", "--threads", "1"]
    ray_server = start_server(argv, tmp_path / "ray.log", timeout=240)
    try:
        pids, deadline = set(), time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:  # the second replica may still be starting
            pids.add(json.loads(ray_server.request("GET", "/health")[2])["pid"])
            time.sleep(0.05)
        assert len(pids) == 2, "both replicas answer /health"

        async def all_prompts():
            client = openai.AsyncOpenAI(base_url=ray_server.base_url, api_key="x", max_retries=0, timeout=60)
            async with client:
                jobs = [client.completions.create(model="m", prompt=p, max_tokens=8, temperature=0) for p in PROMPTS]
                streamed = await client.completions.create(
                    model="m", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True
                )
                text = "".join([c.choices[0].text async for c in streamed])
                return [r.choices[0].text for r in await asyncio.gather(*jobs)], text

        texts, streamed_text = asyncio.run(all_prompts())
        assert texts == expected and streamed_text == expected[0]
        status, _, body = ray_server.request("POST", "/v1/completions", {"prompt": "x", "temperature": 9})
        assert status == 400 and "temperature" in json.loads(body)["error"]["message"]
        # The local Ray's own services (GCS, raylet, workers, agents) listen on this machine only, and say so.
        tree = [psutil.Process(ray_server.process.pid), *psutil.Process(ray_server.process.pid).children(True)]
        listening = set()
        for p in tree:
            try:
                connections = p.net_connections("inet")
            except psutil.NoSuchProcess:
                continue
            listening |= {(c.laddr.ip, c.laddr.port, p.name()) for c in connections if c.status == psutil.CONN_LISTEN}
        assert any(port == ray_server.port for _, port, _ in listening) and len(listening) > 2, sorted(listening)
        assert all(_loopback(ip) for ip, _, _ in listening), [a for a in sorted(listening) if not _loopback(a[0])]
        assert "listen on 127.0.0.1 only" in ray_server.log.read_text()
        # SIGTERM: Serve and Ray shut down, exit 143 without an error line.
        ray_server.process.send_signal(signal.SIGTERM)
        assert ray_server.process.wait(timeout=120) == 143
        assert "error:" not in ray_server.log.read_text()
    finally:
        if ray_server.alive():
            ray_server.stop()


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket for IPv4 loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
