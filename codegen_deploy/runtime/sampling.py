"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Sampling draws from a numpy Generator seeded by the caller, so the same seed gives the same tokens
on every backend. The repetition penalty follows CTRL / Hugging Face: a token already seen has a
positive logit divided by the penalty and a negative one multiplied by it.

The server's OpenAI extras (logit bias, presence and frequency penalties) live in SamplingConfig too; the
server's rows apply them with adjust_logits() before sample(), and report logprobs with token_logprobs().
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. temperature 0 means greedy (argmax); top_k 0 and top_p 1 switch those filters off.

    presence_penalty, frequency_penalty and logit_bias ((token id, bias) pairs) are OpenAI's; they act
    through adjust_logits() (the server's rows), not through sample() itself.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise InputError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise InputError(f"{name} must be a finite number (0 = off), got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if int(token) != token or token < 0 or not np.isfinite(bias):
                raise InputError(f"logit_bias needs (token id >= 0, finite bias) pairs, got ({token}, {bias})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether adjust_logits() changes anything (a bias or a penalty is set)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)

    def to_dict(self) -> dict:
        """The settings as a dict; the server's extras only when set, so codegen-generate's JSON keeps its keys."""
        d = asdict(self)
        for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
            if not d[name]:
                del d[name]
        return d


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Penalise tokens already seen: logits [B, V] float, seen [B, V] bool. Returns a new array."""
    if penalty == 1.0:
        return logits
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row [B, V] (ties at the k-th value are kept); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]  # [B, 1]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one per row)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")  # [B, V] most likely first
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    # A token is kept if the mass before it is still below p; the first token is always kept.
    mass_before = np.cumsum(probs, axis=-1) - probs
    drop_sorted = mass_before >= p
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64; -inf entries get probability 0."""
    x = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def scale(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits [B, V] / temperature in float64, each row's largest value first taken away (softmax does not
    change). Dividing first would overflow a tiny temperature (1e-320) to +inf and make inf - inf = NaN in
    softmax; shifted, the largest logit is 0 whatever the temperature and the others go to -inf at worst, which
    is the T -> 0 limit of softmax(logits / T): the argmax (ties shared)."""
    x = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # a difference / a tiny T overflowing to -inf is the intended limit
        return (x - x.max(axis=-1, keepdims=True)) / temperature


def make_generators(config: SamplingConfig, batch: int) -> list[np.random.Generator]:
    """One Generator per row, each seeded with config.seed, so a row's tokens do not depend on its batch.

    With seed None the generators are seeded from the OS (different tokens on every run).
    """
    if config.seed is None:
        seeds = np.random.SeedSequence().spawn(batch)
        return [np.random.default_rng(s) for s in seeds]
    return [np.random.default_rng(config.seed) for _ in range(batch)]


def sample(
    logits: np.ndarray,
    config: SamplingConfig,
    generators: list[np.random.Generator] | None = None,
    seen: np.ndarray | None = None,
) -> np.ndarray:
    """Pick one token per row from logits [B, V]; returns int64 [B].

    seen [B, V] bool marks tokens for the repetition penalty. generators: one per row (see
    make_generators); needed unless the config is greedy.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    if generators is None or len(generators) != logits.shape[0]:
        raise InputError("sampling needs one random generator per row: use make_generators(config, batch)")
    scaled = scale(logits, config.temperature)
    scaled = filter_top_p(filter_top_k(scaled, int(config.top_k)), config.top_p)
    probs = softmax(scaled)
    cdf = np.cumsum(probs, axis=-1)  # [B, V]
    # Inverse-CDF draw: one uniform number per row from that row's own generator.
    u = np.array([g.random() for g in generators])[:, None] * cdf[:, -1:]  # [B, 1]
    picks = (cdf <= u).sum(axis=-1)
    # Never pick a token with probability 0 (u landing exactly on a flat part of the CDF).
    return np.minimum(picks, probs.shape[-1] - 1).astype(np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities [B, V] float64 of logits [B, V] (the model's own distribution)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def apply_presence_frequency_penalty(
    logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """OpenAI's penalties on logits [B, V] given counts [B, V] of tokens generated so far: subtract
    `presence` from every token seen at least once and `frequency` times its count. Returns a new array."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0) - frequency * counts


def adjust_logits(logits: np.ndarray, config: SamplingConfig, counts: np.ndarray | None = None) -> np.ndarray:
    """Apply config's logit bias, then its presence/frequency penalties over `counts` (tokens generated so
    far, same shape as logits; None: none yet), to logits [..., V]. Returns logits itself when nothing is
    set, else a new float32-based array (sample() takes either)."""
    if not config.adjusts_logits:
        return logits
    logits = logits.astype(np.float32, copy=True)
    # One pair at a time, in order: keeps the float32 additions (and so the tokens) as they always were.
    for token, bias in config.logit_bias:
        logits[..., token] += bias
    if counts is not None:
        logits = apply_presence_frequency_penalty(logits, counts, config.presence_penalty, config.frequency_penalty)
    return logits


def token_logprobs(logits: np.ndarray, token: int, top_n: int) -> tuple[float, dict[int, float]]:
    """The log-probability of `token` under raw logits [V] (the model's own distribution, before any sampling
    setting), and the top_n most likely tokens' {token: logprob}, most likely first ({} for top_n 0)."""
    lp = log_softmax(logits[None, :])[0]
    if top_n <= 0:
        return float(lp[token]), {}
    top = np.argpartition(-lp, top_n)[:top_n]
    return float(lp[token]), {int(t): float(lp[t]) for t in top[np.argsort(-lp[top])]}
