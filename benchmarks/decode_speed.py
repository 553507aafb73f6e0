"""Decode speed, time to first token and peak RSS of the ONNX Runtime loops
against transformers' CodeGenForCausalLM.generate on the same random 350M-shape weights.

In one run, each in a process of its own (so peak RSS is its own), at each context length:
  transformers       CodeGenForCausalLM.generate(use_cache=True, greedy), torch threads = --threads
  ort-naive          plain graph, numpy feeds and fetches every step (no IO binding)
  ort-plain-binding  plain graph with IO binding (cache stays in ORT memory, still grown by Concat)
  ort-fused          fused graph: GroupQueryAttention, cache buffers written in place (export/fused.py)
Prints a table and writes JSON (default benchmarks/results/decode_speed.json).

    python benchmarks/decode_speed.py                       # makes and exports the checkpoint under --work
    python benchmarks/decode_speed.py --contexts 128 --new-tokens 16 --repeats 1   # a quick check

Targets (fp32, batch 1, 2 threads): decode tok/s >= 2.2x transformers, TTFT <= 0.75x
transformers, peak RSS <= 1.3x the fp32 weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "data" / "codegen-350M-mono-tokenizer"

# Our name -> the codegen-bench backend it runs (transformers is measured by this script's own worker).
RUNNERS = {
    "ort-naive": "onnxruntime-naive",
    "ort-plain-binding": "onnxruntime-plain",
    "ort-fused": "onnxruntime-fused",
}
# Not in the default run: the fused graph with int8 weights (lossy; a separate export folder).
INT8_RUNNER = "ort-fused-int8"
TARGETS = {"decode_speedup_min": 2.2, "ttft_ratio_max": 0.75, "rss_over_weights_max": 1.3}


def transformers_worker(args: dict) -> dict:
    """Time transformers' generate: a LogitsProcessor stamps the clock after every forward pass."""
    import numpy as np
    import torch
    from transformers import CodeGenForCausalLM, LogitsProcessor, LogitsProcessorList

    from codegen_deploy.memory import peak_rss_bytes

    torch.set_num_threads(args["threads"])
    start = time.perf_counter()
    model = CodeGenForCausalLM.from_pretrained(args["checkpoint"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    prompt = np.random.default_rng(args["seed"]).integers(0, vocab, (args["batch"], args["prompt_tokens"]))
    ids = torch.tensor(prompt)

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    runs = []
    n = args["new_tokens"]
    for _ in range(args["repeats"]):
        stamp = Stamp()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                logits_processor=LogitsProcessorList([stamp]),
                pad_token_id=model.config.eos_token_id,
            )
        t = stamp.times
        # t[0] follows the prompt's forward pass; t[i] - t[i-1] is decode step i. Step 1 is left out (warm-up),
        # as codegen-bench does.
        runs.append({"ttft_s": t[0] - t0, "decode_tok_s": args["batch"] * (len(t) - 2) / (t[-1] - t[1])})
    return {
        "backend": "transformers",
        "load_s": load_s,
        "prefill_s": statistics.median(r["ttft_s"] for r in runs),
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
        "peak_rss_bytes": peak_rss_bytes(),
    }


def prepare(work: Path, checkpoint: Path | None, tokenizer: Path) -> tuple[Path, Path]:
    """(checkpoint, export folder with the plain and the fused graph), made under `work` when missing."""
    from codegen_deploy.artifacts.io_spec import FUSED_GRAPH_FILE
    from codegen_deploy.model.make_checkpoint import make_checkpoint
    from codegen_deploy.pipeline import add_fused_graph, export_model

    if checkpoint is None:
        checkpoint = work / "codegen-350M-random"
        if not (checkpoint / "config.json").is_file():
            t = time.perf_counter()
            make_checkpoint(checkpoint, shape="350M", tokenizer=tokenizer if tokenizer.is_dir() else None)
            print(f"[prepare] checkpoint {checkpoint} in {time.perf_counter() - t:.0f} s", flush=True)
    export = work / f"{checkpoint.name}-onnx"
    if not (export / "manifest.json").is_file():
        t = time.perf_counter()
        export_model(checkpoint, export, validate=False, progress=lambda line: print(f"[export] {line}", flush=True))
        print(f"[prepare] plain export in {time.perf_counter() - t:.0f} s", flush=True)
    if not (export / FUSED_GRAPH_FILE).is_file():
        t = time.perf_counter()
        add_fused_graph(export)
        print(f"[prepare] fused graph in {time.perf_counter() - t:.0f} s", flush=True)
    return checkpoint, export


def prepare_quantized(export: Path, weights: str = "int8", validate: bool = True) -> Path:
    """A folder holding only the fused graph with `weights` ("int8" or "int4") quantized weights (and a
    manifest naming it), next to `export`; made when missing (remove it after changing the export code).
    validate: check it against the reference (random weights give near-flat logits, whose top-1 int4
    noise flips: a speed run may skip the check)."""
    from codegen_deploy.artifacts.io_spec import FUSED_GRAPH_FILE
    from codegen_deploy.artifacts.manifest import read_manifest, write_manifest
    from codegen_deploy.pipeline import add_fused_graph

    folder = export.with_name(f"{export.name}-fused-{weights}")
    if not (folder / FUSED_GRAPH_FILE).is_file():
        t = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(export, verify="none")
        write_manifest(folder, {k: manifest[k] for k in ("model_config", "source", "dtype")})
        add_fused_graph(folder, weights=weights, validate=validate)
        print(f"[prepare] {weights} fused graph in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def other_load() -> str:
    """What else is using the CPU now (load average and the busiest other processes), for the record."""
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
        top = subprocess.run(["ps", "-eo", "pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
        busy = [line[:100] for line in top.splitlines()[1:6]]
        return f"load average {' '.join(load)}; busiest: " + " | ".join(busy)
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a CodeGen checkpoint (default: make a random 350M one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-decode-speed"), help="where to make files")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--contexts", default="128,1024", help="prompt lengths (default 128,1024)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--runners",
        default="transformers," + ",".join(RUNNERS),
        help=f"comma-separated (default: all but {INT8_RUNNER}, which adds int8 weights)",
    )
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "decode_speed.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # a measuring child: one JSON line on stdout
        print(json.dumps(transformers_worker(json.loads(args.worker))))
        return 0

    sys.path.insert(0, str(REPO))
    from codegen_deploy.config import ModelConfig
    from codegen_deploy.runtime.bench import BenchSpec, format_table, measure_in_subprocess, run_child

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, export = prepare(args.work, args.checkpoint, args.tokenizer)
    config = ModelConfig.from_file(checkpoint)
    weight_bytes = config.num_parameters() * 4  # fp32
    print(f"[setup] {export}: {config.num_parameters() / 1e6:.0f}M parameters, {weight_bytes / 1e9:.2f} GB fp32")
    load_before = other_load()
    print(f"[setup] {load_before}", flush=True)

    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = set(runners) - {"transformers", INT8_RUNNER, *RUNNERS}
    if unknown:
        p.error(f"unknown runners {', '.join(sorted(unknown))}")
    int8_folder = prepare_quantized(export, "int8") if INT8_RUNNER in runners else None

    results = []
    for prompt_tokens in [int(c) for c in args.contexts.split(",")]:
        workload = {
            "prompt_tokens": prompt_tokens,
            "new_tokens": args.new_tokens,
            "batch": 1,
            "repeats": args.repeats,
            "threads": args.threads,
            "seed": 0,
        }
        for runner in runners:
            t = time.perf_counter()
            if runner == "transformers":
                worker = {**workload, "checkpoint": str(checkpoint)}
                result = {**workload, **run_child([__file__, "--worker", json.dumps(worker)])}
            elif runner == INT8_RUNNER:
                spec = BenchSpec(backend="onnxruntime-fused", path=str(int8_folder), **workload)
                result = {**asdict(spec), **measure_in_subprocess(spec)}
            else:
                spec = BenchSpec(backend=RUNNERS[runner], path=str(export), **workload)
                result = measure_in_subprocess(spec)
                result = {**asdict(spec), **result}
            result["label"] = runner
            results.append(result)
            rss_gb, took = result["peak_rss_bytes"] / 1e9, time.perf_counter() - t
            print(
                f"[{runner} @ {prompt_tokens}] {result['decode_tok_s']:.1f} tok/s, TTFT {result['ttft_s']:.2f} s, "
                f"peak RSS {rss_gb:.2f} GB ({took:.0f} s)",
                flush=True,
            )

    summary = compare(results, weight_bytes)
    print()
    print(format_table(results, weight_bytes))
    print()
    for line in summary["lines"]:
        print(line)
    report = {
        "checkpoint": str(checkpoint),
        "export": str(export),
        "weight_bytes_fp32": weight_bytes,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "load_after": other_load(),
        },
        "targets": TARGETS,
        "results": results,
        "comparison": summary["rows"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


def compare(results: list[dict], weight_bytes: int) -> dict:
    """Each runner against transformers at the same context: speedup, TTFT ratio, RSS over weights."""
    rows, lines = [], []
    base = {r["prompt_tokens"]: r for r in results if r["label"] == "transformers"}
    for r in results:
        b = base.get(r["prompt_tokens"])
        row = {
            "label": r["label"],
            "prompt_tokens": r["prompt_tokens"],
            "rss_over_weights": r["peak_rss_bytes"] / weight_bytes,
        }
        if b is not None and r is not b:
            row["decode_speedup"] = r["decode_tok_s"] / b["decode_tok_s"]
            row["ttft_ratio"] = r["ttft_s"] / b["ttft_s"]
            ok = (
                row["decode_speedup"] >= TARGETS["decode_speedup_min"]
                and row["ttft_ratio"] <= TARGETS["ttft_ratio_max"]
                and row["rss_over_weights"] <= TARGETS["rss_over_weights_max"]
            )
            row["meets_targets"] = ok
            lines.append(
                f"{r['label']:>18} @ {r['prompt_tokens']:>4}: decode {row['decode_speedup']:.2f}x "
                f"transformers, TTFT {row['ttft_ratio']:.2f}x, peak RSS {row['rss_over_weights']:.2f}x "
                f"weights -> {'meets' if ok else 'misses'} the targets"
            )
        rows.append(row)
    return {"rows": rows, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
