"""codegen-serve --ray: the same app as Ray Serve replicas (slow: starts a local Ray)."""

from __future__ import annotations

import asyncio
import json
import time

import openai
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
    finally:
        ray_server.stop()
