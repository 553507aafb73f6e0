"""codegen-bench: prefill latency, time to first token, decode tokens/s and peak RSS per backend."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import max_threads
from ..errors import CodegenDeployError, InputError
from ..runtime.speculate import SPECULATE_MODES
from .common import (
    VERIFY_CHOICES,
    VERIFY_HELP,
    ArgumentParser,
    add_device_options,
    check_paths,
    device_options,
    int_at_least,
    progress_line,
    run,
    threads_type,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="codegen-bench",
        description="Measure generation speed and memory of each backend on one model. Each backend runs in a "
        "process of its own (its peak RSS is its own); greedy decoding of random prompt tokens.",
    )
    p.add_argument("path", help="an export folder (onnxruntime backends) or checkpoint folder / hub id (torch)")
    p.add_argument(
        "--backends",
        default="torch,onnxruntime",
        help="comma-separated: torch, onnxruntime, tensorrt, onnxruntime-plain, onnxruntime-naive "
        "(plain graph, no IO binding), onnxruntime-fused (default: torch,onnxruntime)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=_lengths,
        default=[128],
        help="prompt length, or several comma-separated for a sweep, e.g. 128,512,1024 (default 128)",
    )
    p.add_argument("--new-tokens", type=int_at_least(3), default=128, help="greedy tokens to generate (default 128)")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="rows per batch (default 1)")
    p.add_argument(
        "--repeats", type=int_at_least(1), default=3, help="runs per backend; medians are reported (default 3)"
    )
    p.add_argument(
        "--threads",
        type=lambda text: 0 if text.strip() == "0" else threads_type(text),
        default=min(2, max_threads()),
        help="intra-op threads (default 2; 0 = the runtime's choice; at most the cores this machine has)",
    )
    p.add_argument("--reference", help="checkpoint for the torch backend when PATH is an export folder")
    p.add_argument("--providers", help="onnxruntime execution providers, e.g. cuda,cpu (default: what is installed)")
    add_device_options(p)
    p.add_argument("--verify", choices=VERIFY_CHOICES, default="sha256", help=VERIFY_HELP)
    p.add_argument(
        "--speculate",
        choices=SPECULATE_MODES,
        default="off",
        help="decode speculatively (batch 1; the random prompt gives prompt lookup little to find): lookup, "
        "draft (--draft), auto, off (default)",
    )
    p.add_argument("--draft", metavar="EXPORT", help="a smaller export with the same tokenizer to draft tokens")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw time to first token and decode tokens/s against prompt length, a line per backend "
        '(needs matplotlib: pip install "codegen-deploy[bench]")',
    )
    return p.parse_args(argv)


def _lengths(text: str) -> list[int]:
    """--prompt-tokens: one or more comma-separated whole numbers >= 1."""
    parse = int_at_least(1)
    return [parse(part.strip()) for part in text.split(",") if part.strip()] or [parse(text)]


def main_body(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every argument is checked before anything is measured: a mistake is one line at once.
    check_paths(args)
    from ..runtime.backends import backend_options
    from ..runtime.bench import (
        BenchSpec,
        bench_backends,
        check_plot_path,
        format_table,
        measure_in_subprocess,
        plot_results,
        resolve_backend,
    )
    from ..runtime.speculate import check_draft, check_draft_tokenizer

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in bench_backends()]
    if unknown or not backends:
        raise InputError(
            f"unknown backend {', '.join(unknown) or '(none)'} in --backends: choose from {', '.join(bench_backends())}"
        )
    if args.plot is not None:
        check_plot_path(args.plot)
    check_draft(args.speculate, args.draft)
    if args.draft is not None:
        check_draft_tokenizer(args.draft, args.path)
    results, failed = [], {}  # failed: backend -> why it could not be measured (not tried again)
    total, done, began = len(args.prompt_tokens) * len(backends), 0, time.perf_counter()
    # Backends take turns at each prompt length, so a drifting machine affects them alike.
    for prompt_tokens in args.prompt_tokens:
        for backend in backends:
            done += 1
            if backend in failed:
                continue
            path = args.reference if backend == "torch" and args.reference else args.path
            options = backend_options(
                resolve_backend(backend)[0], providers=args.providers, verify=args.verify, **device_options(args)
            )
            spec = BenchSpec(
                backend=backend,
                path=str(path),
                prompt_tokens=prompt_tokens,
                new_tokens=args.new_tokens,
                batch=args.batch,
                repeats=args.repeats,
                threads=args.threads or None,
                options=options,
                speculate=args.speculate,
                draft=args.draft,
            )
            progress_line(f"[{done}/{total}] measuring {backend} at {prompt_tokens} prompt tokens ...", stderr=True)
            start = time.perf_counter()
            try:
                results.append(measure_in_subprocess(spec))
            except CodegenDeployError as e:  # one backend missing or broken: the others' results still count
                failed[backend] = e
                progress_line(
                    f"[{done}/{total}] {backend} failed after {time.perf_counter() - start:.1f} s", stderr=True
                )
                continue
            r, now = results[-1], time.perf_counter()
            progress_line(
                f"[{done}/{total}] {backend} at {prompt_tokens} prompt tokens: time to first token "
                f"{r['ttft_s'] * 1e3:.0f} ms, decode {r['decode_tok_s']:.1f} tokens/s ({now - start:.1f} s; "
                f"{now - began:.0f} s in all)",
                stderr=True,
            )
    if results:
        print(json.dumps(results, indent=2) if args.json else format_table(results))
    if args.plot is not None and results:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    for backend, e in failed.items():  # after the table, where a reader of the results looks
        print(f"error: {backend} could not be measured: {e}", file=sys.stderr)
    return max((e.exit_code for e in failed.values()), default=0)


def main(argv: list[str] | None = None) -> int:
    return run(main_body, argv)


if __name__ == "__main__":
    sys.exit(main())
