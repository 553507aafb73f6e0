"""codegen-build-engine EXPORT_DIR: build a TensorRT engine (decoder.engine + engine.json) from an ONNX export.

`add_engine_arguments` and `engine_options_from_args` are shared with `codegen-export --engine`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifacts.engine import MAX_OPTIMIZATION_LEVEL, EngineOptions
from .common import ArgumentParser, run


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options (no --output: codegen-export has its own)."""
    g = parser.add_argument_group("TensorRT engine")
    g.add_argument("--max-batch", type=int, default=1, help="most rows per call (default 1)")
    g.add_argument(
        "--max-prompt",
        type=int,
        default=None,
        help="longest prompt run in one call; longer prompts run their tail token by token "
        "(default min(512, max context))",
    )
    g.add_argument(
        "--max-context", type=int, default=None, help="prompt + generated tokens (default: the model's n_positions)"
    )
    g.add_argument(
        "--workspace-mb",
        type=int,
        default=None,
        help="TensorRT workspace limit in MiB (default: TensorRT's, the device memory)",
    )
    g.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        help="timing cache file reused across builds (default: one per GPU in ~/.cache/codegen-deploy/tensorrt)",
    )
    g.add_argument(
        "--no-tf32",
        dest="tf32",
        action="store_false",
        help="full float32 matmuls in float32 engines (default: TensorRT's TF32 tensor cores)",
    )
    g.add_argument(
        "--opt-level",
        type=int,
        default=None,
        help=f"builder optimization level 0-{MAX_OPTIMIZATION_LEVEL} (default: TensorRT's, 3)",
    )


def engine_options_from_args(args: argparse.Namespace) -> EngineOptions:
    """EngineOptions from the arguments that add_engine_arguments declared."""
    return EngineOptions(
        max_batch=args.max_batch,
        max_prompt=args.max_prompt,
        max_context=args.max_context,
        workspace_mb=args.workspace_mb,
        timing_cache=args.timing_cache,
        builder_optimization_level=args.opt_level,
        tf32=args.tf32,
    )


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(
        prog="codegen-build-engine",
        description="Build a TensorRT engine (one engine, prompt and decode profiles) from a codegen-export folder.",
    )
    parser.add_argument("export_dir", type=Path, help="folder written by codegen-export")
    parser.add_argument(
        "--output", type=Path, default=None, help="folder for decoder.engine and engine.json (default: EXPORT_DIR)"
    )
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    from ..export.tensorrt import build_engine

    build_engine(args.export_dir, engine_options_from_args(args), output_dir=args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
