"""codegen-serve for a team: many editors typing at once, each in its own file, on one server or on Ray Serve
replicas, and llama.vim-shaped /infill requests whose ring of extra chunks rotates.

Servers of the same export, started side by side and driven in turn (round-robin over --rounds):

  team   for N in --editors (default 1, 4, 16): N editors at once, each first sending its own ~--file-tokens
         file (cold), then --requests requests each growing it by --typed characters, one every --pause
         seconds (a burst of keystrokes), each streamed and cancelled at its first token. Per setup: the share
         of the warm requests' prompt tokens answered from cache (the server's /metrics), warm TTFT p50/p95,
         and the server's RSS (with its children: Ray's replicas). Setups: `cache` (the defaults: the prompt
         cache sized by memory), `slots` (--cache-memory 1: only the row slots keep prompts, as before the
         prompt cache), `off` (--cache-memory 0), and `ray` (--ray --replicas 2, prefix-affinity routing)
         and `ray-default` (--ray-router ray: Ray Serve's own router).
  ring   one editor's /infill requests as llama.vim sends them: a ring of --ring-chunks extra chunks, then the
         file; the ring rotates (the oldest chunk out, a new one in) between requests. TTFT after a rotation,
         against the cold first request, with the defaults and with --cache-reuse 64.

    python benchmarks/team_trace.py EXPORT [--rounds 2] [--editors 1 4 16] [--setups cache ray]

Prints tables, writes JSON and a PNG plot (matplotlib). The text is this repository's own Python source; the
servers get the real CodeGen tokenizer from ../shared/data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from editor_trace import BIAS, bench_tokenizer, cut_to_tokens, first_token, server_metrics, source_text
from serve_load import REPO, free_port, start_server

SETUPS = {
    "cache": (),
    "slots": ("--cache-memory", "1"),
    "off": ("--cache-memory", "0"),
}
RAY_SETUPS = {
    "ray": ("--ray", "--replicas", "2", "--replica-cpus", "0.5"),
    "ray-default": ("--ray", "--replicas", "2", "--replica-cpus", "0.5", "--ray-router", "ray"),
}
RING_SETUPS = {"ring-default": (), "ring-reuse": ("--cache-reuse", "64")}


def cache_tokens(url: str, replicas: int = 1, tries: int = 60) -> tuple[float, float]:
    """(hit, miss) prompt tokens so far, summed over the replicas: each keeps its own counters, and under Ray
    /metrics is answered by whichever replica a request lands on, so it is asked until each has answered."""
    seen: dict[str, dict[str, float]] = {}
    for _ in range(tries):
        replica, samples = server_metrics(url)
        seen[replica] = samples
        if len(seen) >= replicas:
            break
    else:
        raise RuntimeError(f"{url}/metrics: {len(seen)} of {replicas} replicas answered in {tries} tries")
    hit = sum(m.get('codegen_prompt_cache_tokens_total{result="hit"}', 0.0) for m in seen.values())
    miss = sum(m.get('codegen_prompt_cache_tokens_total{result="miss"}', 0.0) for m in seen.values())
    return hit, miss


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its children (Ray's replicas are its children)."""
    import psutil

    process = psutil.Process(pid)
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def editor_files(tokenizer, text: str, editors: int, tokens: int, more: int) -> list[tuple[str, str]]:
    """Each editor's own file (~`tokens` tokens) and the `more` characters it goes on to type."""
    files = []
    for e in range(editors):
        start = len(text) * e // editors
        f = cut_to_tokens(tokenizer, text, tokens, start=start)
        files.append((f, text[start + len(f) :][:more]))
    return files


async def team(
    url: str, files: list[tuple[str, str]], typed: int, requests: int, pause: float, replicas: int = 1
) -> dict:
    """All editors send their file (cold), then type: (cold TTFTs, warm TTFTs, warm cached share)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
    cold = await asyncio.gather(*(first_token(client, f) for f, _ in files))
    hit0, miss0 = cache_tokens(url, replicas)

    async def editor(i: int, file: str, more: str) -> list[float]:
        await asyncio.sleep(pause * i / len(files))  # the editors' keystrokes interleave
        out = []
        for k in range(1, requests + 1):
            out.append(await first_token(client, file + more[: k * typed]))
            await asyncio.sleep(pause)
        return out

    warm = await asyncio.gather(*(editor(i, f, more) for i, (f, more) in enumerate(files)))
    hit1, miss1 = cache_tokens(url, replicas)
    await client.close()
    return {
        "cold_ttft_s": list(cold),
        "warm_ttft_s": [t for w in warm for t in w],
        "cached_share": (hit1 - hit0) / max(1.0, (hit1 - hit0) + (miss1 - miss0)),
    }


def ring_bodies(tokenizer, text: str, chunks: int, chunk_tokens: int, file_tokens: int, rotations: int) -> list:
    """llama.vim's /infill requests: the ring of extra chunks (other files' code it saw lately), the file before
    the cursor, a typed line; the first request twice (a keystroke), then a rotation per request."""
    pool = []
    for c in range(chunks + rotations):
        start = len(text) * (c + 1) // (chunks + rotations + 3)
        pool.append({"filename": f"f{c}.py", "text": cut_to_tokens(tokenizer, text, chunk_tokens, start=start)})
    prefix = cut_to_tokens(tokenizer, text, file_tokens, start=len(text) * 9 // 10)
    bodies = []
    for r in range(rotations + 1):
        body = {"input_extra": pool[r : r + chunks], "input_prefix": prefix, "input_suffix": "\n", "prompt": "    "}
        bodies.append({**body, "n_predict": 1, "logit_bias": [[int(k), v] for k, v in BIAS.items()]})
        if r == 0:
            bodies.append({**bodies[0], "prompt": "    x"})
    return bodies


def ring(url: str, bodies: list[dict]) -> dict:
    """TTFT of each /infill request (n_predict 1: the whole answer is its first token)."""
    times = []
    for body in bodies:
        request = urllib.request.Request(
            f"{url}/infill", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=900) as r:
            r.read()
        times.append(time.perf_counter() - start)
    return {"cold_s": times[0], "typed_s": times[1], "rotated_s": times[2:]}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def summarise(rounds: list[dict], editors: list[int]) -> dict:
    summary: dict[str, dict] = {}
    for setup in rounds[0]["team"]:
        summary[setup] = {}
        for n in editors:
            runs = [r["team"][setup][str(n)] for r in rounds]
            warm = [t for run in runs for t in run["warm_ttft_s"]]
            summary[setup][str(n)] = {
                "cached_share": statistics.median(run["cached_share"] for run in runs),
                "warm_p50_s": statistics.median(warm),
                "warm_p95_s": p95(warm),
                "cold_p50_s": statistics.median(t for run in runs for t in run["cold_ttft_s"]),
                "rss_gb": max(run["rss"] for run in runs) / 1e9,
            }
    for setup in rounds[0].get("ring", {}):
        runs = [r["ring"][setup] for r in rounds]
        cold = statistics.median(run["cold_s"] for run in runs)
        rotated = statistics.median(t for run in runs for t in run["rotated_s"])
        summary[setup] = {"cold_s": cold, "rotated_s": rotated, "rotated_over_cold": rotated / cold}
    return summary


def plot(summary: dict, editors: list[int], path: Path) -> None:
    """Cached share and warm TTFT per setup and team size; TTFT after a ring rotation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teams = [s for s in summary if not s.startswith("ring")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.8 / len(teams)
    for i, setup in enumerate(teams):
        xs = [j + i * width for j in range(len(editors))]
        axes[0].bar(xs, [summary[setup][str(n)]["cached_share"] for n in editors], width, label=setup)
        p50 = [summary[setup][str(n)]["warm_p50_s"] for n in editors]
        p95s = [summary[setup][str(n)]["warm_p95_s"] for n in editors]
        axes[1].bar(xs, p95s, width, alpha=0.35, color=f"C{i}")
        axes[1].bar(xs, p50, width, label=f"{setup} (p50; pale: p95)", color=f"C{i}")
    for ax, title, label in (
        (axes[0], "share of warm prompt tokens from cache", "cached share"),
        (axes[1], "warm time to first token", "TTFT (s)"),
    ):
        names = [f"{n} editor{'s' if n > 1 else ''}" for n in editors]
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(editors))], names)
        ax.set(title=title, ylabel=label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    rings = [s for s in summary if s.startswith("ring")]
    if rings:
        axes[2].bar(
            [f"{s}\ncold" for s in rings] + [f"{s}\nrotated" for s in rings],
            [summary[s]["cold_s"] for s in rings] + [summary[s]["rotated_s"] for s in rings],
            color=["C7"] * len(rings) + ["C0", "C2"][: len(rings)],
        )
        axes[2].set(title="llama.vim /infill: TTFT after the ring rotates", ylabel="TTFT (s)")
        axes[2].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--editors", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--file-tokens", type=int, default=600, help="each editor's file (default 600 tokens)")
    p.add_argument("--typed", type=int, default=12, help="characters typed between two requests (default 12)")
    p.add_argument("--requests", type=int, default=4, help="warm requests per editor (default 4)")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between an editor's requests (default 2)")
    every = [*SETUPS, *RAY_SETUPS, *RING_SETUPS]
    p.add_argument(
        "--setups",
        nargs="+",
        choices=every,
        default=[*SETUPS, *RING_SETUPS],
        help="the servers to compare (default: the one-server ones and the ring; Ray's start a local Ray each, so "
        "run one Ray setup at a time, next to `cache`)",
    )
    p.add_argument("--ring-chunks", type=int, default=8, help="extra chunks in the ring (default 8)")
    p.add_argument("--ring-chunk-tokens", type=int, default=180)
    p.add_argument("--rotations", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "team_trace.json")
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "team_trace.png")
    p.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "data" / "codegen-350M-mono-tokenizer")
    args = p.parse_args()
    tokenizer = bench_tokenizer(args.tokenizer)
    text = source_text()
    setups = {name: extra for name, extra in {**SETUPS, **RAY_SETUPS, **RING_SETUPS}.items() if name in args.setups}
    servers, urls = {}, {}
    try:
        for name, extra in setups.items():
            port = free_port()
            threads = 1 if "--ray" in extra else args.threads
            servers[name] = start_server(args.export, port, args.max_batch, threads, args.tokenizer, extra)
            urls[name] = f"http://127.0.0.1:{port}"
            print(f"started {name}", file=sys.stderr, flush=True)
        rounds = []
        for r in range(args.rounds):
            out: dict = {"team": {s: {} for s in setups if not s.startswith("ring")}, "ring": {}}
            for n in args.editors:
                # Each round and team size its own files: nothing cached from before.
                start = (r * len(args.editors) + args.editors.index(n)) * 7919
                files = editor_files(
                    tokenizer, text[start:] + text[:start], n, args.file_tokens, args.typed * args.requests
                )
                for setup in out["team"]:  # round-robin over the setups
                    replicas = 2 if setup in RAY_SETUPS else 1
                    run = asyncio.run(team(urls[setup], files, args.typed, args.requests, args.pause, replicas))
                    run["rss"] = tree_rss(servers[setup].pid)
                    out["team"][setup][str(n)] = run
                    print(
                        f"round {r + 1} {n:>2} editors {setup:>11}: share {run['cached_share']:.2f} warm p50 "
                        f"{statistics.median(run['warm_ttft_s']):.3f} s",
                        file=sys.stderr,
                        flush=True,
                    )
            shift = r * 7919
            bodies = ring_bodies(
                tokenizer,
                text[shift:] + text[:shift],
                args.ring_chunks,
                args.ring_chunk_tokens,
                args.file_tokens // 3,
                args.rotations,
            )
            for setup in [s for s in RING_SETUPS if s in setups]:
                out["ring"][setup] = ring(urls[setup], bodies)
                print(f"round {r + 1} {setup}: {out['ring'][setup]}", file=sys.stderr, flush=True)
            rounds.append(out)
    finally:
        for proc in servers.values():
            proc.terminate()
        for proc in servers.values():
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:  # a local Ray that does not stop in time must not cost the results
                print(f"a server (pid {proc.pid}) did not stop in 180 s: killed", file=sys.stderr)
                proc.kill()
    summary = summarise(rounds, args.editors)
    print("| setup | editors | cached share | warm TTFT p50 s | p95 s | cold TTFT p50 s | RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for setup, by_n in summary.items():
        if setup.startswith("ring"):
            continue
        for n, s in by_n.items():
            print(
                f"| {setup} | {n} | {s['cached_share']:.2f} | {s['warm_p50_s']:.3f} | {s['warm_p95_s']:.3f} | "
                f"{s['cold_p50_s']:.3f} | {s['rss_gb']:.2f} |"
            )
    print("\n| ring setup | cold TTFT s | after a rotation s | rotated/cold |")
    print("| --- | --- | --- | --- |")
    for setup in [s for s in RING_SETUPS if s in summary]:
        s = summary[setup]
        print(f"| {setup} | {s['cold_s']:.3f} | {s['rotated_s']:.3f} | {s['rotated_over_cold']:.2f} |")
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args), "summary": summary, "rounds": rounds}, default=str, indent=1))
    plot(summary, args.editors, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
