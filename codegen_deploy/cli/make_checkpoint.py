"""codegen-make-checkpoint: write a small CodeGen checkpoint in the HF layout, offline: random weights, or
trained for a few minutes on Python's standard library (--train)."""

from __future__ import annotations

import argparse
import json
import time

from ..dtypes import DTYPES, torch_dtype
from .common import ArgumentParser, int_at_least, progress_line, run

MAX_TRAIN_MINUTES = 24 * 60  # a longer number is a typo (seconds given as minutes), not a plan


def train_minutes(text: str) -> float:
    """An argparse type: minutes of training, more than 0 and at most MAX_TRAIN_MINUTES."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not 0 < value <= MAX_TRAIN_MINUTES:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_TRAIN_MINUTES} minutes, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ..model.make_checkpoint import SHAPES

    p = ArgumentParser(
        prog="codegen-make-checkpoint",
        description="Write a CodeGen checkpoint (config.json, weights, tokenizer) that needs no download: random "
        "weights, or with --train a model trained here on Python's standard library, which writes code-like text.",
    )
    p.add_argument("output", help="folder to create")
    p.add_argument("--shape", default="demo", choices=list(SHAPES), help="model shape (default: demo)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype (default: float32)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default: 0)")
    p.add_argument(
        "--tokenizer",
        help="copy these tokenizer files (e.g. a real CodeGen tokenizer folder) instead of training a small one",
    )
    p.add_argument("--layout", default="safetensors", choices=("safetensors", "bin"))
    p.add_argument("--shard-size-mb", type=int_at_least(1), help="split the weights into shards of at most this size")
    p.add_argument(
        "--train",
        type=train_minutes,
        metavar="MINUTES",
        help="train the model for this many minutes (wall clock, all cores) on this Python's standard library "
        "instead of leaving it random; progress goes to stderr, the training record to training.json",
    )
    p.add_argument(
        "--fim",
        action=argparse.BooleanOptionalAction,
        help="give the tokenizer CodeGen2's fill-in-the-middle tokens and, with --train, train for infilling too "
        "(default: for CodeGen2's layout only, e.g. --shape codegen2-tiny)",
    )
    return p.parse_args(argv)


def command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from ..model.make_checkpoint import make_checkpoint

    start = time.perf_counter()
    shard = None if args.shard_size_mb is None else args.shard_size_mb * 2**20
    out = make_checkpoint(
        args.output,
        shape=args.shape,
        dtype=torch_dtype(args.dtype),
        seed=args.seed,
        tokenizer=args.tokenizer,
        layout=args.layout,
        max_shard_bytes=shard,
        fim=args.fim,
        train_seconds=None if args.train is None else args.train * 60,
        progress=lambda line: progress_line(line, stderr=True),
    )
    elapsed = time.perf_counter() - start
    if args.train is None:
        print(f"wrote a random {args.shape} CodeGen checkpoint to {out} in {elapsed:.1f} s")
        return 0
    report = json.loads((out / "training.json").read_text())
    print(
        f"trained a {args.shape} CodeGen for {report['steps']} steps ({report['tokens']:,} tokens): held-out loss "
        f"{report['heldout_before']:.3f} -> {report['heldout_after']:.3f} nats/token; wrote it to {out} "
        f"in {elapsed:.0f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
