"""codegen-serve as editors use it, with prefix reuse and chunked prompts on (the defaults) and off.

An editor sends the whole file above the cursor on nearly every keystroke and cancels the request it sent
a moment ago, so what its user feels is the time to first token on a long, almost unchanged prompt while
other users' streams keep flowing. Three scenarios, each against two servers of the same export started
side by side (on: the defaults; off: --cache-memory 0 --prefill-chunk 0, every prompt read whole from
nothing), round-robin over --rounds:

  typing      a ~--file-tokens file, then the same file growing by --typed characters a request; each
              request is streamed and cancelled at its first token (as an editor does when the next
              keystroke comes): cold (the first) against warm (the rest) time to first token.
  long-prompt a stream generating, then a --long-tokens prompt from another client: the stream's largest
              gap between two tokens while the prompt is read, against its own step (median gap before).
  editors     --editors clients typing in their own files at once: time to first token of every request.

Prints a table, writes JSON and a PNG plot (matplotlib: pip install "codegen-deploy[bench]").

    python benchmarks/editor_trace.py EXPORT [EXPORT ...] [--rounds 2] [--plot editor_trace.png]

The text is this repository's own Python source; the servers get the real CodeGen tokenizer from
../shared/data (a random checkpoint's own tokenizer decodes most ids to nothing, so nothing would stream).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from serve_load import REPO, free_port, start_server

CONFIGS = {"on": (), "off": ("--cache-memory", "0", "--prefill-chunk", "0")}


def source_text() -> str:
    """This repository's Python source, in a fixed order: real code to type."""
    files = sorted((REPO / "codegen_deploy").rglob("*.py"))
    return "\n\n".join(f.read_text() for f in files)


def cut_to_tokens(tokenizer, text: str, tokens: int, start: int = 0) -> str:
    """The text from `start` holding about `tokens` tokens (cut at a line end)."""
    ids = tokenizer.encode(text[start : start + tokens * 8])[:tokens]
    piece = tokenizer.decode(ids)
    return piece[: piece.rfind("\n") + 1] or piece


# Random weights often pick tokens that are part of a character, which the server holds back until the
# character is whole, so a chunk would not mark every token. Every request here biases one ASCII token
# (set in main()) so that each token streams as it is made; what is timed, the prompt and the steps, is
# the same.
BIAS: dict[str, float] = {}


def bench_tokenizer(path: Path):
    """The real CodeGen tokenizer the servers are given; sets BIAS for it."""
    if not path.is_dir():
        raise SystemExit(f"no tokenizer at {path}: give --tokenizer (the real CodeGen tokenizer)")
    from codegen_deploy.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    BIAS[str(tokenizer.encode(" x")[0])] = 100.0
    return tokenizer


async def first_token(client, prompt: str, max_tokens: int = 16) -> float:
    """Stream one greedy request and cancel it at its first token (close the stream, as an editor does when
    the next keystroke comes); return the time to that token."""
    start = time.perf_counter()
    stream = await client.completions.create(
        model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, logit_bias=BIAS
    )
    try:
        async for _ in stream:
            return time.perf_counter() - start
    finally:
        await stream.close()
    raise RuntimeError("the stream ended without a token")


async def typing(client, file: str, more: str, typed: int, requests: int) -> list[float]:
    """Time to first token of the file, then of the file growing by `typed` characters of `more` a request."""
    return [await first_token(client, file + more[: k * typed]) for k in range(requests)]


async def long_prompt(client, short: str, long: str, warmup: int = 20) -> dict:
    """A stream generating, then a long prompt from another client: the stream's gaps between chunks."""
    arrivals: list[float] = []
    started = asyncio.Event()
    long_done: dict[str, float] = {}

    async def stream():
        response = await client.completions.create(
            model="bench", prompt=short, max_tokens=400, temperature=0, stream=True, logit_bias=BIAS
        )
        try:
            async for _ in response:
                arrivals.append(time.perf_counter())
                if len(arrivals) == warmup:
                    started.set()
                if "at" in long_done and arrivals[-1] > long_done["at"] + 0.5:
                    return
        finally:
            await response.close()

    async def intruder():
        await started.wait()
        long_done["sent"] = time.perf_counter()
        long_done["ttft"] = await first_token(client, long, max_tokens=4)
        long_done["at"] = time.perf_counter()

    await asyncio.gather(stream(), intruder())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    before = [g for a, g in zip(arrivals[1:], gaps, strict=True) if a < long_done["sent"]]
    during = [g for a, g in zip(arrivals[1:], gaps, strict=True) if long_done["sent"] <= a <= long_done["at"] + 0.5]
    step = statistics.median(before[2:] or before)
    largest = max(during) if during else 0.0
    return {
        "step_s": step,
        "largest_gap_s": largest,
        "gap_in_steps": largest / step,
        "median_gap_in_steps": statistics.median(during) / step if during else 0.0,
        "long_ttft_s": long_done["ttft"],
        "timeline": [(a - long_done["sent"], g) for a, g in zip(arrivals[1:], gaps, strict=True)],
    }


async def editors(client, files: list[tuple[str, str]], typed: int, requests: int) -> list[list[float]]:
    """Several editors typing at once, each in its own file."""
    return await asyncio.gather(*(typing(client, f, more, typed, requests) for f, more in files))


def run_round(urls: dict[str, str], args, tokenizer, text: str, round_index: int = 0) -> dict:
    import openai

    # Texts of their own each round: one sent in an earlier round would come from the prefix cache.
    shift = round_index * 7919
    file = cut_to_tokens(tokenizer, text, args.file_tokens, start=shift)
    more = text[shift + len(file) : shift + len(file) + args.typed * args.requests]
    long = cut_to_tokens(tokenizer, text, args.long_tokens, start=len(text) // 3 + shift)
    short = "def main():\n"
    files = []
    for e in range(args.editors):
        start = len(text) * (e + 1) // (args.editors + 2) + shift
        f = cut_to_tokens(tokenizer, text, args.file_tokens // 2, start=start)
        files.append((f, text[start + len(f) :][: args.typed * args.requests]))
    out: dict[str, dict] = {name: {} for name in urls}

    async def go():
        clients = {
            name: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            for name, url in urls.items()
        }
        # Round-robin: each scenario on each server in turn.
        if "typing" in args.scenarios:
            for name, client in clients.items():
                out[name]["hits_before"] = hits(urls[name])
                out[name]["typing"] = await typing(client, file, more, args.typed, args.requests)
                out[name]["typing_hits"] = hits(urls[name]) - out[name].pop("hits_before")
        if "long-prompt" in args.scenarios:
            for name, client in clients.items():
                out[name]["long_prompt"] = await long_prompt(client, short, long)
        if "editors" in args.scenarios:
            for name, client in clients.items():
                out[name]["editors"] = await editors(client, files, args.typed, args.requests)
        for client in clients.values():
            await client.close()

    asyncio.run(go())
    return out


def server_metrics(url: str) -> tuple[str, dict[str, float]]:
    """The /metrics samples of the server (or Ray replica) that answered, by name with labels, and which replica
    it was (its pid, from the x-codegen-replica header under --ray; "" for one server)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        replica = r.headers.get("x-codegen-replica", "")
        lines = r.read().decode().splitlines()
    samples = [line.rsplit(" ", 1) for line in lines if not line.startswith("#")]
    return replica, {name: float(value) for name, value in samples}


def hits(url: str) -> float:
    """The server's prompt tokens reused from its cache so far (its /metrics counter)."""
    return server_metrics(url)[1].get('codegen_prompt_cache_tokens_total{result="hit"}', 0.0)


def summarise(rounds: list[dict]) -> dict:
    """Medians over rounds, per server config."""
    summary = {}
    for name in rounds[0]:
        s = summary[name] = {}
        if "typing" in rounds[0][name]:
            cold = statistics.median(r[name]["typing"][0] for r in rounds)
            warm = statistics.median(t for r in rounds for t in r[name]["typing"][1:])
            s["typing_reused_tokens"] = statistics.median(r[name]["typing_hits"] for r in rounds)
            s.update(typing_cold_ttft_s=cold, typing_warm_ttft_s=warm, warm_over_cold=warm / cold)
        if "long_prompt" in rounds[0][name]:
            long = [r[name]["long_prompt"] for r in rounds]
            s["stream_step_s"] = statistics.median(x["step_s"] for x in long)
            s["stream_largest_gap_s"] = statistics.median(x["largest_gap_s"] for x in long)
            s["stream_gap_in_steps"] = statistics.median(x["gap_in_steps"] for x in long)
            s["stream_worst_gap_in_steps"] = max(x["gap_in_steps"] for x in long)
            s["stream_median_gap_in_steps"] = statistics.median(x["median_gap_in_steps"] for x in long)
            s["long_prompt_ttft_s"] = statistics.median(x["long_ttft_s"] for x in long)
        if "editors" in rounds[0][name]:
            editor_warm = [t for r in rounds for e in r[name]["editors"] for t in e[1:]]
            s["editors_warm_ttft_p50_s"] = statistics.median(editor_warm)
            s["editors_warm_ttft_max_s"] = max(editor_warm)
    return summary


STYLES = {"on": ("-o", "C0"), "off": ("--s", "C3"), "before": (":^", "C2")}


def plot(results: dict, path: Path) -> None:
    """Time to first token per typed request, the stream's gaps around the long prompt, and the editors' time to
    first token, per server config (the scenarios that ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exports = list(results)
    fig, axes = plt.subplots(len(exports), 3, figsize=(16, 4.2 * len(exports)), squeeze=False)
    for row, export in zip(axes, exports, strict=True):
        rounds = results[export]["rounds"]
        for name in rounds[0]:
            style, color = STYLES[name]
            for i, r in enumerate(rounds):
                label = name if i == 0 else None
                if "typing" in r[name]:
                    row[0].plot(r[name]["typing"], style, color=color, alpha=0.8, label=label)
                for j, e in enumerate(r[name].get("editors", [])):
                    row[2].plot(e, style, color=color, alpha=0.6, label=label if j == 0 else None)
            if "long_prompt" in rounds[0][name]:
                timeline = rounds[0][name]["long_prompt"]["timeline"]
                times, gaps = [t for t, _ in timeline], [g * 1e3 for _, g in timeline]
                row[1].plot(times, gaps, style, color=color, markersize=3, label=name)
        row[0].set(title=f"{export}: typing in a file", xlabel="request (one per keystroke burst)", ylabel="TTFT (s)")
        row[1].set(
            title="a stream while another client sends a long prompt",
            xlabel="time since the long prompt was sent (s)",
            ylabel="gap between the stream's tokens (ms)",
        )
        row[2].set(title="several editors typing at once", xlabel="request", ylabel="TTFT (s)")
        for ax in row:
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        if row[0].lines:
            row[0].set_yscale("log")
        if row[2].lines:
            row[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--file-tokens", type=int, default=1000, help="the typed file's tokens (default 1000)")
    p.add_argument("--typed", type=int, default=12, help="characters typed between two requests (default 12)")
    p.add_argument("--requests", type=int, default=8, help="requests per typed file (default 8)")
    p.add_argument("--long-tokens", type=int, default=1500, help="the long prompt's tokens (default 1500)")
    p.add_argument("--editors", type=int, default=3, help="editors typing at once (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=4)
    scenarios = ("typing", "long-prompt", "editors")
    p.add_argument("--scenarios", nargs="+", choices=scenarios, default=list(scenarios))
    p.add_argument("--baseline-repo", type=Path, help="also a server with the defaults from another checkout (before)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "editor_trace.json")
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "editor_trace.png")
    real = REPO.parent / "shared" / "data" / "codegen-350M-mono-tokenizer"
    p.add_argument("--tokenizer", type=Path, default=real)
    args = p.parse_args()
    tokenizer = bench_tokenizer(args.tokenizer)
    text = source_text()
    results = {}
    for export in args.exports:
        servers, urls = [], {}
        try:
            configs = [(name, extra, REPO) for name, extra in CONFIGS.items()]
            if args.baseline_repo:
                configs.append(("before", (), args.baseline_repo))
            for name, extra, repo in configs:
                port = free_port()
                servers.append(start_server(export, port, args.max_batch, args.threads, args.tokenizer, extra, repo))
                urls[name] = f"http://127.0.0.1:{port}"
            rounds = []
            for r in range(args.rounds):
                rounds.append(run_round(urls, args, tokenizer, text, r))
                print(f"[{export.name}] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(timeout=30)
        results[export.name] = {"summary": summarise(rounds), "rounds": rounds}
    columns = [
        ("typing_reused_tokens", "typing: reused tokens"),
        ("typing_cold_ttft_s", "cold TTFT s"),
        ("typing_warm_ttft_s", "warm TTFT s"),
        ("warm_over_cold", "warm/cold"),
        ("stream_step_s", "step s"),
        ("stream_largest_gap_s", "largest gap s"),
        ("stream_gap_in_steps", "largest gap/step"),
        ("stream_worst_gap_in_steps", "worst round"),
        ("stream_median_gap_in_steps", "median gap/step"),
        ("long_prompt_ttft_s", "long TTFT s"),
        ("editors_warm_ttft_p50_s", f"{args.editors} editors p50 s"),
        ("editors_warm_ttft_max_s", "max s"),
    ]
    print("| export | reuse+chunks | " + " | ".join(c for _, c in columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for export, r in results.items():
        for name, s in r["summary"].items():
            print(f"| {export} | {name} | " + " | ".join(f"{s[k]:.3g}" if k in s else "-" for k, _ in columns) + " |")
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args), "results": results}, default=str, indent=1))
    plot(results, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
