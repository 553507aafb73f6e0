"""A row's new tokens as text while it generates: where it ends (eos, stop strings) and what is safe to stream."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop sequence in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


class NoText:
    """A tokenizer stand-in for rows of token ids only (benchmarks on random weights, whose text means nothing)."""

    def decode(self, ids) -> str:
        return ""


class RowText:
    """One row's new tokens turned into text while it generates: it ends at an eos id or a stop string
    (found across token boundaries), and releases streaming pieces that are safe to show.

    push() each sampled token; piece() returns the new text that decodes cleanly (no multi-byte character
    split across tokens) and cannot be the start of a stop string; once done, rest() returns the last
    piece, so all pieces joined equal final_text(). finish_reason: "eos", "stop", or None while running.
    all_ids is the row's one list of token ids, its prompt's then its new ones (the engine's Row reads it).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], eos: set[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.all_ids = list(prompt_ids)
        self._start = len(self.all_ids)
        self.eos = eos
        self.stop = tuple(stop)
        self.finish_reason: str | None = None
        self.emitted = 0  # characters of the text already released by piece()
        # A character takes at most 4 byte tokens, so this many last tokens hold the longest stop sequence.
        self._window = 4 * max((len(s) for s in self.stop), default=0) + 4
        self._clean_ids = 0  # ids[:_clean_ids] decode to _clean_text, which ends on a whole character
        self._clean_text = ""

    @property
    def prompt_ids(self) -> list[int]:
        return self.all_ids[: self._start]

    @property
    def ids(self) -> list[int]:
        """The new tokens (a copy)."""
        return self.all_ids[self._start :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Append a sampled token (ignored once the row is done) and check for eos and stop strings."""
        if self.done:
            return
        self.all_ids.append(token)
        if token in self.eos:
            self.finish_reason = "eos"
        elif self.stop:
            window = self.all_ids[max(self._start, len(self.all_ids) - self._window) :]
            if find_stop(self.tokenizer.decode(window), self.stop) >= 0:
                self.finish_reason = "stop"

    def text(self) -> str:
        """The decode of all new ids, decoding only those after the last clean point (constant work per step).

        Byte-level BPE decodes to the bytes of its tokens joined, so text that ends on a whole character
        (no trailing U+FFFD) is a prefix of every longer decode and can be kept as is.
        """
        clean = self._start + self._clean_ids
        text = self._clean_text + self.tokenizer.decode(self.all_ids[clean:])
        if not text.endswith(REPLACEMENT_CHAR):
            self._clean_ids, self._clean_text = len(self.all_ids) - self._start, text
        return text

    def piece(self) -> str:
        """New text that is safe to stream now ("" if none): whole characters, no possible stop start."""
        if self.done:
            return ""
        text = self.text()
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        safe = len(text) - _held_back(text, self.stop)
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : safe], safe
        return piece

    def final_text(self) -> str:
        """The text of all new ids, an ending eos left out, cut before the first stop string."""
        ids = self.ids
        if ids and ids[-1] in self.eos:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids)
        cut = find_stop(text, self.stop) if self.stop else -1
        return text if cut < 0 else text[:cut]

    def rest(self) -> str:
        """The final text not yet released by piece() (call once the row is done or stopped)."""
        text = self.final_text()
        piece, self.emitted = text[self.emitted :], max(self.emitted, len(text))
        return piece


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop sequence."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
