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


def cuda_provider_available() -> bool:
    """Whether the installed onnxruntime offers CUDAExecutionProvider (False without onnxruntime).

    From get_available_providers(), which lists the providers the build has without loading their libraries
    (reading the kernel registry instead loads them all, which crashes GPU machines without TensorRT's).
    It says nothing about a GPU being there: callers that run on one check that too.
    """
    try:
        ort = import_onnxruntime()
    except MissingDependencyError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()
