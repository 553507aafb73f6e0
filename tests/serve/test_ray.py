"""codegen-serve --ray: the same app as Ray Serve replicas (slow: starts a local Ray)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["def add(a, b):\n", "import sys\n", "class Point:\n", "x = 1\n"]
# Three editors' files: each longer than one block of the router (64 characters), within the tiny model's context.
EDITOR_FILES = [f"# editor {i}\n" + "".join(f"v{i}_{n} = {n}\n" for n in range(8)) for i in range(3)]


def test_importing_serve_ray_leaves_ray_unimported():
    # Ray reads its environment (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, the loopback switch) when first imported, so
    # serve/ray.py (and serve/routing.py, which imports Ray, through it) must not import it before serve_with_ray.
    code = "import sys, codegen_deploy.serve.ray; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_model_replicas_are_routed_by_prefix_and_keep_autoscaling(fp32_export):
    from codegen_deploy.serve.ray import build_deployment
    from codegen_deploy.serve.settings import ServeSettings

    app = build_deployment(ServeSettings(str(fp32_export), max_batch=6), replicas=1, max_replicas=3)
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert (ingress.name, ingress.num_replicas, ingress.ray_actor_options["num_cpus"]) == ("codegen-ingress", 1, 0)
    assert ingress.max_ongoing_requests == 3 * (6 + 64)  # all the model replicas' room: none waits there
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 6)
    router = model._deployment_config.request_router_config
    assert router.request_router_class == "codegen_deploy.serve.routing.PrefixAffinityRouter"
    assert router.request_router_kwargs["imbalance_threshold"] == 3  # half a batch
    plain = build_deployment(ServeSettings(str(fp32_export)), replicas=2, router="ray")  # Ray Serve's own router
    router = plain._bound_deployment.init_args[0]._bound_deployment._deployment_config.request_router_config
    assert "PrefixAffinityRouter" not in router.request_router_class


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
        # Prefix affinity: each editor's keystrokes (its file re-sent, a little longer each time) land on one
        # replica, the one that holds the file's start. Ray's default router would split them over both.
        served = {}
        for keystroke in range(4):
            for editor, text in enumerate(EDITOR_FILES):
                prompt = text + "x" * keystroke
                status, headers, _ = ray_server.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
                assert status == 200
                served.setdefault(editor, []).append(int(_header(headers, "x-codegen-replica")))
        assert all(len(set(seen)) == 1 for seen in served.values()), served
        assert {p for seen in served.values() for p in seen} <= pids  # the replicas that answer /health
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


def _header(headers: dict, name: str) -> str:
    return next(v for k, v in headers.items() if k.lower() == name)


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket for IPv4 loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
