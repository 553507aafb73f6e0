"""CodeGen in plain PyTorch and its checkpoint loader.

CodeGen, load_checkpoint and save_checkpoint are imported on first use: the light modules of this package
(hub, tokenizer) must not pull torch in, so that a command checks its arguments in a fraction of a second.
"""

from __future__ import annotations

import importlib

__all__ = ["CodeGen", "load_checkpoint", "save_checkpoint"]

_HOMES = {"CodeGen": ".reference", "load_checkpoint": ".weights", "save_checkpoint": ".weights"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
