"""The one import of onnxruntime: it is optional, so a missing install is a one-line error, not a traceback."""

from __future__ import annotations

from ..errors import MissingDependencyError


def import_onnxruntime(alternative: str | None = None):
    """The onnxruntime module, or a one-line MissingDependencyError that says how to install it.

    alternative: another way out that the caller offers (e.g. "export with --no-validate").
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            'onnxruntime is not installed: pip install "codegen-deploy[cpu]" (or "codegen-deploy[gpu]" on an '
            f"NVIDIA GPU machine){f', or {alternative}' if alternative else ''}"
        ) from e
    return onnxruntime
