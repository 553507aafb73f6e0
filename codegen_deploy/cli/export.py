"""codegen-export: a CodeGen checkpoint -> a verified ONNX export folder (and optionally a TensorRT engine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifacts.manifest import CACHE_DTYPES, METHODS, ROTARY_VARIANTS
from ..config import DATASETS, SIZES
from ..dtypes import DTYPES
from ..errors import ConfigError, MissingDependencyError
from ..export.quantize import QUANTIZED_WEIGHTS
from .common import ArgumentParser, check_paths, int_at_least, progress_line, run


def _engine_arguments(parser: argparse.ArgumentParser) -> bool:
    """Add the TensorRT builder's options; False when that part of the package is not there."""
    try:
        from .build_engine import add_engine_arguments
    except ImportError:
        return False
    add_engine_arguments(parser)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="codegen-export",
        description="Export a Salesforce CodeGen checkpoint to one ONNX decoder graph with past-key-value "
        "I/O, validated against the reference model with ONNX Runtime.",
    )
    src = p.add_argument_group("model (give --size or --model)")
    src.add_argument("--size", help=f"a published model size: {', '.join(SIZES)}")
    src.add_argument("--data", default="mono", help=f"its training data: {', '.join(DATASETS)} (default: mono)")
    src.add_argument("--model", help="a checkpoint folder or hub id (e.g. Salesforce/codegen-350M-mono)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and cache (same as --dtype float16)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights and cache dtype (default float32; logits are always float32)",
    )
    p.add_argument("--output", type=Path, help="folder to create (default: exports/codegen-<size>-<data>[-fp16])")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="built",
        help="how the plain decoder graph is made: written from the weights (default, seconds) or traced with "
        "torch.onnx.export(dynamo=True) (minutes; a second, independent construction)",
    )
    p.add_argument("--opset", type=int_at_least(1), help="ONNX opset (default: 17 built, the exporter's 20 traced)")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime check against the reference")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--external-data",
        action="store_true",
        help="always store the weights in decoder.onnx.data (default: only above 2 GB)",
    )
    p.add_argument(
        "--no-fused",
        action="store_true",
        help="skip the fused ONNX Runtime graph (GroupQueryAttention, in-place KV cache)",
    )
    p.add_argument(
        "--quantize",
        choices=tuple(QUANTIZED_WEIGHTS),
        help="quantized weights in the fused graph (lossy; the plain graph keeps the model dtype)",
    )
    p.add_argument(
        "--fused-rotary",
        choices=("auto", *ROTARY_VARIANTS),
        default="auto",
        help="where the fused graph applies the rotary: inside GroupQueryAttention (gqa), or with plain ops before "
        "it (graph, which ONNX Runtime's CUDA provider needs); auto (default): graph for float16/bfloat16 when "
        "onnxruntime offers the CUDA provider, else gqa",
    )
    p.add_argument(
        "--kv-cache",
        choices=("auto", *CACHE_DTYPES),
        default="auto",
        help="the fused graph's KV cache dtype: float16 halves the cache's bytes, int8 quarters them (more "
        "context and cached prompts per GB, for a small rounding; on CPU float16 decodes a little slower, int8 "
        "decodes faster and reads prompts slower); auto (default): float16 with --quantize, else the weights' dtype",
    )
    p.add_argument("--engine", action="store_true", help="also build a TensorRT engine into the output folder")
    _engine_arguments(p)
    return p


def resolve_dtype(args: argparse.Namespace) -> str:
    if args.fp16 and args.dtype not in (None, "float16"):
        raise ConfigError(f"--fp16 and --dtype {args.dtype} disagree: give one of them")
    return "float16" if args.fp16 else args.dtype or "float32"


def command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from ..atomic import check_output
    from ..config import hub_id
    from ..model.hub import local_sources

    # Every argument is checked before the pipeline (torch, onnx) is imported: a mistake is one line at once.
    dtype = resolve_dtype(args)
    if args.size is not None:
        hub_id(args.size, args.data)
    check_paths(args)
    if args.output is not None:  # an existing output without --force (export_model checks the default one)
        check_output(args.output, args.force, protect=local_sources(args.model))
    if args.engine:
        _require_engine_builder()
    from ..pipeline import export_model

    out = export_model(
        args.model,
        args.output,
        size=args.size,
        data=args.data,
        dtype=dtype,
        method=args.method,
        opset=args.opset,
        validate=not args.no_validate,
        force=args.force,
        external_data=True if args.external_data else None,
        fused=not args.no_fused,
        fused_weights=args.quantize or "float",
        fused_rotary=args.fused_rotary,
        fused_cache=args.kv_cache,
        progress=progress_line,
    )
    print(f"exported to {out}")
    if args.engine:
        from ..export.tensorrt import build_engine
        from .build_engine import engine_options_from_args

        engine = build_engine(out, engine_options_from_args(args))
        print(f"built {engine}")
    return 0


def _require_engine_builder() -> None:
    """Fail before a long export when --engine cannot work here (the builder's own one-line errors)."""
    try:
        from ..export import tensorrt
    except ImportError as e:
        raise MissingDependencyError(
            "this codegen-deploy has no TensorRT builder: drop --engine, or update codegen-deploy"
        ) from e
    tensorrt.require_tensorrt()


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
