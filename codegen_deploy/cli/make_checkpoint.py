"""codegen-make-checkpoint: write a small random CodeGen checkpoint in the HF layout, offline."""

from __future__ import annotations

import argparse
import time

from ..dtypes import DTYPES, torch_dtype
from .common import ArgumentParser, int_at_least, run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ..model.make_checkpoint import SHAPES

    p = ArgumentParser(
        prog="codegen-make-checkpoint",
        description="Write a random-weight CodeGen checkpoint (config.json, weights, tokenizer) that needs "
        "no download: the demo and the tests run on it.",
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
    )
    print(f"wrote a random {args.shape} CodeGen checkpoint to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
