"""Fill-in-the-middle exact match, in the style of HumanEval-infilling: gaps cut out of real code (one line, or a
block of 2 to 4 lines), the model given the code before and after, its middle (up to <eom>; a single line's up to
the end of its first line, as single-line infilling is scored) compared with the line(s) cut out: exact match,
and the edit similarity of the two (difflib's ratio, 0..1), which grades a model too weak to match exactly. Gaps
are chosen by a seeded plan, so two exports are scored on the same gaps, paired.
"""

from __future__ import annotations

import difflib
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..errors import InputError
from ..runtime.generate import generate
from ..runtime.session import Session

KINDS = ("single-line", "multi-line")
MAX_GAPS = 10_000


@dataclass(frozen=True)
class Gap:
    """One gap: the text before, the middle cut out, the text after (`kind`: single-line or multi-line)."""

    source: str
    kind: str
    prefix: str
    middle: str
    suffix: str


def plan_gaps(texts: list[tuple[str, str]], count: int, seed: int = 0, before: int = 1500, after: int = 500):
    """`count` gaps, half of each kind, from (name, text) pairs: a line (or 2-4 lines) with code on it, cut out
    with at most `before` characters of text before it and `after` after it (the context a model holds)."""
    if not 1 <= count <= MAX_GAPS:
        raise InputError(f"the number of gaps must be between 1 and {MAX_GAPS}, got {count}")
    rng = random.Random(seed)
    candidates = []
    for name, text in texts:
        lines = text.splitlines(keepends=True)
        code = [i for i, line in enumerate(lines) if len(line.strip()) >= 4 and not line.lstrip().startswith("#")]
        candidates += [(name, lines, i) for i in code if i > 0]
    if not candidates:
        raise InputError("the texts hold no line of code to cut out: give source files")
    gaps = []
    for n in range(count):
        name, lines, i = rng.choice(candidates)
        kind = KINDS[n % 2]
        end = i + 1 if kind == "single-line" else min(len(lines), i + rng.randint(2, 4))
        prefix, suffix = "".join(lines[:i]), "".join(lines[end:])
        gaps.append(Gap(name, kind, prefix[-before:], "".join(lines[i:end]), suffix[:after]))
    return gaps


def answer(written: str, gap: Gap) -> str:
    """What is scored of a written middle: for a single-line gap, its first line with text on it."""
    if gap.kind != "single-line":
        return written
    lines = written.lstrip("\n").split("\n")
    return lines[0]


def matches(middle: str, expected: str) -> bool:
    """Exact match of a written middle, surrounding whitespace aside (where a line ends is the suffix's)."""
    return middle.strip() == expected.strip()


def similarity(middle: str, expected: str) -> float:
    """Edit similarity of a written middle to the expected one, surrounding whitespace aside (0..1)."""
    return difflib.SequenceMatcher(None, middle.strip(), expected.strip(), autojunk=False).ratio()


@dataclass(frozen=True)
class InfillReport:
    """Exact matches and mean edit similarity per kind of gap over the gaps scored, and each gap's result (for a
    paired comparison)."""

    model: str
    gaps: int
    exact: dict[str, float]
    similarity: dict[str, float]
    matched: list[bool]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        scores = "  ".join(
            f"{kind} {100 * v:.1f} % (similarity {self.similarity[kind]:.3f})" for kind, v in self.exact.items()
        )
        return f"{self.model}: {self.gaps} gaps in {self.seconds:.0f} s, exact match {scores}"


def run_infill(
    session: Session,
    tokenizer,
    gaps: list[Gap],
    name: str,
    max_new_tokens: int = 64,
    progress: Callable[[str], None] | None = None,
    every: float = 5.0,
) -> InfillReport:
    """Fill each gap greedily (CodeGen2's layout: Tokenizer.infill) and score it."""
    tokenizer.infill("", "")  # a model that cannot fill in the middle is refused before any work
    matched, similar, start = [], [], time.perf_counter()
    last = start
    for n, gap in enumerate(gaps):
        prefix, suffix = _fit(tokenizer, gap, session.max_context - max_new_tokens)
        written = generate(session, tokenizer, prefix, suffix=suffix, max_new_tokens=max_new_tokens).text
        written = answer(written, gap)
        matched.append(matches(written, gap.middle))
        similar.append(similarity(written, gap.middle))
        if progress and (time.perf_counter() - last >= every or n == len(gaps) - 1):
            last = time.perf_counter()
            progress(f"filled {n + 1}/{len(gaps)} gaps, {sum(matched)} exact")
    exact, mean_similarity = {}, {}
    for kind in KINDS:
        at = [i for i, g in enumerate(gaps) if g.kind == kind]
        if at:
            exact[kind] = sum(matched[i] for i in at) / len(at)
            mean_similarity[kind] = sum(similar[i] for i in at) / len(at)
    return InfillReport(name, len(gaps), exact, mean_similarity, matched, time.perf_counter() - start)


def _fit(tokenizer, gap: Gap, tokens: int) -> tuple[str, str]:
    """The gap's prefix and suffix, cut (the prefix from its start, the suffix from its end, a fifth at a time)
    until the fill-in-the-middle prompt has at most `tokens` tokens."""
    prefix, suffix = gap.prefix, gap.suffix
    while len(tokenizer.infill(prefix, suffix)) > tokens:
        if not prefix and not suffix:
            raise InputError(f"the context holds too few tokens ({tokens}) to fill a gap: give fewer --max-new-tokens")
        prefix, suffix = prefix[len(prefix) // 5 + 1 :], suffix[: len(suffix) * 4 // 5]
    return prefix, suffix
