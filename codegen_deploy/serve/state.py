"""The state of one running server (one replica): its session, tokenizer, metrics and batcher."""

from __future__ import annotations

from .batcher import Batcher
from .metrics import Metrics
from .settings import ServeSettings


class ServerState:
    """The model, tokenizer, metrics and batcher of one running server (one replica)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        from ..model.tokenizer import load_tokenizer
        from ..runtime.backends import backend_options, default_backend, open_session

        self.settings = settings
        self.metrics = metrics
        backend = settings.backend or default_backend(settings.path)
        self.tokenizer = load_tokenizer(settings.tokenizer or settings.path)
        options = backend_options(
            backend, threads=settings.threads, providers=settings.providers, **settings.device_options
        )
        if settings.max_context:
            options["max_context"] = settings.max_context
        self.session = open_session(backend, settings.path, **options)
        self.vocab_size = self.session.config.vocab_size
        self.batcher = Batcher(
            self.session,
            self.tokenizer,
            settings.max_batch,
            settings.max_queue,
            metrics,
            cache_slots=settings.cache_slots,
            prefill_chunk=settings.prefill_chunk,
        )
        self.batcher.start()

    def close(self) -> None:
        """Stop the batcher, then close the session (unless a step is still running on it)."""
        # A step still running holds the session's buffers (ONNX Runtime writes to their addresses): closing
        # the session under it could crash the process, so a worker that did not end keeps the session.
        if self.batcher.stop():
            self.session.close()
