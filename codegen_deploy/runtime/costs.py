"""The one cost model of a session's runs, measured while it runs: what the schedulers decide with.

The law: a run that feeds j tokens to one row costs a step plus `token` seconds per extra token (the weights
are read once per run, so a step dominates a short run; each extra token adds its share of compute), and a
step over n rows costs steps[n]. An extra token's cost grows with the context it attends to (its attention reads
every cached position): token_s + context_s x (its position), both fitted to the runs measured. Prompt pieces
(append_slot), speculative checks (extend_slots) and plain steps (step_slots) are all runs of this law, so each
one teaches it. Until measured, an extra token is taken to cost APPEND_TOKEN_COST of a step (measured on this
CPU, 350M shape: fp32 a step 60 ms + 2.1 ms per token, int8 27 ms + 0.7 ms).

What a stream waits is a whole round, start to start (the engine's plan and commit and what the server does
around them included): rounds[n] a plain round over n generating rows, and read[n] how long the last round with
prompt pieces took beyond one. The pieces next to a stream are sized from that, fed back round by round; the law
sizes the first.
"""

from __future__ import annotations

import math

APPEND_TOKEN_COST = 0.035
# Weight of the newest measurement in the moving averages the schedulers adapt to (the machine's load drifts).
NEWEST = 0.2
# A run of fewer tokens than this teaches nothing about the per-token cost: its time is mostly the step's (the
# weights are read once whatever the run's tokens; the difference of two noisy times), and its few extra tokens
# cost less than a prompt piece's do at a long context. Measured in the editor trace: learnt from a drafting
# stream's 9-token checks, the first prompt piece next to that stream came out 3x the gap it was sized for. An
# editor's keystrokes (a few to 20 new tokens each) are such runs too. So prompt pieces teach it; speculative
# checks and keystrokes do not.
MIN_TOKENS_MEASURED = 32
# A run of this many tokens moves the per-token fit by NEWEST, a shorter one by its share of it.
FULL_WEIGHT_TOKENS = 128


def moving_average(old: float | None, new: float, weight: float = NEWEST) -> float:
    """`new` blended into `old` with `weight` (the first value as it is)."""
    return new if old is None else (1 - weight) * old + weight * new


class CostModel:
    """Seconds of a session's runs: steps[n] a step over n rows (moving averages); an extra token in a one-row
    run at context position x costs token_s + context_s x (a line fitted by least squares weighted to the newest
    runs). Costs are asked in steps of one row, so they mean something before anything is measured."""

    def __init__(self):
        self.steps: dict[int, float] = {}
        self.token_s: float | None = None
        self.context_s = 0.0
        # Weighted sums over the runs measured, newest weighted most: weight, x, y, x^2, x y (x: a run's mean
        # context position, y: its seconds per extra token).
        self._sums = [0.0] * 5
        # Whole rounds, as a stream sees them (the engine's plan and commit, the server's sending, the runs):
        # rounds[n] a round that steps n generating rows and reads no prompt; read[n] the last round over n rows
        # that read prompt tokens: how many, and the seconds it took beyond a plain round.
        self.rounds: dict[int, float] = {}
        self.read: dict[int, tuple[int, float]] = {}

    def record_step(self, rows: int, seconds: float) -> None:
        """A step of `rows` rows (one token each) took `seconds`."""
        self.steps[rows] = moving_average(self.steps.get(rows), seconds)

    def record_run(self, tokens: int, seconds: float, start: int = 0) -> None:
        """A run of `tokens` tokens for one row, after `start` cached tokens, took `seconds`: a step when tokens
        is 1; with at least MIN_TOKENS_MEASURED tokens (a prompt piece), a step plus the extra tokens' cost,
        which it learns once a step's cost is known."""
        if tokens == 1:
            self.record_step(1, seconds)
            return
        step = self.step_seconds(1)
        if step is None or tokens < MIN_TOKENS_MEASURED:
            return
        x, y = start + tokens / 2, max(seconds - step, 0.0) / (tokens - 1) + 1e-7
        weight = NEWEST * min(1.0, (tokens - 1) / FULL_WEIGHT_TOKENS)
        sample = (1.0, x, y, x * x, x * y)
        self._sums = [moving_average(old, new, weight) for old, new in zip(self._sums, sample, strict=True)]
        w, sx, sy, sxx, sxy = self._sums
        spread = w * sxx - sx * sx  # w^2 times the weighted variance of x
        slope = (w * sxy - sx * sy) / spread if spread > (16 * w) ** 2 else 0.0  # x spread over 16 tokens
        self.context_s = max(slope, 0.0)
        self.token_s = max((sy - self.context_s * sx) / w, 1e-7)

    def record_round(self, rows: int, pieces: list[tuple[int, int]], seconds: float) -> None:
        """A round that stepped `rows` generating rows and read `pieces` ((tokens, start) each) took `seconds`,
        from its start to the next round's."""
        if not pieces:
            self.rounds[rows] = moving_average(self.rounds.get(rows), seconds)
        elif rows in self.rounds:
            self.read[rows] = (sum(n for n, _ in pieces), max(seconds - self.rounds[rows], 1e-6))

    def step_seconds(self, rows: int) -> float | None:
        """A step over `rows` rows, measured (the nearest measured row count when that one is not yet)."""
        if rows in self.steps:
            return self.steps[rows]
        if not self.steps:
            return None
        return self.steps[min(self.steps, key=lambda n: abs(n - rows))]

    @property
    def token_ratio(self) -> float:
        """An extra token's cost in one-row steps."""
        step = self.steps.get(1)
        if self.token_s is None or not step:
            return APPEND_TOKEN_COST
        return self.token_s / step

    def run(self, tokens: int) -> float:
        """A one-row run of `tokens` tokens, in one-row steps."""
        return 1.0 + self.token_ratio * (tokens - 1)

    def share(self, rows: int) -> float:
        """A row's share of a plain step over `rows` rows, in one-row steps (until both are measured, a step
        over many rows is taken to cost as much as over one, which favours plain steps)."""
        one, many = self.steps.get(1), self.steps.get(rows)
        if rows == 1 or one is None or many is None:
            return 1.0 / rows
        return many / rows / one

    def piece_tokens(self, rows: int, gap_steps: float, start: int = 0) -> int | None:
        """Prompt tokens to read in a round over `rows` generating rows, the first piece after `start` cached
        tokens, so that the round takes about `gap_steps` plain rounds (None until a step and a token are
        measured). Fed back from the last such round: its tokens scaled by the time the pieces may take over the
        time they took (at most 1.5x more, or half), which follows what the law misses (the pieces' own
        overhead, a busier machine, the cost growing along a prompt); before any, from the law: plain round +
        step + t (token_s + context_s (start + t / 2)) <= gap_steps x plain round."""
        step, one = self.step_seconds(rows), self.step_seconds(1)
        if step is None or self.token_s is None:
            return None
        plain = self.rounds.get(rows, step)
        if rows in self.read:
            tokens, took = self.read[rows]
            return int(tokens * min(max((gap_steps - 1) * plain / took, 0.5), 1.5))
        room = (gap_steps - 1) * plain - one
        if room <= 0:
            return 0
        a, c = self.token_s + self.context_s * start, self.context_s / 2  # room = a t + c t^2
        if c <= 0:
            return int(room / a)
        return int((math.sqrt(a * a + 4 * c * room) - a) / (2 * c))
