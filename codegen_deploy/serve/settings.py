"""What codegen-serve serves and how (ServeSettings), and the model-name check every model route makes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .chat_template import ChatTemplate
from .schemas import OpenAIError


@dataclass(frozen=True)
class ServeSettings:
    """What codegen-serve serves and how.

    path: export folder, engine or checkpoint; backend: torch | onnxruntime | tensorrt (default: the
    artifact's own). model_name: the name /v1/models lists; when given, requests naming another model get
    a 404 (when not, any model name is accepted and the folder's name is listed). api_key: when set, every
    route but /health needs `Authorization: Bearer KEY`. max_batch: rows generating at once; max_queue:
    rows waiting at most (429 beyond). threads, providers, max_context: the session's options;
    device_options: backend_options()' GPU keywords (device, device_id, tf32, cuda_graph). cache_memory:
    bytes of idle prompts' caches kept for prefix reuse (None: a share of the memory available at start, 0:
    off); cache_reuse: runs of at least this many tokens reused where they moved (0: off, approximate);
    prefill_chunk: prompt tokens computed between decode steps while rows generate (None: sized from measured
    costs; 0: whole prompts). max_body_mb: the largest request body taken (larger: 413, read no further);
    shutdown_grace: seconds that running requests get to finish when the server is told to stop, after which
    their streams end with an error event. speculate: speculative decoding of greedy rows, "auto" (a draft
    model given as `draft`, else prompt lookup, where the session runs it exactly), "lookup", "draft" or "off".
    """

    path: str
    backend: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    model_name: str | None = None
    api_key: str | None = None
    threads: int | None = None
    providers: str | None = None
    max_context: int | None = None
    tokenizer: str | None = None
    device_options: dict = field(default_factory=dict)
    suffix: str = "ignore"  # a request's `suffix`: "ignore" it (FauxPilot) or "error" (vLLM's 400); dialects.py
    cache_memory: int | None = None
    cache_reuse: int = 0
    prefill_chunk: int | None = None
    max_body_mb: float = 4.0
    shutdown_grace: float = 10.0
    speculate: str = "auto"
    draft: str | None = None
    chat_template: ChatTemplate | None = None

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.path).resolve().name

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def check_model(settings: ServeSettings, name: str | None, param: str) -> None:
    """Raise OpenAI's 404 when a request names a model other than the one this server is named to serve."""
    if settings.model_name is not None and name and name != settings.model_name:  # "": none given (llama.vscode)
        raise OpenAIError(
            404,
            f"The model `{name}` does not exist: this server serves `{settings.model_name}`",
            param=param,
            code="model_not_found",
        )


def check_served_name(settings: ServeSettings, name: str) -> None:
    """Raise OpenAI's 404 unless `name` is the name this server lists (GET /v1/models/{name})."""
    if name != settings.served_name:
        raise OpenAIError(
            404,
            f"The model `{name}` does not exist: this server serves `{settings.served_name}`",
            param="model",
            code="model_not_found",
        )
