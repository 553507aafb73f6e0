"""What every command shares: one-line errors with an exit code, and the GPU device options."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import CodegenDeployError


def add_device_options(p, torch_device: bool = True) -> None:
    """The GPU options every runtime command takes: ONNX Runtime's CUDA provider options and the torch device."""
    p.add_argument("--device-id", type=int, help="GPU index for ONNX Runtime's CUDA provider (default 0)")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="let ONNX Runtime's CUDA provider use TF32 for float32 MatMul (faster, ~1e-3 less exact; off by default)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each decode step as a CUDA graph (fused float16 graph on the CUDA provider)",
    )
    if torch_device:
        p.add_argument("--device", help="torch device for the torch backend, e.g. cuda, cuda:1 (default: cpu)")


def device_options(args) -> dict:
    """The backend_options() keywords of add_device_options' arguments (unset ones as None)."""
    return {
        "device_id": args.device_id,
        "tf32": args.tf32 or None,
        "cuda_graph": args.cuda_graph or None,
        "device": getattr(args, "device", None),
    }


def run(command: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's body; expected failures print `error: ...` on one line and exit non-zero."""
    try:
        return command(argv) or 0
    except CodegenDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
