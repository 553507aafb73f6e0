"""codegen-polygraphy EXPORT_DIR: compare ONNX Runtime and TensorRT outputs for one step with Polygraphy."""

from __future__ import annotations

from pathlib import Path

from .common import ArgumentParser, run


def command(argv: list[str] | None) -> int:
    from ..artifacts.engine import PROFILES
    from ..verify.polygraphy import compare_onnxruntime_tensorrt

    parser = ArgumentParser(prog="codegen-polygraphy", description=__doc__)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: EXPORT_DIR")
    parser.add_argument("--profile", choices=PROFILES, default="decode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = compare_onnxruntime_tensorrt(args.export_dir, args.engine_dir, args.profile, args.seed)
    print(report.table())
    report.check()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)
