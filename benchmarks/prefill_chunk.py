"""What a prompt chunk costs against a decode step: the data behind codegen-serve's --prefill-chunk default.

For each chunk size, on one fused session with row slots (as the server runs it): a long prompt appended
to a slot in chunks of that size (its total time: the time to first token of a prompt read in chunks)
and, between chunks, one decode step of another slot generating at --context tokens (as a stream next to
the prompt). Reports the chunk's time, the step's, the stream's gap in steps ((chunk + step) / step: what
the other user sees), and the prompt's total time against reading it whole. Chunk sizes are measured
round-robin (the machine drifts); medians over --rounds.

    python benchmarks/prefill_chunk.py EXPORT [--prompt 1024] [--chunks 16,32,64,128,256,512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from codegen_deploy.runtime import open_session


def measure(session, prompt: np.ndarray, chunk: int | None, stream_ids: np.ndarray) -> dict:
    """Read `prompt` into slot 1 in chunks of `chunk` (None: whole), stepping slot 0 between chunks."""
    session.truncate_slot(1, 0)
    chunks, steps = [], []
    size = chunk or len(prompt)
    start = time.perf_counter()
    for at in range(0, len(prompt), size):
        t = time.perf_counter()
        session.append_slot(1, prompt[at : at + size])
        chunks.append(time.perf_counter() - t)
        if chunk is not None:
            t = time.perf_counter()
            session.step_slots([0], [int(stream_ids[len(steps) % len(stream_ids)])])
            steps.append(time.perf_counter() - t)
            session.truncate_slot(0, len(stream_ids))  # the stream stays at its context length
    total = time.perf_counter() - start
    return {
        "chunk_s": statistics.median(chunks),
        "step_s": statistics.median(steps) if steps else 0.0,
        "total_s": total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens (default 1024)")
    p.add_argument("--context", type=int, default=256, help="the other stream's context (default 256)")
    p.add_argument("--chunks", default="16,32,64,128,256,512")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    sizes = [int(c) for c in args.chunks.split(",")]
    rng = np.random.default_rng(0)
    with open_session("onnxruntime", args.export, threads=args.threads) as session:
        vocab = session.config.vocab_size
        prompt = rng.integers(0, 50000 if vocab > 50000 else vocab, args.prompt)
        stream = rng.integers(0, 50000 if vocab > 50000 else vocab, args.context)
        session.open_slots(2)
        session.append_slot(0, stream)
        results: dict[str, list[dict]] = {str(s): [] for s in [*sizes, "whole"]}
        for r in range(args.rounds):
            for s in [*sizes, None]:
                results[str(s or "whole")].append(measure(session, prompt, s, stream))
            print(f"[round {r + 1}/{args.rounds}] done", flush=True)
    whole = statistics.median(m["total_s"] for m in results["whole"])
    rows = []
    for s in sizes:
        chunk = statistics.median(m["chunk_s"] for m in results[str(s)])
        step = statistics.median(m["step_s"] for m in results[str(s)])
        total = statistics.median(m["total_s"] for m in results[str(s)])
        rows.append(
            {
                "chunk": s,
                "chunk_ms": round(chunk * 1e3, 1),
                "step_ms": round(step * 1e3, 1),
                "gap_in_steps": round((chunk + step) / step, 2),
                "prompt_s": round(total, 2),
                "prompt_vs_whole": round(total / whole, 2),
            }
        )
    print(f"prompt {args.prompt} tokens read whole: {whole:.2f} s; the other stream at {args.context} tokens")
    print(f"{'chunk':>6} {'chunk ms':>9} {'step ms':>8} {'gap/steps':>10} {'prompt s':>9} {'vs whole':>9}")
    for r in rows:
        print(
            f"{r['chunk']:>6} {r['chunk_ms']:>9} {r['step_ms']:>8} {r['gap_in_steps']:>10} {r['prompt_s']:>9} "
            f"{r['prompt_vs_whole']:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps({"whole_s": whole, "rows": rows, "args": vars(args)}, default=str, indent=1))


if __name__ == "__main__":
    main()
