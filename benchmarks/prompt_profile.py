"""Where a prompt's (or a decode step's) time goes in the fused graph: ONNX Runtime's profiler, time by op type.

Opens the fused graph of an export folder with SessionOptions.enable_profiling, runs a random prompt of
each length (batch 1, the cache bound in place as the session does), and sums the kernel times of the last
run by op type, with the projections split by role (qkv_proj, out_proj, fc_in, fc_out, lm_head), since they
are most of a prompt's work. Prints one table per length and writes JSON (default
benchmarks/results/prompt_profile.json).

    python benchmarks/prompt_profile.py /tmp/codegen-prompt-speed/codegen-350M-random-onnx-fused-int8
    python benchmarks/prompt_profile.py EXPORT --tokens 1024,2000 --threads 2 --runs 2
    python benchmarks/prompt_profile.py EXPORT --chunk 256     # the prompt in pieces of 256 tokens
    python benchmarks/prompt_profile.py EXPORT --tokens 128,1024 --decode 32   # decode steps after each prompt

With --decode N, the table is of the N one-token steps that follow the last prompt (per step: the time of each
row averaged over the steps), with the cache in the graph's own dtype (float32, float16 or int8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Node-name prefixes of the projections (layers.linear names them "<weight name>/<op>").
ROLES = ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out", "lm_head")


def role(node_name: str, op_type: str) -> str:
    """The row of the table a kernel's time goes to: a projection's role, else its op type."""
    for r in ROLES:
        if node_name.startswith(r) or f".{r}/" in node_name:
            return f"{op_type} {r.split('.')[-1]}"
    return op_type


def profile_prompt(
    folder: Path,
    tokens: int,
    threads: int,
    runs: int,
    config_entries: dict[str, str],
    chunk: int | None = None,
    decode: int = 0,
) -> dict:
    """Run `runs` prompts of `tokens` random ids; return the last one's wall time and its kernel times by row.

    chunk: run each prompt as consecutive pieces of this many tokens, each appended to the cache the pieces
    before it wrote (GroupQueryAttention then compares a piece with the tokens so far only, not the whole
    prompt: what a session that feeds long prompts in pieces would save). decode: report instead the mean of
    `decode` one-token steps after the last prompt.
    """
    from codegen_deploy.artifacts import io_spec
    from codegen_deploy.artifacts.manifest import manifest_config, read_manifest
    from codegen_deploy.runtime.backends.onnxruntime_fused import CACHE_NUMPY_DTYPES
    from codegen_deploy.runtime.ort import create_session, import_onnxruntime, session_options

    ort = import_onnxruntime()
    config = manifest_config(read_manifest(folder, verify="none"))
    options = session_options(ort, threads, config_entries)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="prompt-profile-"), "ort")
    session = create_session(folder / io_spec.FUSED_GRAPH_FILE, options, ["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, tokens + decode), dtype=np.int64)
    cache_shape = (1, config.n_head, tokens + decode, config.head_dim)
    kind = next(i.type for i in session.get_inputs() if i.name == io_spec.past_name(0, "key"))
    dtype = CACHE_NUMPY_DTYPES[kind]
    caches = [np.zeros(cache_shape, dtype) for _ in io_spec.past_names(config.n_layer)]
    binding = session.io_binding()
    for past, present, cache in zip(
        io_spec.past_names(config.n_layer), io_spec.present_names(config.n_layer), caches, strict=True
    ):
        binding.bind_cpu_input(past, cache)
        binding.bind_output(present, "cpu", 0, dtype, list(cache.shape), cache.ctypes.data)  # in place
    binding.bind_output(io_spec.LOGITS)
    if io_spec.LOGITS_TO_KEEP in [i.name for i in session.get_inputs()]:  # the last token's logits only
        binding.bind_cpu_input(io_spec.LOGITS_TO_KEEP, np.ones(1, np.int64))
    pieces = [(start, min(start + (chunk or tokens), tokens)) for start in range(0, tokens, chunk or tokens)]
    walls = []
    for _ in range(runs):
        start_time = time.perf_counter()
        for start, end in pieces:
            binding.bind_cpu_input(io_spec.INPUT_IDS, np.ascontiguousarray(ids[:, start:end]))
            binding.bind_cpu_input(io_spec.SEQLENS_K, np.array([end - 1], np.int32))  # GQA: tokens after it - 1
            binding.bind_cpu_input(io_spec.TOTAL_SEQUENCE_LENGTH, np.array(end, np.int32))
            session.run_with_iobinding(binding)
        walls.append(time.perf_counter() - start_time)
    if decode:
        step_walls = []
        for t in range(tokens, tokens + decode):
            start_time = time.perf_counter()
            binding.bind_cpu_input(io_spec.INPUT_IDS, np.ascontiguousarray(ids[:, t : t + 1]))
            binding.bind_cpu_input(io_spec.SEQLENS_K, np.array([t], np.int32))
            binding.bind_cpu_input(io_spec.TOTAL_SEQUENCE_LENGTH, np.array(t + 1, np.int32))
            session.run_with_iobinding(binding)
            step_walls.append(time.perf_counter() - start_time)
        walls = [float(np.median(step_walls))]
    trace = json.loads(Path(session.end_profiling()).read_text())
    # Kernel events carry the run they belong to only by order, and every run executes each node once: keep
    # the last prompt's share of them, or the decode steps'.
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs * len(pieces) + decode)
    kept = kernels[-decode * per_run :] if decode else kernels[-per_run * len(pieces) :]
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in kept:
        row = role(e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])
        totals[row] += e["dur"] / 1e6 / max(decode, 1)  # per decode step
        counts[row] += 1
    if decode:
        counts = {k: v // decode for k, v in counts.items()}  # nodes per step
    return {
        "tokens": tokens,
        "decode_steps": decode,
        "chunk": chunk,
        "wall_s": walls,
        "kernel_s": sum(totals.values()),
        "rows": sorted(
            ({"op": k, "seconds": v, "nodes": counts[k]} for k, v in totals.items()), key=lambda r: -r["seconds"]
        ),
    }


def format_profile(result: dict) -> str:
    """One table: op (role), seconds, share of the kernel time, node count."""
    total = result["kernel_s"]
    pieces = f" in pieces of {result['chunk']}" if result["chunk"] else ""
    if result.get("decode_steps"):
        pieces = f", then a decode step (mean of {result['decode_steps']}, wall: median)"
    runs = ", ".join(f"{w:.3f}" for w in result["wall_s"])
    lines = [
        f"{result['tokens']} tokens{pieces}: wall {result['wall_s'][-1]:.3f} s (runs: {runs}), kernels {total:.3f} s",
        f"  {'op':<32} {'seconds':>8} {'share':>6} {'nodes':>5}",
    ]
    for r in result["rows"]:
        lines.append(f"  {r['op']:<32} {r['seconds']:8.4f} {r['seconds'] / total:6.1%} {r['nodes']:5d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path, help="an export folder with decoder_fused.onnx")
    p.add_argument("--tokens", default="1024,2000", help="prompt lengths (default 1024,2000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=2, help="prompts per length; the last one is reported")
    p.add_argument("--chunk", type=int, help="run each prompt in pieces of this many tokens")
    p.add_argument("--decode", type=int, default=0, help="profile this many decode steps after each prompt")
    p.add_argument("--config", action="append", default=[], help="a session config entry KEY=VALUE (repeats)")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "prompt_profile.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    entries = dict(item.split("=", 1) for item in args.config)
    results = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        result = profile_prompt(args.export, tokens, args.threads, args.runs, entries, args.chunk, args.decode)
        results.append(result)
        print(format_profile(result), flush=True)
    report = {"export": str(args.export), "threads": args.threads, "chunk": args.chunk, "config": entries}
    report["results"] = results
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
