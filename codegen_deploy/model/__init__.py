"""CodeGen in plain PyTorch and its checkpoint loader."""

from .reference import CodeGen
from .weights import load_checkpoint, save_checkpoint

__all__ = ["CodeGen", "load_checkpoint", "save_checkpoint"]
