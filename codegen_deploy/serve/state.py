"""The state of one running server (one replica): its session, tokenizer, metrics and batcher, and how it stops."""

from __future__ import annotations

import asyncio
import logging
import weakref

from .batcher import Batcher
from .metrics import Metrics
from .settings import ServeSettings

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down: retry the request (on another replica, or once it is back)"


class ServerState:
    """The model, tokenizer, metrics and batcher of one running server (one replica).

    max_token_chars: the most characters one token stands for, so that a string prompt longer than the
    context can hold is refused without tokenizing it. runs: the completion requests being answered (their
    CompletionRuns); draining: set once the server is told to stop (begin_drain).
    """

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        from ..model.tokenizer import load_tokenizer
        from ..runtime.backends import backend_options, default_backend, open_session
        from ..runtime.sampling import SamplingConfig
        from ..runtime.speculate import make_drafter

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
        self.fim = self.tokenizer.fim_for(self.vocab_size)  # None: the model cannot fill in the middle
        self.max_token_chars = longest_token(self.tokenizer)
        self.runs: weakref.WeakSet = weakref.WeakSet()
        self.draining = False
        self._grace_timer: asyncio.TimerHandle | None = None
        draft_options = {"threads": settings.threads}
        self.drafter = make_drafter(settings.speculate, self.session, SamplingConfig(), settings.draft, **draft_options)
        self.batcher = Batcher(
            self.session,
            self.tokenizer,
            settings.max_batch,
            settings.max_queue,
            metrics,
            cache_memory=settings.cache_memory,
            cache_reuse=settings.cache_reuse,
            prefill_chunk=settings.prefill_chunk,
            drafter=self.drafter,
        )
        self.batcher.start()

    def begin_drain(self, grace: float) -> None:
        """The server stops (call on the event loop): new completion requests get a 503; those being answered
        have `grace` seconds to finish, then end_drain() ends the rest with an error."""
        if self.draining:
            return
        self.draining = True
        running = len(self.runs)
        if running:
            log.warning(
                "codegen-serve: stopping: %d request(s) running get %g s to finish (--shutdown-grace)", running, grace
            )
        self._grace_timer = asyncio.get_running_loop().call_later(grace, self.end_drain)

    def end_drain(self) -> None:
        """The grace period is over (on the event loop): rows still waiting or running stop, and the requests
        still being answered end now, streams with an error event, JSON answers with a 503."""
        self.draining = True
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self.batcher.stop(timeout=0)  # the worker leaves after its current step; nothing new starts
        runs = list(self.runs)
        if runs:
            log.warning("codegen-serve: shutdown grace over: ending %d request(s) with an error", len(runs))
        for run in runs:
            run.abort(SHUTTING_DOWN)

    def close(self) -> None:
        """Stop the batcher, then close the session (unless a step is still running on it)."""
        # A step still running holds the session's buffers (ONNX Runtime writes to their addresses): closing
        # the session under it could crash the process, so a worker that did not end keeps the session.
        if self.batcher.stop():
            self.session.close()
            if self.drafter is not None:
                self.drafter.close()


def longest_token(tokenizer) -> int:
    """The most characters any token of `tokenizer` decodes to, counted as UTF-8 bytes: a token covers at
    most that many characters of a text (a partial character decodes to U+FFFD, 3 bytes, which only
    overestimates), so a text of C characters needs at least C / longest_token tokens."""
    longest = 1
    for i in range(tokenizer.vocab_size):
        longest = max(longest, len(tokenizer.decode([i]).encode("utf-8", "replace")))
    return longest
