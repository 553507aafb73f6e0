"""What a new row may reuse of a cache, and the prompt cache: idle prompts' keys and values kept in host memory.

A row slot whose row has left keeps its cache until another row needs the slot; then that cache moves to the
prompt cache (a copy of its prompt part, SavedSlot), which keeps as many idle prompts as fit in its capacity in
bytes and evicts the least recently used first. A new row takes the cache, in a slot or in the prompt cache,
that gives it the most of its prompt (reusable, and with chunk reuse on, the runs moved to where they are now:
reuse_plan), and computes only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .session import SavedSlot, common_prefix


def reusable(cached: list[int], computed_as_prompt: int, prompt: tuple[int, ...], least: int) -> int:
    """Tokens of `prompt` that a cache (`cached`, whose first `computed_as_prompt` tokens were read as a prompt)
    can keep: what they share, only as far as it was read as a prompt in pieces of at least `least` tokens
    (Session.min_piece; generated tokens were computed in one-token steps, which round otherwise), and leaving a
    last piece of at least `least` tokens (it gives the first new token's logits)."""
    prompt_part = computed_as_prompt if computed_as_prompt >= least else 0  # a shorter prompt was one short run
    return max(0, min(common_prefix(cached, prompt), prompt_part, len(prompt) - least))


@dataclass(frozen=True)
class Reuse:
    """What a new row takes from one cache: its first `keep` tokens where they are, then runs moved to earlier
    positions, each (source, target, count), so that the row's first `tokens` prompt tokens are cached."""

    keep: int
    moves: tuple[tuple[int, int, int], ...] = ()

    @property
    def tokens(self) -> int:
        return self.keep + sum(count for _, _, count in self.moves)


def reuse_plan(
    cached: list[int], computed_as_prompt: int, prompt: tuple[int, ...], least: int, least_run: int = 0
) -> Reuse:
    """What `prompt` can reuse of a cache: the prefix they share (reusable), then, with `least_run` > 0, each
    following run of at least `least_run` tokens that the cache holds further on, in the order the prompt needs
    them (the text before them shrank: a chunk dropped from a ring of extra context, or the cut start of a long
    request). Runs come from the part read as a prompt and leave a last piece of `least` tokens to compute."""
    keep = reusable(cached, computed_as_prompt, prompt, least)
    part = cached[: computed_as_prompt if computed_as_prompt >= least else 0]
    limit = len(prompt) - least
    moves, at_cache, at_prompt = [], keep, keep
    while least_run > 0 and at_cache < len(part) and at_prompt < limit:
        n = 0
        while at_cache + n < len(part) and at_prompt + n < limit and part[at_cache + n] == prompt[at_prompt + n]:
            n += 1
        if n >= least_run:
            moves.append((at_cache, at_prompt, n))
            at_cache, at_prompt = at_cache + n, at_prompt + n
        else:
            at_cache += 1
    return Reuse(keep, tuple(moves))


@dataclass
class Entry:
    """An idle prompt in the prompt cache: the token ids its saved cache holds (all read as a prompt), and when
    it was last used (least-recently-used eviction)."""

    cached: list[int]
    saved: SavedSlot
    used: int

    @property
    def prompt(self) -> int:
        return len(self.cached)


@dataclass
class PromptCache:
    """Idle prompts' caches up to `capacity` bytes (0: none kept); `evictions` counts the prompts evicted to
    make room."""

    capacity: int
    entries: list[Entry] = field(default_factory=list)
    evictions: int = 0

    @property
    def tokens(self) -> int:
        return sum(e.prompt for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.saved.nbytes for e in self.entries)

    def put(self, cached: list[int], saved: SavedSlot, used: int) -> bool:
        """Keep a prompt's saved cache, evicting the least recently used prompts until it fits; an older copy
        that it extends goes first (the same file, shorter). False when it is larger than the whole capacity."""
        if saved.nbytes > self.capacity:
            return False
        self.entries = [e for e in self.entries if common_prefix(e.cached, cached) < e.prompt]
        self._evict(room=saved.nbytes)
        self.entries.append(Entry(list(cached), saved, used))
        return True

    def take(self, entry: Entry) -> Entry:
        """Remove `entry` (it moves into a slot)."""
        self.entries.remove(entry)
        return entry

    def shrink(self, capacity: int) -> None:
        """A new capacity; the least recently used prompts beyond it are evicted."""
        self.capacity = capacity
        self._evict(room=0)

    def _evict(self, room: int) -> None:
        """Evict the least recently used prompts until `room` more bytes fit."""
        held = self.nbytes
        for entry in sorted(self.entries, key=lambda e: e.used):
            if held + room <= self.capacity:
                break
            self.entries.remove(entry)
            held -= entry.saved.nbytes
            self.evictions += 1
