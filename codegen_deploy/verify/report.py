"""The one report of a comparison with a reference: a row of error statistics per compared output (export
validation, the Polygraphy engine check) or per prompt (backend parity), a verdict under one Tolerance, a
table for people, a dict for JSON and manifests, and check() that raises ValidationError (exit code 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ValidationError
from .tolerance import Tolerance


def _worst(a: float, b: float) -> float:
    """max(a, b), except that NaN wins (a NaN difference must never read as a small one)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@dataclass
class Row:
    """Error statistics of one compared output or prompt, over every comparison added to it.

    max_abs: the largest max|a - b|; max_rel: the largest max|a - b| / max|a| of one comparison;
    beyond: comparisons over the tolerance; top1_*: positions whose logits' argmax agree (logits only);
    greedy: (tokens the output under test reproduces before its first differing top-1, tokens compared),
    for rows that follow a greedy decode; err_sq, spread_sq: sums of the squared logits error and spread, each
    centred over the vocabulary (logits only; see spread_error); detail: extra JSON for to_dict.
    """

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    compared: int = 0
    beyond: int = 0
    top1_agree: int = 0
    top1_total: int = 0
    greedy: tuple[int, int] | None = None
    err_sq: float = 0.0
    spread_sq: float = 0.0
    detail: dict = field(default_factory=dict)

    def add(self, reference: np.ndarray, other: np.ndarray, tolerance: Tolerance, top1: bool = False) -> bool:
        """Compare one output with its reference; True when it is within the tolerance.

        top1: the arrays are logits [..., V]: also count positions whose argmax agrees and add up the spread error.
        """
        a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
        diff = float(np.abs(a - b).max(initial=0.0))
        scale = float(np.abs(a).max(initial=0.0))
        self.max_abs = _worst(self.max_abs, diff)
        self.max_rel = _worst(self.max_rel, diff / max(scale, 1e-12))
        within = diff <= tolerance.bound(scale)  # False for NaN too
        self.compared += 1
        self.beyond += not within
        if top1 and a.size:
            agree = a.argmax(-1) == b.argmax(-1)
            self.top1_agree += int(np.sum(agree))
            self.top1_total += int(np.size(agree))
            d = b - a
            self.err_sq += float(np.square(d - d.mean(-1, keepdims=True)).sum())
            self.spread_sq += float(np.square(a - a.mean(-1, keepdims=True)).sum())
        return within

    @property
    def spread_error(self) -> float | None:
        """The logits' error relative to their spread (tolerance.py), None where no logits were compared."""
        return _spread_error(self.err_sq, self.spread_sq) if self.top1_total else None

    @property
    def within(self) -> bool:
        return self.beyond == 0

    def to_dict(self) -> dict:
        out = {
            "name": self.name,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "within_tolerance": self.within,
        }
        if self.top1_total:
            out |= {"top1_agree": self.top1_agree, "top1_total": self.top1_total, "spread_error": self.spread_error}
        if self.greedy is not None:
            out["greedy_match"] = list(self.greedy)
        return out | self.detail


@dataclass
class Report:
    """A comparison of `subject` with `reference` (names for people), row by row, under `tolerance`.

    kind: what a row is ("output" or "prompt"); info: extra entries for to_dict (dtype, providers, ...);
    notes: extra lines for the table; advice: what to do when the check fails.
    """

    subject: str
    reference: str
    tolerance: Tolerance
    rows: list[Row] = field(default_factory=list)
    kind: str = "output"
    title: str = ""
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    advice: str = "check the export (dtype, opset), or loosen the tolerance if the difference is expected"

    @property
    def max_abs(self) -> float:
        return _fold(r.max_abs for r in self.rows)

    @property
    def max_rel(self) -> float:
        return _fold(r.max_rel for r in self.rows)

    @property
    def top1_agree(self) -> int:
        return sum(r.top1_agree for r in self.rows)

    @property
    def top1_total(self) -> int:
        return sum(r.top1_total for r in self.rows)

    @property
    def top1(self) -> float | None:
        """Top-1 agreement over every compared logits position (None when no logits were compared)."""
        return self.top1_agree / self.top1_total if self.top1_total else None

    @property
    def spread_error(self) -> float | None:
        """The logits' error relative to their spread over every compared logits position (None: no logits)."""
        if not self.top1_total:
            return None
        return _spread_error(sum(r.err_sq for r in self.rows), sum(r.spread_sq for r in self.rows))

    @property
    def greedy_agreement(self) -> float | None:
        """Mean fraction of the reference's greedy tokens reproduced before diverging (None: no greedy rows)."""
        greedy = [r.greedy for r in self.rows if r.greedy is not None]
        return float(np.mean([m / max(n, 1) for m, n in greedy])) if greedy else None

    @property
    def identical(self) -> int:
        """Rows whose greedy tokens are identical over every compared token."""
        return sum(r.greedy is not None and r.greedy[0] == r.greedy[1] for r in self.rows)

    def failures(self) -> list[str]:
        """Each way the comparison exceeds the tolerance, as a short phrase (empty: it passed)."""
        out = []
        bad = [r.name for r in self.rows if not r.within]
        if bad:
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            t = self.tolerance
            out.append(
                f"{shown} beyond {t.atol:g} + {t.rtol:g} * max|a| (max abs {self.max_abs:.3g}, "
                f"max rel {self.max_rel:.3g})"
            )
        if self.top1 is not None and self.top1 < self.tolerance.min_top1:
            out.append(f"top-1 agreement {self.top1:.1%} < {self.tolerance.min_top1:.0%}")
        bound, spread = self.tolerance.max_spread_error, self.spread_error
        if bound is not None and spread is not None and not spread <= bound:  # NaN fails
            out.append(f"logits' error {spread:.3g} of their spread > {bound:g}")
        return out

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failures()

    def check(self) -> None:
        """Raise ValidationError (exit code 3), with this report as its `report`, if the check failed."""
        if not self.passed:
            error = ValidationError(
                f"{self.subject} differs from {self.reference} beyond tolerance "
                f"({'; '.join(self.failures()) or 'nothing compared'}): {self.advice}"
            )
            error.report = self
            raise error

    def table(self) -> str:
        """A readable table: one row per output or prompt, a total row, the tolerance and the verdict."""
        width = max([len(self.kind), 3, *(len(r.name) for r in self.rows)])
        lines = [self.title or f"{self.subject} vs {self.reference}"]
        lines.append(f"{self.kind:<{width}} {'max abs':>10} {'max rel':>10} {'top-1':>9} {'greedy':>9}  status")
        for r in self.rows:
            top1 = f"{r.top1_agree}/{r.top1_total}" if r.top1_total else "-"
            greedy = f"{r.greedy[0]}/{r.greedy[1]}" if r.greedy is not None else "-"
            lines.append(
                f"{r.name:<{width}} {r.max_abs:>10.3g} {r.max_rel:>10.3g} {top1:>9} {greedy:>9}  "
                f"{'ok' if r.within else 'OVER'}"
            )
        top1 = f"{self.top1:.1%}" if self.top1 is not None else "-"
        greedy = f"{self.identical}/{len(self.rows)}" if self.greedy_agreement is not None else "-"
        lines.append(f"{'all':<{width}} {self.max_abs:>10.3g} {self.max_rel:>10.3g} {top1:>9} {greedy:>9}")
        if self.tolerance.max_spread_error is not None and self.spread_error is not None:
            lines.append(
                f"logits' error relative to their spread: {self.spread_error:.3g} (bound "
                f"{self.tolerance.max_spread_error:g}; 0 = exact, 1 = logits doubled or flat)"
            )
            lines.append(
                "lossy weights are judged by that error alone: top-1 and greedy agreement are informational "
                "(rounding flips near-tied tokens, and a greedy run differs from its first flipped token on, so "
                "greedy 0/N can pass)"
            )
        lines += self.notes
        lines.append(
            f"tolerance: {self.tolerance.describe()}; max rel = max|a-b| / max|a| (a: {self.reference})"
            + ("; greedy = reference's greedy tokens reproduced" if self.greedy_agreement is not None else "")
        )
        lines.append("PASSED" if self.passed else "FAILED: " + ("; ".join(self.failures()) or "nothing compared"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as JSON-ready data (codegen-parity --json, manifest.json's validation entries)."""
        return {
            "subject": self.subject,
            "reference": self.reference,
            "passed": self.passed,
            "failures": self.failures(),
            "tolerance": self.tolerance.to_dict(),
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "top1_agreement": self.top1,
            "spread_error": self.spread_error,
            "greedy_agreement": self.greedy_agreement,
            "identical": self.identical,
            **self.info,
            "rows": [r.to_dict() for r in self.rows],
        }


def _spread_error(err_sq: float, spread_sq: float) -> float:
    """sqrt(err_sq / spread_sq); NaN stays NaN, and any error over no spread at all is infinite."""
    if math.isnan(err_sq) or math.isnan(spread_sq):
        return math.nan
    if spread_sq <= 0.0:
        return 0.0 if err_sq <= 0.0 else math.inf
    return math.sqrt(err_sq / spread_sq)


def _fold(values) -> float:
    out = 0.0
    for v in values:
        out = _worst(out, v)
    return out
