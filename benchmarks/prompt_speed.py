"""Time to first token of long prompts: our fused graph (fp32, int8, int4) against transformers and
CTranslate2 (fp32, int8), on the same random 350M-shape weights, batch 1.

Each measurement is a process of its own: load the model, then run the prompt twice, each time up to the
first generated token: the first run is the cold time to first token (what the table shows), the second
the warm one. The runners take turns, round-robin, for --rounds rounds (the machine's speed drifts), and the
table shows medians. Needs the `bench` extra (CTranslate2).

    python benchmarks/prompt_speed.py                         # 1,024 and 2,000 tokens, 3 rounds, 2 threads
    python benchmarks/prompt_speed.py --tokens 1024 --rounds 1 --runners ct2-int8,fused-int8

Runners: transformers (generate, one new token, fp32), ct2-fp32 / ct2-int8 (ctranslate2.Generator over the
checkpoint converted by TransformersConverter, compute_type float32 / int8), fused-fp32 / fused-int8 /
fused-int4 (codegen_deploy's fused ONNX Runtime session; int8/int4: the fused graph's quantized weights).
Targets: fused-int8 <= ct2-int8 and fused-fp32 <= transformers at every length. Writes JSON (default
benchmarks/results/prompt_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from decode_speed import DEFAULT_TOKENIZER, other_load, prepare, prepare_quantized  # noqa: E402

RUNNERS = ("transformers", "ct2-fp32", "ct2-int8", "fused-fp32", "fused-int8", "fused-int4")
# (runner, baseline): the runner's time to first token must not exceed the baseline's.
TARGETS = (("fused-int8", "ct2-int8"), ("fused-fp32", "transformers"))


def prompt_ids(vocab: int, tokens: int, seed: int) -> list[int]:
    """Random token ids below `vocab` (random weights: only the length matters); the same for every runner."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, tokens).tolist()


def first_token_transformers(work: dict, ids: list[int]):
    """(load seconds, a function that runs the prompt to its first token) for transformers' generate."""
    import torch
    from transformers import CodeGenForCausalLM

    torch.set_num_threads(work["threads"])
    start = time.perf_counter()
    model = CodeGenForCausalLM.from_pretrained(work["checkpoint"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    prompt = torch.tensor([ids])

    def run() -> None:
        with torch.no_grad():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )

    return load_s, run


def first_token_ct2(work: dict, ids: list[int]):
    """(load seconds, run) for a CTranslate2 Generator; compute_type from the runner's name."""
    import ctranslate2

    compute_type = {"ct2-fp32": "float32", "ct2-int8": "int8"}[work["runner"]]
    start = time.perf_counter()
    threads = work["threads"]
    generator = ctranslate2.Generator(work["ct2"], device="cpu", compute_type=compute_type, intra_threads=threads)
    load_s = time.perf_counter() - start
    vocabulary = json.loads((Path(work["ct2"]) / "vocabulary.json").read_text())
    tokens = [vocabulary[i] for i in ids]

    def run() -> None:
        steps = generator.generate_tokens(tokens, max_length=1)
        next(steps)  # the first generated token: the prompt has been processed
        steps.close()

    return load_s, run


def first_token_fused(work: dict, ids: list[int]):
    """(load seconds, run) for our fused session, opened as codegen-bench opens it."""
    import numpy as np

    from codegen_deploy.runtime.bench import BenchSpec, open_bench_session

    spec = BenchSpec(backend="onnxruntime-fused", path=work["folder"], prompt_tokens=len(ids), threads=work["threads"])
    start = time.perf_counter()
    session = open_bench_session(spec)
    load_s = time.perf_counter() - start
    prompt = np.array([ids], np.int64)

    def run() -> None:
        session.prefill(prompt).argmax(-1)

    return load_s, run


def worker(work: dict) -> dict:
    """One measurement in this process: load, then the cold and the warm time to first token."""
    from codegen_deploy.memory import peak_rss_bytes

    ids = prompt_ids(work["vocab"], work["tokens"], work["seed"])
    runner = work["runner"]
    if runner == "transformers":
        load_s, run = first_token_transformers(work, ids)
    elif runner.startswith("ct2-"):
        load_s, run = first_token_ct2(work, ids)
    else:
        load_s, run = first_token_fused(work, ids)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"load_s": load_s, "ttft_s": times[0], "ttft_warm_s": times[1], "peak_rss_bytes": peak_rss_bytes()}


def prepare_ct2(checkpoint: Path, work: Path) -> Path:
    """The checkpoint converted for CTranslate2 (float32; int8 is chosen when loading), made when missing."""
    from ctranslate2.converters import TransformersConverter

    folder = work / f"{checkpoint.name}-ct2"
    if not (folder / "model.bin").is_file():
        t = time.perf_counter()
        TransformersConverter(str(checkpoint)).convert(str(folder), force=True)
        print(f"[prepare] CTranslate2 model in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def summarize(runs: list[dict], runners: list[str], lengths: list[int]) -> list[dict]:
    """Medians per runner and prompt length."""
    rows = []
    for runner in runners:
        for tokens in lengths:
            mine = [r for r in runs if r["runner"] == runner and r["tokens"] == tokens]
            row = {"runner": runner, "tokens": tokens, "rounds": len(mine)}
            for key in ("ttft_s", "ttft_warm_s", "load_s", "peak_rss_bytes"):
                row[key] = statistics.median(r[key] for r in mine)
            rows.append(row)
    return rows


def format_table(rows: list[dict], runners: list[str], lengths: list[int]) -> str:
    """Runners down, prompt lengths across: median cold time to first token (warm in brackets), seconds."""
    cells = {(r["runner"], r["tokens"]): f"{r['ttft_s']:.2f} ({r['ttft_warm_s']:.2f})" for r in rows}
    header = ["runner", *(f"{n} tokens: cold (warm) s" for n in lengths)]
    table = [header] + [[runner, *(cells[runner, n] for n in lengths)] for runner in runners]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table)


def compare(rows: list[dict]) -> list[str]:
    """One line per target and prompt length: the ratio of the medians and whether it is met."""
    ttft = {(r["runner"], r["tokens"]): r["ttft_s"] for r in rows}
    lines = []
    for runner, baseline in TARGETS:
        for (name, tokens), value in sorted(ttft.items()):
            if name == runner and (baseline, tokens) in ttft:
                ratio = value / ttft[baseline, tokens]
                verdict = "meets" if ratio <= 1 else "misses"
                lines.append(f"{runner} / {baseline} @ {tokens}: {ratio:.2f} -> {verdict} the target (<= 1)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a CodeGen checkpoint (default: make a random 350M one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-prompt-speed"), help="where to make files")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--tokens", default="1024,2000", help="prompt lengths (default 1024,2000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated, of {', '.join(RUNNERS)}")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "prompt_speed.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # a measuring child: one JSON line on stdout
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sys.path.insert(0, str(REPO))
    from codegen_deploy.config import ModelConfig
    from codegen_deploy.runtime.bench import run_child

    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = set(runners) - set(RUNNERS)
    if unknown:
        p.error(f"unknown runners {', '.join(sorted(unknown))}")
    lengths = [int(n) for n in args.tokens.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, export = prepare(args.work, args.checkpoint, args.tokenizer)
    config = ModelConfig.from_file(checkpoint)
    if max(lengths) + 1 > config.n_positions:
        p.error(f"prompts of {max(lengths)} tokens do not fit the model's {config.n_positions} positions")
    folders = {"fused-fp32": export}
    for weights in ("int8", "int4"):
        if f"fused-{weights}" in runners:
            # int4 noise flips the top-1 of random weights' near-flat logits: its check would fail.
            folders[f"fused-{weights}"] = prepare_quantized(export, weights, validate=weights != "int4")
    ct2 = prepare_ct2(checkpoint, args.work) if any(r.startswith("ct2-") for r in runners) else None
    # Ids every runner can take: CTranslate2 reads tokens as strings, so stay inside the tokenizer's vocabulary.
    vocab = min(config.vocab_size, len(json.loads((ct2 / "vocabulary.json").read_text()))) if ct2 else config.vocab_size
    load_before = other_load()
    print(f"[setup] {load_before}", flush=True)

    runs = []
    for round_index in range(args.rounds):
        for tokens in lengths:
            for runner in runners:
                work = {"runner": runner, "tokens": tokens, "threads": args.threads, "seed": 0, "vocab": vocab}
                work |= {"checkpoint": str(checkpoint), "ct2": str(ct2), "folder": str(folders.get(runner, ""))}
                result = {**work, "round": round_index, **run_child([__file__, "--worker", json.dumps(work)])}
                runs.append(result)
                print(
                    f"[round {round_index + 1}/{args.rounds}] {runner} @ {tokens}: TTFT {result['ttft_s']:.2f} s "
                    f"(warm {result['ttft_warm_s']:.2f} s), load {result['load_s']:.1f} s",
                    flush=True,
                )

    rows = summarize(runs, runners, lengths)
    lines = compare(rows)
    print()
    print(f"median over {args.rounds} rounds, batch 1, {args.threads} threads")
    print(format_table(rows, runners, lengths))
    print()
    print("\n".join(lines))
    report = {
        "checkpoint": str(checkpoint),
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "load_after": other_load(),
        },
        "medians": rows,
        "targets": lines,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
