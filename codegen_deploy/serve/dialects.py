"""Editors' dialects: what codegen-serve does with fill-in-the-middle requests.

Two ways editors ask for fill-in-the-middle:
- a `suffix` field next to the prompt (Copilot-style clients on FauxPilot's engine path, Tabby's
  `openai/completion` kind send it on every request).
- a prompt wrapped in a model's FIM sentinels (Continue's autocomplete template for an unknown model is
  StarCoder's `<fim_prefix>...<fim_suffix>...<fim_middle>`; llama.vscode's OpenAI mode defaults to Qwen's).
  split_fim() finds the text before and after the cursor when the whole prompt has one of the layouts below.

A model with CodeGen2's fill-in-the-middle tokens fills in the middle in both cases (infill_parts() gives the
two texts; the tokenizer lays them out). CodeGen1 cannot: a suffix is ignored by default, as FauxPilot does
(with `--suffix error` it is refused with vLLM's words, which some clients detect to fall back to prefix-only),
and a wrapped prompt is cut to the text before the cursor (prompt_prefix()).

Each is said once in the server log (per layout for wrapped prompts), never per request.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ..errors import InputError
from .schemas import bad_request

log = logging.getLogger(__name__)
_noted: set[str] = set()  # what note_once() has logged in this process

SUFFIX_MODES = ("ignore", "error")

# vLLM's words exactly: clients match this text to retry without a suffix.
SUFFIX_UNSUPPORTED = "suffix is not currently supported"

# The layouts editors render, copied from their templates (Continue's core/autocomplete/templating/
# AutocompleteTemplate.ts; llama.vscode's openai_prompt_template; Tabby's prompt_template examples).
# {prefix}: the text before the cursor, kept. {suffix}: the text after it, and {context}: other files or a
# header before the layout (llama.vscode puts "Context:" and snippets before any template), both dropped.
FIM_LAYOUTS: dict[str, str] = {
    "starcoder": "{context}<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
    "qwen": "{context}<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",  # also CodeGemma, Granite 4
    "seed-coder": "{context}<[fim-prefix]>{prefix}<[fim-suffix]>{suffix}<[fim-middle]>",
    "codellama": "{context}<PRE> {prefix} <SUF>{suffix} <MID>",
    "deepseek": "{context}<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
    # The suffix comes first and nothing closes the prefix: the prompt must start with the layout.
    "codestral": "[SUFFIX]{suffix}[PREFIX]{prefix}",
    "codegeex": "<|user|>\n{context}<|code_suffix|>{suffix}<|code_prefix|>{prefix}<|code_middle|><|assistant|>\n",
}


@dataclass(frozen=True)
class FimParts:
    """A prompt in a fill-in-the-middle layout, taken apart: the text before the layout (other files, a header),
    before the cursor and after it."""

    layout: str
    context: str
    prefix: str
    suffix: str


@dataclass(frozen=True)
class _Layout:
    name: str
    pattern: re.Pattern[str]
    sentinels: tuple[str, ...]  # each must occur exactly once in a prompt of this layout


def _compile(name: str, template: str) -> _Layout:
    regex, sentinels = "", []
    for piece in re.split(r"(\{\w+\})", template):
        if piece in ("{context}", "{prefix}", "{suffix}"):
            regex += f"(?P<{piece[1:-1]}>.*)"
        elif piece:
            regex += re.escape(piece)
            sentinels.append(piece.strip())
    return _Layout(name, re.compile(regex, re.DOTALL), tuple(sentinels))


_LAYOUTS = [_compile(name, template) for name, template in FIM_LAYOUTS.items()]


def split_fim(prompt: str) -> FimParts | None:
    """The parts of a prompt that is, whole, a fill-in-the-middle layout of FIM_LAYOUTS with each of its
    sentinels exactly once; else None. Requiring the whole layout keeps ordinary code that mentions a sentinel
    intact."""
    for layout in _LAYOUTS:
        if not all(prompt.count(s) == 1 for s in layout.sentinels):
            continue
        match = layout.pattern.fullmatch(prompt)
        if match:
            parts = match.groupdict()
            return FimParts(layout.name, parts.get("context") or "", parts["prefix"], parts.get("suffix") or "")
    return None


def strip_fim(prompt: str) -> tuple[str, str | None]:
    """(the text before the cursor, the layout's name) when the whole prompt is a fill-in-the-middle layout
    (split_fim); else (prompt, None), the prompt unchanged."""
    parts = split_fim(prompt)
    return (prompt, None) if parts is None else (parts.prefix, parts.layout)


def infill_parts(prompt: str, suffix: str | None) -> tuple[str, str] | None:
    """For a model that fills in the middle: (the text before the gap, the text after it) of a request's
    prompt and suffix field, or of a prompt in one of FIM_LAYOUTS (the text before its layout, other files,
    goes before the prefix); None when the request asks for no infill."""
    if suffix is not None:
        return prompt, suffix
    parts = split_fim(prompt)
    if parts is None:
        return None
    note_once(
        f"infill:{parts.layout}",
        f"codegen-serve: prompts come wrapped in the {parts.layout} fill-in-the-middle layout; they are filled "
        "in with this model's own layout (said once per layout)",
    )
    return parts.context + parts.prefix, parts.suffix


def check_suffix_mode(mode: str) -> None:
    """Raise InputError for a `suffix` setting other than SUFFIX_MODES."""
    if mode not in SUFFIX_MODES:
        raise InputError(f"suffix must be one of {', '.join(SUFFIX_MODES)}, got {mode!r}")


def handle_suffix(mode: str, suffix: str | None) -> None:
    """Apply the `suffix` setting to a request's suffix: "error" refuses any suffix field with vLLM's 400
    (as vLLM does, an empty one too); "ignore" drops it, saying so in the log the first time."""
    if suffix is None:
        return
    if mode == "error":
        raise bad_request(SUFFIX_UNSUPPORTED, "suffix")
    if suffix:
        note_once(
            "suffix",
            "codegen-serve: requests send `suffix`; CodeGen1 cannot fill in the middle, so it is ignored and "
            "the prompt is continued (--suffix error refuses such requests with a 400 instead) (said once)",
        )


def prompt_prefix(prompt: str) -> str:
    """strip_fim()'s prefix of a string prompt, saying so in the log once per layout met."""
    prefix, layout = strip_fim(prompt)
    if layout is not None:
        note_once(
            f"fim:{layout}",
            f"codegen-serve: prompts come wrapped in the {layout} fill-in-the-middle layout; CodeGen1 cannot "
            "fill in the middle, so only the text before the cursor is used (said once per layout)",
        )
    return prefix


def note_once(key: str, message: str) -> None:
    """Log `message` as a warning the first time `key` is noted in this process."""
    if key not in _noted:
        _noted.add(key)
        log.warning(message)
