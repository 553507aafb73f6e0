"""codegen-serve under load, on loopback: tokens/s and time to first token at several concurrencies.

For each export: start `codegen-serve` in a subprocess, read its idle RSS (against the weights' size),
run the same greedy streamed requests one after another (concurrency 1) and at each concurrency, then
a load test (many requests at the highest concurrency) whose every output must equal the one-at-a-time
output of the same prompt (nothing lost or truncated).

    python benchmarks/serve_load.py EXPORT [EXPORT ...] [--concurrency 1,4,8,16] [--max-tokens 32]
        [--requests 16] [--load-requests 200] [--threads 2] [--json out.json]

Timings depend on the machine and its load: the script prints `uptime` with its table. A random checkpoint
made by codegen-make-checkpoint carries a small trained tokenizer, under which most of the 51200 ids decode
to nothing (so nothing streams until the end); the server is given the real CodeGen tokenizer instead.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def humaneval_prompts(count: int, max_chars: int = 400) -> list[str]:
    """Prompts from ../shared/data/HumanEval.jsonl.gz (cut to max_chars), else simple code openings."""
    path = Path(os.environ.get("CODEGEN_DEPLOY_SHARED_DATA", REPO.parent / "shared" / "data")) / "HumanEval.jsonl.gz"
    if path.is_file():
        with gzip.open(path, "rt") as f:
            prompts = [json.loads(line)["prompt"][-max_chars:] for line in f]
    else:
        prompts = [f"def function_{i}(x):\n    " for i in range(count)]
    return prompts[:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def weights_bytes(folder: Path) -> int:
    """Bytes of the fused graph's weights (what the server loads): its own files, and the plain graph's when
    the fused graph reads its float weights from there (its own data file is then a small fraction)."""
    fused = sum(p.stat().st_size for p in folder.glob("decoder_fused.onnx*"))
    plain = sum(p.stat().st_size for p in folder.glob("decoder.onnx*"))
    return fused + plain if fused < plain / 20 else fused


def start_server(
    export: Path,
    port: int,
    max_batch: int,
    threads: int | None,
    tokenizer: Path | None,
    extra: tuple[str, ...] = (),
    repo: Path = REPO,
) -> subprocess.Popen:
    """codegen-serve on 127.0.0.1:`port` (extra: more of its options), once it answers /health; `repo`: the
    checkout whose code it runs (another one: a baseline)."""
    argv = [
        sys.executable,
        "-m",
        "codegen_deploy.cli.serve",
        str(export),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-queue",
        "256",
        "--log-level",
        "warning",
    ]
    if threads:
        argv += ["--threads", str(threads)]
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer)]
    argv += list(extra)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"codegen-serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("codegen-serve did not start in 300 s")


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    """A greedy streamed request: its text, tokens, time to first text, total time."""
    start = time.perf_counter()
    first = None
    text, tokens, finish = "", 0, None
    stream = await client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices:
            if first is None:
                first = time.perf_counter() - start
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"text": text, "tokens": tokens, "ttft": first, "total": time.perf_counter() - start, "finish": finish}


async def run_level(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """All prompts through `concurrency` workers; generated tokens/s over the wall time, TTFT percentiles."""
    import numpy as np
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    queue = list(enumerate(prompts))
    results: list[dict | None] = [None] * len(prompts)

    async def worker():
        while queue:
            i, p = queue.pop(0)
            results[i] = await one_request(client, p, max_tokens)

    start = time.perf_counter()
    async with client:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = np.array([r["ttft"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
        "results": results,
    }


def bench_export(export: Path, args) -> dict:
    port = free_port()
    proc = start_server(export, port, args.max_batch, args.threads, args.tokenizer)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        time.sleep(2)
        idle_rss = rss_bytes(proc.pid)
        prompts = humaneval_prompts(args.requests, args.prompt_chars)
        levels = []
        baseline = None
        for c in args.concurrency:
            level = asyncio.run(run_level(base_url, prompts, c, args.max_tokens))
            if c == 1:
                baseline = level
            levels.append(level)
            print(
                f"  {export.name} c={c}: {level['tokens_per_s']:.1f} tok/s, TTFT p50 {level['ttft_p50_s']:.2f} s "
                f"p95 {level['ttft_p95_s']:.2f} s",
                file=sys.stderr,
            )
        load = None
        if args.load_requests:
            load_prompts = [prompts[i % len(prompts)] for i in range(args.load_requests)]
            load = asyncio.run(run_level(base_url, load_prompts, max(args.concurrency), args.max_tokens))
            reference = baseline["results"] if baseline else None
            lost = sum(r is None or r["finish"] is None for r in load["results"])
            differ = sum(
                reference is not None and r["text"] != reference[i % len(prompts)]["text"]
                for i, r in enumerate(load["results"])
            )
            load.update(lost=lost, differ_from_alone=differ)
            print(f"  {export.name} load: {args.load_requests} requests, {lost} lost, {differ} differ", file=sys.stderr)
        peak_rss = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for level in levels + ([load] if load else []):
        level.pop("results")
    single = baseline["tokens_per_s"] if baseline else None
    for level in levels:
        level["speedup_vs_one_at_a_time"] = level["tokens_per_s"] / single if single else None
    weights = weights_bytes(export)
    return {
        "export": str(export),
        "weights_bytes": weights,
        "idle_rss_bytes": idle_rss,
        "idle_rss_over_weights": idle_rss / weights,
        "rss_after_load_bytes": peak_rss,
        "levels": levels,
        "load_test": load,
    }


def format_table(runs: list[dict]) -> str:
    lines = [
        "| export | concurrency | requests | tokens/s | x one-at-a-time | TTFT p50 (s) | TTFT p95 (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        name = Path(run["export"]).name
        for lv in run["levels"]:
            lines.append(
                f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['tokens_per_s']:.1f} | "
                f"{lv['speedup_vs_one_at_a_time']:.2f} | {lv['ttft_p50_s']:.2f} | {lv['ttft_p95_s']:.2f} |"
            )
    lines.append("")
    for run in runs:
        name = Path(run["export"]).name
        load = run["load_test"]
        lines.append(
            f"- {name}: weights {run['weights_bytes'] / 1e9:.2f} GB, idle RSS "
            f"{run['idle_rss_bytes'] / 1e9:.2f} GB ({run['idle_rss_over_weights']:.2f}x weights), "
            f"RSS after the load {run['rss_after_load_bytes'] / 1e9:.2f} GB"
        )
        if load:
            lines.append(
                f"  load test: {load['requests']} requests at concurrency {load['concurrency']}: "
                f"{load['lost']} lost, {load['differ_from_alone']} differ from one-at-a-time, "
                f"{load['tokens_per_s']:.1f} tokens/s, TTFT p50 {load['ttft_p50_s']:.2f} s "
                f"p95 {load['ttft_p95_s']:.2f} s"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="+", type=Path, help="export folders (with the fused graph)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated; 1 is the one-at-a-time baseline")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default: 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")
    p.add_argument(
        "--prompt-chars",
        type=int,
        default=400,
        help="keep the last this many characters of each HumanEval prompt (default: 400)",
    )
    p.add_argument("--load-requests", type=int, default=200, help="the load test's requests (0: skip)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default: 16)")
    p.add_argument("--threads", type=int, help="the server's --threads (default: ONNX Runtime's)")
    p.add_argument("--json", type=Path, help="also write the results here")
    real = REPO.parent / "shared" / "data" / "codegen-350M-mono-tokenizer"
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=real if real.is_dir() else None,
        help="tokenizer folder for the server (default: the real CodeGen tokenizer in ../shared/data, "
        "so a random checkpoint's tokens decode to text and stream; else the export's own)",
    )
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    runs = [bench_export(e, args) for e in args.exports]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(format_table(runs))
    print(f"\nuptime: {load}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "uptime": load}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
