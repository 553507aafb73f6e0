"""Typed errors for expected failures: each carries one line that says what is wrong and what to do.

The CLI prints `error: <message>` and exits with the error's `exit_code`; no traceback.
"""


class CodegenDeployError(Exception):
    """Base class for every expected failure of the toolkit."""

    exit_code = 2


class ConfigError(CodegenDeployError):
    """A config.json that is missing, unreadable or not a CodeGen model."""


class CheckpointError(CodegenDeployError):
    """Weights that are missing, truncated, of the wrong shape or with unknown keys."""


class TokenizerError(CodegenDeployError):
    """Tokenizer files that are missing or unreadable."""


class InputError(CodegenDeployError):
    """Bad user input: an empty prompt, a prompt longer than the context, a bad sampling value."""


class ExportError(CodegenDeployError):
    """An export or engine build that cannot be made from this model with these options."""


class ArtifactError(CodegenDeployError):
    """An output that cannot be written, or an export folder or engine that is incomplete, corrupted or
    made for another machine."""


class ValidationError(CodegenDeployError):
    """An export whose outputs differ from the reference by more than the tolerance."""

    exit_code = 3


class MissingDependencyError(CodegenDeployError):
    """An optional dependency (onnxruntime, tensorrt, CUDA) that this command needs is not installed."""
