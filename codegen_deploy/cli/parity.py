"""codegen-parity: the same prompts through two backends, logits compared step by step."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..dtypes import DTYPES, torch_dtype
from ..errors import InputError
from ..runtime.backends import GRAPHS
from .common import (
    VERIFY_CHOICES,
    VERIFY_HELP,
    ArgumentParser,
    add_device_options,
    check_paths,
    float_in,
    int_at_least,
    run,
    session_options,
    threads_type,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="codegen-parity",
        description="Compare two backends on the same prompts: per-step max abs/rel logits difference, "
        "top-1 agreement (both fed the first backend's greedy tokens) and greedy token agreement. "
        "Exits with 3 when the difference exceeds the tolerance.",
    )
    p.add_argument("path", help="export folder (onnxruntime), engine folder (tensorrt) or checkpoint (torch)")
    p.add_argument(
        "--backends", default="torch,onnxruntime", help="two backends, the reference first (default: torch,onnxruntime)"
    )
    p.add_argument(
        "--reference",
        help="checkpoint for the torch backend (default: PATH if it is a checkpoint, "
        "else the checkpoint the export's manifest records)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: PATH)")
    p.add_argument(
        "--prompts",
        help="prompts file: .jsonl[.gz] with a 'prompt' field (e.g. HumanEval.jsonl.gz) "
        "or a text file (default: a few built-in code prompts)",
    )
    p.add_argument(
        "--num-prompts", type=int_at_least(0), default=4, help="use the first N prompts (default: 4; 0 = all)"
    )
    p.add_argument("--new-tokens", type=int_at_least(1), default=16, help="greedy tokens per prompt (default: 16)")
    p.add_argument(
        "--atol", type=float_in(0), help="pass when max|a-b| <= ATOL + RTOL * max|a| per step (default: by dtype)"
    )
    p.add_argument(
        "--rtol", type=float_in(0), help="relative logits tolerance, to the step's max|a| (default: by dtype)"
    )
    p.add_argument("--min-top1", type=float_in(0, 1), help="least top-1 agreement (default: by dtype)")
    p.add_argument(
        "--max-spread-error",
        type=float_in(0),
        help="largest logits' error relative to their spread (0 exact, 1 = logits doubled; default: 0.25 for int8,"
        " 0.6 for int4 weights, unchecked otherwise)",
    )
    p.add_argument(
        "--threads", type=threads_type, help="intra-op threads (torch, onnxruntime; at most the cores this machine has)"
    )
    p.add_argument("--providers", help="onnxruntime execution providers, e.g. cuda,cpu")
    p.add_argument("--graph", choices=GRAPHS, help="onnxruntime graph (default: auto)")
    add_device_options(p)
    p.add_argument("--reference-dtype", choices=DTYPES, default="float32", help="torch dtype (default: float32)")
    p.add_argument("--verify", choices=VERIFY_CHOICES, default="sha256", help=VERIFY_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return p.parse_args(argv)


def default_tolerance(session, path: str, tf32: bool = False):
    """The tolerance table's entry for what `session` runs: its dtype (the fused graph's dtype and quantized
    weights for the fused ONNX Runtime session), and TF32 when it was allowed on CUDA (--tf32, or the engine's
    build options)."""
    from ..artifacts.io_spec import MANIFEST_FILE
    from ..artifacts.manifest import FusedGraph, export_dtype, read_manifest
    from ..verify.tolerance import tolerance_for

    manifest = getattr(session, "manifest", None)
    if manifest is None and (Path(path) / MANIFEST_FILE).is_file():
        manifest = read_manifest(path, verify="none")
    manifest = manifest or {}
    fused = FusedGraph.of(manifest) if session.name == "onnxruntime-fused" else None
    dtype = fused.check_dtype if fused else export_dtype(manifest)
    weights = fused.lossy if fused else "float"
    on_cuda = "cuda" in str(getattr(session, "device", "cpu"))
    tf32 = tf32 or bool(manifest.get("options", {}).get("tf32"))  # a TensorRT engine built with TF32
    return tolerance_for(dtype, weights=weights, tf32=tf32 and on_cuda)


def command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    check_paths(args)  # before anything is loaded: a mistyped path is one line at once
    from ..model.tokenizer import load_tokenizer
    from ..runtime.backends import BACKENDS, open_session
    from ..verify.parity import compare_sessions
    from ..verify.prompts import load_prompts

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if len(backends) != 2 or any(b not in BACKENDS for b in backends):
        raise InputError(f"--backends takes two of {', '.join(BACKENDS)} separated by a comma, got {args.backends!r}")
    log = sys.stderr if args.json else sys.stdout
    # Prompts first: a bad prompt file is reported before the models load.
    tokenizer = load_tokenizer(args.tokenizer or args.path)
    prompts = [tokenizer.encode(p) for p in load_prompts(args.prompts, args.num_prompts)]
    for i, ids in enumerate(prompts):
        if not ids:
            raise InputError(f"prompt {i} of {args.prompts} is empty: remove it from the file")
    sessions, reference_dtype = [], torch_dtype(args.reference_dtype)
    for backend in backends:
        target = args.reference if backend == "torch" and args.reference else args.path
        options = session_options(args, backend, dtype=reference_dtype)
        start = time.perf_counter()
        sessions.append(open_session(backend, target, **options))
        print(f"opened {backend} on {target} in {time.perf_counter() - start:.1f} s", file=log, flush=True)
    given = {"atol": args.atol, "rtol": args.rtol, "min_top1": args.min_top1, "max_spread_error": args.max_spread_error}
    tolerance = replace(
        default_tolerance(sessions[1], args.path, args.tf32), **{k: v for k, v in given.items() if v is not None}
    )
    start = time.perf_counter()
    report = compare_sessions(sessions[0], sessions[1], prompts, args.new_tokens, tolerance, names=tuple(backends))
    took = time.perf_counter() - start
    print(f"compared {len(prompts)} prompts x {args.new_tokens} tokens in {took:.1f} s", file=log)
    for s in sessions:
        s.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    report.check()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
