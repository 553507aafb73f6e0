"""The server's Prometheus metrics (text format on GET /metrics), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: from a few ms per token on a GPU to many seconds for a long prompt on a busy CPU.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Requests by endpoint and status, generated tokens, prompt tokens reused from the prefix cache or
    computed, queue depth, active rows, idle slots keeping a cache, and latency histograms: time to first
    token (from submission) and per-token latency (between a row's consecutive tokens)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self._evictions = 0  # the engine's count when last seen (the counter adds what is new)
        r = self.registry
        self.requests = Counter(
            "codegen_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.generated_tokens = Counter("codegen_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("codegen_prompt_tokens", "Prompt tokens processed", registry=r)
        self.rows = Counter(
            "codegen_rows", "Rows (one per prompt and choice) that ended, by how they ended", ["finish"], registry=r
        )
        self.prompt_cache_tokens = Counter(
            "codegen_prompt_cache_tokens",
            "Prompt tokens by whether a cache held them (hit) or they were computed (miss)",
            ["result"],
            registry=r,
        )
        self.decode_runs = Counter(
            "codegen_decode_runs", "Runs of the model that produce tokens (steps and speculative checks)", registry=r
        )
        self.speculative_tokens = Counter(
            "codegen_speculative_tokens", "Drafted tokens and those the model accepted", ["kind"], registry=r
        )
        self.prompt_cache_lookups = Counter(
            "codegen_prompt_cache_lookups",
            "Rows by whether a cache held part of their prompt (hit) or none of it (miss)",
            ["result"],
            registry=r,
        )
        self.prompt_cache_evictions = Counter(
            "codegen_prompt_cache_evictions", "Idle prompts evicted from the prompt cache to make room", registry=r
        )
        self.prompt_cache_entries = Gauge(
            "codegen_prompt_cache_entries", "Idle prompts kept (in free row slots and the prompt cache)", registry=r
        )
        self.prompt_cache_held = Gauge("codegen_prompt_cache_held_tokens", "Tokens of the idle prompts", registry=r)
        self.prompt_cache_bytes = Gauge("codegen_prompt_cache_bytes", "Bytes of the idle prompts' caches", registry=r)
        self.prefill_chunk = Gauge(
            "codegen_prefill_chunk_tokens", "Prompt tokens the last round computed at most", registry=r
        )
        self.queue_depth = Gauge("codegen_queue_depth", "Rows waiting for a free row slot", registry=r)
        self.active_rows = Gauge("codegen_active_rows", "Rows generating in the running batch", registry=r)
        self.ttft = Histogram(
            "codegen_time_to_first_token_seconds",
            "From submission to a row's first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "codegen_time_per_output_token_seconds",
            "Between a row's consecutive tokens",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )

    def token(self, seconds: float, first: bool) -> None:
        """One generated token, `seconds` after the row's previous token (or its submission when first)."""
        self.generated_tokens.inc()
        (self.ttft if first else self.token_latency).observe(seconds)

    def row_ended(self, finish: str) -> None:
        """A row left the batch: "stop", "length", "cancelled" (its client went away) or "error"."""
        self.rows.labels(finish=finish).inc()

    def speculation(self, drafted: int, accepted: int) -> None:
        """One speculative check of a row: `drafted` tokens proposed, `accepted` kept; one model run."""
        self.speculative_tokens.labels(kind="drafted").inc(drafted)
        self.speculative_tokens.labels(kind="accepted").inc(accepted)
        self.decode_runs.inc()

    def prompt_cache(self, hit: int, miss: int) -> None:
        """A row's prompt: `hit` tokens reused from a cache, `miss` tokens to compute (a hit when `hit` > 0)."""
        self.prompt_cache_tokens.labels(result="hit").inc(hit)
        self.prompt_cache_tokens.labels(result="miss").inc(miss)
        self.prompt_cache_lookups.labels(result="hit" if hit else "miss").inc()

    def set_load(self, queue_depth: int, active_rows: int) -> None:
        self.queue_depth.set(queue_depth)
        self.active_rows.set(active_rows)

    def set_cache(self, state) -> None:
        """What the prompt cache holds (an engine.CacheState): entries, tokens and bytes; evictions so far."""
        self.prompt_cache_entries.set(state.entries)
        self.prompt_cache_held.set(state.tokens)
        self.prompt_cache_bytes.set(state.nbytes)
        self.prompt_cache_evictions.inc(max(0, state.evictions - self._evictions))
        self._evictions = max(self._evictions, state.evictions)

    def request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
