"""The one cost model of a session's runs, measured while it runs: what the schedulers decide with.

The law: a run that feeds j tokens to one row costs a step plus `token` seconds per extra token (the weights
are read once per run, so a step dominates a short run; each extra token adds its share of compute), and a
step over n rows costs steps[n]. Prompt pieces (append_slot), speculative checks (extend_slots) and plain
steps (step_slots) are all runs of this law, so each one teaches it. Until measured, an extra token is taken to
cost APPEND_TOKEN_COST of a step (measured on this CPU, 350M shape: fp32 a step 60 ms + 2.1 ms per token, int8
27 ms + 0.7 ms).
"""

from __future__ import annotations

APPEND_TOKEN_COST = 0.035
# Weight of the newest measurement in the moving averages the schedulers adapt to (the machine's load drifts).
NEWEST = 0.2
# A run of fewer tokens than this teaches nothing about the per-token cost: its time is mostly the step's (the
# difference of two noisy times), and its few extra tokens cost less than a prompt piece's do at a long context
# (measured in the editor trace: learnt from a drafting stream's 9-token checks, the first prompt piece next to
# that stream came out 3x the gap it was sized for). So prompt pieces teach it, speculative checks do not.
MIN_TOKENS_MEASURED = 16


def moving_average(old: float | None, new: float, weight: float = NEWEST) -> float:
    """`new` blended into `old` with `weight` (the first value as it is)."""
    return new if old is None else (1 - weight) * old + weight * new


class CostModel:
    """Seconds of a session's runs: steps[n] a step over n rows, token_s an extra token in a one-row run (moving
    averages). Costs are asked in steps of one row, so they mean something before anything is measured."""

    def __init__(self):
        self.steps: dict[int, float] = {}
        self.token_s: float | None = None

    def record_step(self, rows: int, seconds: float) -> None:
        """A step of `rows` rows (one token each) took `seconds`."""
        self.steps[rows] = moving_average(self.steps.get(rows), seconds)

    def record_run(self, tokens: int, seconds: float) -> None:
        """A run of `tokens` tokens for one row took `seconds`: a step when tokens is 1; with at least
        MIN_TOKENS_MEASURED tokens (a prompt piece), a step plus the extra tokens' cost, which it learns once a
        step's cost is known."""
        if tokens == 1:
            self.record_step(1, seconds)
            return
        step = self.step_seconds(1)
        if step is not None and tokens >= MIN_TOKENS_MEASURED:
            self.token_s = moving_average(self.token_s, max(seconds - step, 0.0) / (tokens - 1) + 1e-7)

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

    def piece_tokens(self, rows: int, gap_steps: float) -> int | None:
        """Prompt tokens one piece may hold so that the piece and the next step over `rows` generating rows take
        about `gap_steps` steps (None until a step and a token are measured): piece + step = (step + tokens x
        token) + step <= gap_steps x step."""
        step = self.step_seconds(rows)
        if step is None or self.token_s is None:
            return None
        return int((gap_steps - 2) * step / self.token_s)
