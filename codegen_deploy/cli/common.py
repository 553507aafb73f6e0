"""What every command shares: one-line errors with an exit code, and the dtype option."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import CodegenDeployError

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    """The torch dtype for a --dtype value."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


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
