"""Parity of two backends: the same token ids into two Sessions, logits compared step by step.

Session A (the reference) decodes greedily; both sessions are fed A's tokens (teacher forcing), so
every step compares logits for the same context. Each prompt is one row of the report: over its steps,
the max abs and max rel difference of the logits, top-1 agreement, and the greedy match.

Greedy agreement end to end needs no second run: B decoding greedily on its own would produce A's
tokens exactly up to the first step where B's top-1 differs from A's token (until then its context is
the teacher-forced one), so the matched prefix is read off the teacher-forced steps.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..runtime.session import Session
from .report import Report, Row
from .tolerance import Tolerance, tolerance_for


def _prompt_room(a: Session, b: Session, new_tokens: int) -> int:
    """The most prompt tokens that leave room for `new_tokens` in both sessions' contexts."""
    if new_tokens < 1:
        raise InputError(f"new_tokens must be >= 1, got {new_tokens}")
    context = min(a.max_context, b.max_context)
    if context - new_tokens < 1:
        raise InputError(
            f"{new_tokens} new tokens leave no room for a prompt in a context of {context} tokens: "
            "lower the number of new tokens"
        )
    return context - new_tokens


def compare_prompt(
    a: Session, b: Session, index: int, ids: list[int], room: int, new_tokens: int, tolerance: Tolerance
) -> Row:
    """One prompt (batch 1) through both sessions for `new_tokens` greedy tokens of A, as a report row.

    A prompt longer than `room` keeps its last tokens (marked truncated).
    """
    if not ids:
        raise InputError(f"prompt {index} is empty: give at least one token")
    truncated = len(ids) > room
    ids = list(ids[-room:])
    row = Row(f"{index} ({len(ids)}{'*' if truncated else ''} tokens)")
    tokens_a, steps, matched = [], [], None
    logits_a, logits_b = a.prefill(np.array([ids])), b.prefill(np.array([ids]))
    for step in range(new_tokens):
        within = row.add(logits_a[0], logits_b[0], tolerance, top1=True)
        top_a, top_b = int(logits_a[0].argmax()), int(logits_b[0].argmax())
        diff = float(np.abs(logits_a[0].astype(np.float64) - logits_b[0]).max())
        steps.append({"step": step, "max_abs": diff, "top1_a": top_a, "top1_b": top_b, "within_tolerance": within})
        tokens_a.append(top_a)
        if matched is None and top_a != top_b:
            matched = step
        if step + 1 < new_tokens:
            token = np.array([top_a])
            logits_a, logits_b = a.step(token), b.step(token)
    row.greedy = (new_tokens if matched is None else matched, new_tokens)
    row.detail = {"prompt_tokens": len(ids), "truncated": truncated, "tokens_a": tokens_a, "steps": steps}
    return row


def compare_sessions(
    a: Session,
    b: Session,
    prompts: list[list[int]],
    new_tokens: int = 16,
    tolerance: Tolerance | None = None,
    names: tuple[str, str] | None = None,
) -> Report:
    """Run each prompt (batch 1) through both sessions for `new_tokens` greedy tokens of A; compare.

    tolerance: default, the float32 one. A prompt that leaves no room for new_tokens in either context
    keeps its last tokens (marked truncated).
    """
    tolerance = tolerance or tolerance_for("float32")
    room = _prompt_room(a, b, new_tokens)
    if not prompts:
        raise InputError("no prompts to compare: give at least one prompt")
    rows = [compare_prompt(a, b, i, ids, room, new_tokens, tolerance) for i, ids in enumerate(prompts)]
    name_a, name_b = names or (a.name, b.name)
    notes = ["* = prompt cut to fit the context"] if any(r.detail["truncated"] for r in rows) else []
    return Report(
        subject=name_b,
        reference=name_a,
        tolerance=tolerance,
        rows=rows,
        kind="prompt",
        title=f"parity: {name_b} against the reference {name_a}, {new_tokens} new tokens, teacher-forced",
        info={"backend_a": name_a, "backend_b": name_b, "new_tokens": new_tokens},
        notes=notes,
        advice="check the export (dtype, opset) or loosen --atol/--rtol if the difference is expected",
    )
