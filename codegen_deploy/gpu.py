"""Optional GPU dependencies, imported only when asked for: tensorrt and a CUDA device.

Each check raises a one-line MissingDependencyError that says what to install or where to run.
"""

from __future__ import annotations

from .errors import MissingDependencyError

TENSORRT_MISSING = 'tensorrt is not installed: pip install "codegen-deploy[gpu]" on a machine with an NVIDIA GPU'
NO_CUDA_GPU = (
    "no CUDA GPU is visible (torch.cuda.is_available() is False): run on a machine with an NVIDIA GPU, "
    "its driver and a CUDA build of torch"
)


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise MissingDependencyError saying how to install it."""
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError(TENSORRT_MISSING) from e
    return tensorrt


def require_cuda_gpu(device: int = 0) -> dict:
    """{"name", "compute_capability"} of the CUDA GPU, or raise MissingDependencyError when there is none.

    TensorRT's Python API has no device query, and torch (a dependency anyway, and the runtime's device
    allocator) has one, so we ask torch rather than adding cuda-python.
    """
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(NO_CUDA_GPU)
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def tensorrt_major(version: str) -> int:
    """10 for "10.16.1.11"."""
    return int(str(version).split(".")[0])
