"""HumanEval pass@k of a model, as the CodeGen paper measures it: n samples per problem (temperature, top-p
0.95), cut at the paper's stop sequences, each run with the problem's tests in a separate, time-limited
process (verify.execution), scored with the unbiased estimator of Chen et al. 2021.

Sample j of problem i is drawn with its own seed (of the run's seed, i and j), so two models sampled with one
seed draw from the same random stream: their samples pair up, and a comparison of two exports is paired.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..errors import InputError
from ..runtime.engine import BatchEngine, Row, RowSpec
from ..runtime.generate import check_context, drive
from ..runtime.sampling import SamplingConfig
from ..runtime.session import Session
from .execution import STOP_SEQUENCES, Outcome, check, pass_at_k, truncate

# The CodeGen paper's HumanEval pass@k (%) of its mono models (pass@1 / @10 / @100 at temperatures 0.2 / 0.6 /
# 0.8, top-p 0.95), shown beside a run on a checkpoint of that name.
PAPER_PASS_AT_K = {
    "codegen-350M-mono": {"pass@1": 12.76, "pass@10": 23.11, "pass@100": 35.19},
    "codegen-2B-mono": {"pass@1": 23.70, "pass@10": 36.64, "pass@100": 57.01},
    "codegen-6B-mono": {"pass@1": 26.13, "pass@10": 42.29, "pass@100": 65.82},
    "codegen-16B-mono": {"pass@1": 29.28, "pass@10": 47.00, "pass@100": 71.99},
}
MAX_SAMPLES = 1000


def paper_figures(source: str | None) -> dict[str, float] | None:
    """The paper's pass@k for a checkpoint whose name (a hub id or folder) names one of its mono models."""
    if not source:
        return None
    name = str(source).rstrip("/").rsplit("/", 1)[-1].lower()
    return next((figures for model, figures in PAPER_PASS_AT_K.items() if model.lower() == name), None)


def sample_seed(seed: int, problem: int, sample: int) -> int:
    """The seed of sample `sample` of problem `problem` in a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, problem, sample]).generate_state(1)[0])


def generate_samples(
    session: Session,
    tokenizer,
    problems: dict[str, dict],
    samples: int,
    sampling: SamplingConfig,
    max_new_tokens: int = 256,
    batch: int = 8,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    every: float = 5.0,
) -> list[tuple[str, str]]:
    """(task_id, completion) for `samples` samples of each problem's prompt, in batches of at most `batch`
    rows of one prompt, each completion cut at the paper's stop sequences."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise InputError(f"--samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    if samples > 1 and sampling.greedy:
        raise InputError("several samples of a greedy decode are all the same: give --temperature above 0")
    eos = set(tokenizer.end_ids)
    out: list[tuple[str, str]] = []
    start = last = time.perf_counter()
    for i, (task_id, problem) in enumerate(problems.items()):
        ids = tuple(tokenizer.encode(problem["prompt"]))
        check_context(session, len(ids), max_new_tokens)
        for first in range(0, samples, batch):
            rows = [
                Row(
                    RowSpec(ids, max_new_tokens, replace(sampling, seed=sample_seed(seed, i, j)), STOP_SEQUENCES),
                    tokenizer,
                    eos,
                )
                for j in range(first, min(first + batch, samples))
            ]
            for _ in drive(BatchEngine(session, len(rows), min(eos)), rows):
                pass
            out += [(task_id, truncate(row.text.final_text())) for row in rows]
        if progress and (time.perf_counter() - last >= every or i == len(problems) - 1):
            last = time.perf_counter()
            progress(f"sampled {i + 1}/{len(problems)} problems x {samples} ({time.perf_counter() - start:.0f} s)")
    return out


@dataclass(frozen=True)
class HumanEvalReport:
    """pass@k of one model over the problems it was run on, the paper's figures where known, and each
    problem's passing samples (for a paired comparison)."""

    model: str
    problems: int
    samples: int
    temperature: float
    top_p: float
    pass_at_k: dict[str, float]
    passed: dict[str, int]
    seconds: float
    paper: dict[str, float] | None = None

    @classmethod
    def of(cls, model: str, outcomes: list[Outcome], sampling: SamplingConfig, seconds: float, source=None):
        passed: dict[str, int] = {}
        for o in outcomes:
            passed[o.task_id] = passed.get(o.task_id, 0) + o.passed
        samples = len(outcomes) // max(len(passed), 1)
        return cls(
            model=model,
            problems=len(passed),
            samples=samples,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            pass_at_k={k: 100 * v for k, v in pass_at_k(outcomes).items()},
            passed=passed,
            seconds=seconds,
            paper=paper_figures(source),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        scores = "  ".join(f"{k} {v:.2f} %" for k, v in self.pass_at_k.items())
        lines = [
            f"{self.model}: {self.problems} problems x {self.samples} samples (temperature {self.temperature:g}, "
            f"top-p {self.top_p:g}) in {self.seconds:.0f} s",
            f"  {scores}",
        ]
        if self.paper:
            lines.append("  the paper: " + "  ".join(f"{k} {v:.2f} %" for k, v in self.paper.items()))
        return "\n".join(lines)


def compare(report: HumanEvalReport, reference: HumanEvalReport) -> dict[str, int]:
    """Problems where one model passes more samples than the other (paired by seed), and where they tie."""
    better = sum(report.passed[t] > reference.passed.get(t, 0) for t in report.passed)
    worse = sum(report.passed[t] < reference.passed.get(t, 0) for t in report.passed)
    return {"better": better, "worse": worse, "same": report.problems - better - worse}


def run_humaneval(
    session: Session,
    tokenizer,
    problems: dict[str, dict],
    samples: int,
    sampling: SamplingConfig,
    name: str,
    source: str | None = None,
    max_new_tokens: int = 256,
    batch: int = 8,
    seed: int = 0,
    timeout: float = 10.0,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[HumanEvalReport, list[tuple[str, str]]]:
    """Sample, execute and score: the report and the samples."""
    start = time.perf_counter()
    completions = generate_samples(
        session, tokenizer, problems, samples, sampling, max_new_tokens, batch, seed, progress=progress
    )

    def executed(done: int, total: int) -> None:
        if progress and (done == total or done % max(total // 10, 1) == 0):
            progress(f"executed {done}/{total} samples")

    outcomes = check(problems, completions, timeout=timeout, workers=workers, progress=executed)
    return HumanEvalReport.of(name, outcomes, sampling, time.perf_counter() - start, source), completions
