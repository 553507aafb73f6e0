"""Parity of two backends: the same token ids into two Sessions, logits compared step by step.

Session A (the reference) decodes greedily; both sessions are fed A's tokens (teacher forcing), so
every step compares logits for the same context. Per step: max absolute difference, max difference
relative to the largest |logit| of A, top-1 agreement, and whether every logit is within
|a - b| <= atol + rtol * |a|.

Greedy agreement end to end needs no second run: B decoding greedily on its own would produce A's
tokens exactly up to the first step where B's top-1 differs from A's token (until then its context is
the teacher-forced one), so the matched prefix is read off the teacher-forced steps.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, ValidationError
from ..runtime.session import Session

# Used when no prompt file is given: short code prompts in CodeGen's usual style.
BUILTIN_PROMPTS = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import numpy as np\n\n\ndef moving_average(values, window):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "# read a CSV file and print the sum of the second column\nimport csv\n\n",
)


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a .jsonl or .jsonl.gz file (HumanEval's layout: a "prompt" field per line), a text file
    (one prompt), or BUILTIN_PROMPTS when path is None; at most `limit` of them, in file order."""
    if path is None:
        prompts = list(BUILTIN_PROMPTS)
    else:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"prompt file {path} does not exist: give a .jsonl[.gz] file with a 'prompt' field")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                prompts = [row["prompt"] for row in rows]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path} is not JSON lines with a 'prompt' field on each line ({e})") from e
        else:
            prompts = [text]
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise InputError(f"{path} holds no prompts: give a file with at least one")
    return prompts


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria: every logit within atol + rtol * |reference|, and top-1 agreement >= min_top1."""

    atol: float = 1e-3
    rtol: float = 1e-3
    min_top1: float = 0.95

    @classmethod
    def for_dtype(cls, dtype: str, tf32: bool = False) -> Tolerance:
        """Defaults for an export of this dtype compared with a float32 reference, the one table of them.

        float32: 1e-3 (measured ~2e-6 on CPU and on CUDA with TF32 off). float32 with TF32 (CUDA's --tf32):
        MatMul inputs rounded to 10 mantissa bits, measured 2.0e-3 max abs on the 350M shape on an H200, so
        1e-2. float16: 5e-2 (measured 5.9e-3 on CUDA, 5.2e-3 on CPU). bfloat16: 8 mantissa bits against
        float16's 11, so 8x float16's bound and top-1 >= 85% (not yet measured on a GPU).
        """
        if dtype == "bfloat16":
            return cls(atol=4e-1, rtol=4e-1, min_top1=0.85)
        if dtype == "float16":
            return cls(atol=5e-2, rtol=5e-2, min_top1=0.9)
        if tf32:
            return cls(atol=1e-2, rtol=1e-2, min_top1=0.95)
        return cls()


@dataclass
class StepStat:
    """One compared step of one prompt (step 0 is the prompt's prefill)."""

    step: int
    max_abs: float
    max_rel: float
    top1_a: int
    top1_b: int
    within_tolerance: bool

    @property
    def top1_agrees(self) -> bool:
        return self.top1_a == self.top1_b


@dataclass
class PromptParity:
    """All steps of one prompt. greedy_match: how many of A's greedy tokens B reproduces on its own."""

    index: int
    prompt_tokens: int
    truncated: bool
    tokens_a: list[int]
    steps: list[StepStat] = field(default_factory=list)

    @property
    def greedy_match(self) -> int:
        for s in self.steps:
            if not s.top1_agrees:
                return s.step
        return len(self.steps)

    @property
    def max_abs(self) -> float:
        return max(s.max_abs for s in self.steps)

    @property
    def max_rel(self) -> float:
        return max(s.max_rel for s in self.steps)

    @property
    def top1_agreement(self) -> float:
        return sum(s.top1_agrees for s in self.steps) / len(self.steps)

    @property
    def within_tolerance(self) -> bool:
        return all(s.within_tolerance for s in self.steps)


@dataclass
class ParityReport:
    """The comparison of backend A (reference) with backend B over several prompts."""

    backend_a: str
    backend_b: str
    new_tokens: int
    tolerance: Tolerance
    prompts: list[PromptParity]

    @property
    def max_abs(self) -> float:
        return max(p.max_abs for p in self.prompts)

    @property
    def max_rel(self) -> float:
        return max(p.max_rel for p in self.prompts)

    @property
    def top1_agreement(self) -> float:
        steps = [s for p in self.prompts for s in p.steps]
        return sum(s.top1_agrees for s in steps) / len(steps)

    @property
    def greedy_agreement(self) -> float:
        """Mean fraction of A's greedy tokens that B reproduces before diverging."""
        return float(np.mean([p.greedy_match / len(p.steps) for p in self.prompts]))

    @property
    def identical_prompts(self) -> int:
        """Prompts whose greedy tokens are identical on both backends over all new tokens."""
        return sum(p.greedy_match == len(p.steps) for p in self.prompts)

    @property
    def passed(self) -> bool:
        tol = self.tolerance
        return all(p.within_tolerance for p in self.prompts) and self.top1_agreement >= tol.min_top1

    def failures(self) -> list[str]:
        """What exceeds the tolerance, one phrase each (empty when passed)."""
        out = []
        bad = [p.index for p in self.prompts if not p.within_tolerance]
        if bad:
            out.append(
                f"logits beyond atol {self.tolerance.atol:g} + rtol {self.tolerance.rtol:g} on prompts "
                f"{', '.join(map(str, bad))} (max abs {self.max_abs:.3g})"
            )
        if self.top1_agreement < self.tolerance.min_top1:
            out.append(f"top-1 agreement {self.top1_agreement:.1%} below {self.tolerance.min_top1:.1%}")
        return out

    def check(self) -> None:
        """Raise ValidationError (exit code 3) if the backends differ beyond the tolerance."""
        if not self.passed:
            raise ValidationError(
                f"{self.backend_b} differs from {self.backend_a}: {'; '.join(self.failures())}: "
                "check the export (dtype, opset) or loosen --atol/--rtol if the difference is expected"
            )

    def table(self) -> str:
        """A readable table: one row per prompt and a total row."""
        head = f"{'prompt':>6} {'tokens':>6} {'max abs':>10} {'max rel':>10} {'top-1':>7} {'greedy':>9}  status"
        lines = [f"parity: {self.backend_a} (reference) vs {self.backend_b}, {self.new_tokens} new tokens", head]
        for p in self.prompts:
            tokens = f"{p.prompt_tokens}{'*' if p.truncated else ''}"
            lines.append(
                f"{p.index:>6} {tokens:>6} {p.max_abs:>10.3g} {p.max_rel:>10.3g} {p.top1_agreement:>7.1%} "
                f"{f'{p.greedy_match}/{len(p.steps)}':>9}  {'ok' if p.within_tolerance else 'FAIL'}"
            )
        lines.append(
            f"{'all':>6} {'':>6} {self.max_abs:>10.3g} {self.max_rel:>10.3g} {self.top1_agreement:>7.1%} "
            f"{f'{self.identical_prompts}/{len(self.prompts)}':>9}  {'PASS' if self.passed else 'FAIL'}"
        )
        tol = self.tolerance
        note = "; * = prompt cut to fit" if any(p.truncated for p in self.prompts) else ""
        lines.append(
            f"tolerance: |a-b| <= {tol.atol:g} + {tol.rtol:g}*|a|, top-1 >= {tol.min_top1:.0%}; "
            f"max rel = max|a-b| / max|a|; greedy = A's greedy tokens B reproduces{note}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "backend_a": self.backend_a,
            "backend_b": self.backend_b,
            "new_tokens": self.new_tokens,
            "tolerance": asdict(self.tolerance),
            "passed": self.passed,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "top1_agreement": self.top1_agreement,
            "greedy_agreement": self.greedy_agreement,
            "identical_prompts": self.identical_prompts,
            "prompts": [
                {
                    "index": p.index,
                    "prompt_tokens": p.prompt_tokens,
                    "truncated": p.truncated,
                    "max_abs": p.max_abs,
                    "max_rel": p.max_rel,
                    "top1_agreement": p.top1_agreement,
                    "greedy_match": p.greedy_match,
                    "tokens_a": p.tokens_a,
                    "steps": [asdict(s) | {"top1_agrees": s.top1_agrees} for s in p.steps],
                }
                for p in self.prompts
            ],
        }


def compare_logits(a: np.ndarray, b: np.ndarray, step: int, tol: Tolerance) -> StepStat:
    """Statistics of one step's logits [V] (a: reference)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    diff = np.abs(a - b)
    scale = max(float(np.abs(a).max()), 1e-12)
    within = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(a)))
    return StepStat(step, float(diff.max()), float(diff.max() / scale), int(a.argmax()), int(b.argmax()), within)


def compare_sessions(
    a: Session,
    b: Session,
    prompts: list[list[int]],
    new_tokens: int = 16,
    tolerance: Tolerance | None = None,
    names: tuple[str, str] | None = None,
) -> ParityReport:
    """Run each prompt (batch 1) through both sessions for `new_tokens` greedy tokens of A; compare.

    A prompt that leaves no room for new_tokens in either context keeps its last tokens (marked truncated).
    """
    tolerance = tolerance or Tolerance()
    if new_tokens < 1:
        raise InputError(f"new_tokens must be >= 1, got {new_tokens}")
    if not prompts:
        raise InputError("no prompts to compare: give at least one prompt")
    room = min(a.max_context, b.max_context) - new_tokens
    if room < 1:
        raise InputError(
            f"{new_tokens} new tokens leave no room for a prompt in a context of "
            f"{min(a.max_context, b.max_context)} tokens: lower the number of new tokens"
        )
    results = []
    for index, ids in enumerate(prompts):
        if not ids:
            raise InputError(f"prompt {index} is empty: give at least one token")
        truncated = len(ids) > room
        ids = list(ids[-room:])
        result = PromptParity(index, len(ids), truncated, [])
        logits_a = a.prefill(np.array([ids]))
        logits_b = b.prefill(np.array([ids]))
        for step in range(new_tokens):
            stat = compare_logits(logits_a[0], logits_b[0], step, tolerance)
            result.steps.append(stat)
            result.tokens_a.append(stat.top1_a)
            if step + 1 < new_tokens:
                token = np.array([stat.top1_a])
                logits_a, logits_b = a.step(token), b.step(token)
        results.append(result)
    name_a, name_b = names or (a.name, b.name)
    return ParityReport(name_a, name_b, new_tokens, tolerance, results)
