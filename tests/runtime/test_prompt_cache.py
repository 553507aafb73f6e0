"""The prompt cache's rules as values: what a prompt reuses of a cache (with and without runs moved), and what the
prompt cache keeps within its bytes."""

from __future__ import annotations

import numpy as np

from codegen_deploy.runtime.prompt_cache import PromptCache, Reuse, reuse_plan
from codegen_deploy.runtime.session import SavedSlot


def _chunks(*starts, size=10) -> list[int]:
    return [t for s in starts for t in range(s, s + size)]


def test_a_rotated_ring_of_chunks_reuses_the_runs_it_kept_where_they_moved():
    old = _chunks(100, 200, 300, 400) + _chunks(1000, size=30)  # ring c1..c4, then the file
    new = _chunks(200, 300, 400, 500) + _chunks(1000, size=30)  # c1 dropped, c5 added
    assert reuse_plan(old, len(old), tuple(new), least=2) == Reuse(0)  # off: they share no prefix
    plan = reuse_plan(old, len(old), tuple(new), least=2, least_run=8)
    assert plan == Reuse(0, ((10, 0, 30),)) and plan.tokens == 30  # c2..c4 moved; c5 and the file computed
    assert reuse_plan(old, len(old), tuple(new), least=2, least_run=31) == Reuse(0)  # no run that long


def test_moved_runs_follow_the_prompt_order_and_leave_a_last_piece():
    old = _chunks(1, 100, 200, 300)
    cut = _chunks(1, 200, 300)  # a chunk cut out of the middle: the prefix stays, the rest moves
    assert reuse_plan(old, len(old), tuple(cut), least=2, least_run=5) == Reuse(10, ((20, 10, 18),))
    assert reuse_plan(old, 20, tuple(cut), least=2, least_run=5) == Reuse(10)  # only the part read as a prompt
    assert reuse_plan(old, len(old), tuple(cut), least=16, least_run=3) == Reuse(10, ((20, 10, 4),))
    # Runs in another order than the cache's: the first that follows is taken, the rest computed.
    swapped = _chunks(1, 300, 200)
    assert reuse_plan(old, len(old), tuple(swapped), least=2, least_run=5) == Reuse(10, ((30, 10, 10),))


def _saved(tokens: int, per_token: int = 100) -> SavedSlot:
    return SavedSlot((np.zeros(tokens * per_token, np.uint8),), (), tokens)


def test_the_prompt_cache_evicts_the_least_recently_used_to_fit_its_bytes():
    cache = PromptCache(capacity=10_000)
    for used, start in enumerate((1, 100, 200)):
        assert cache.put(list(range(start, start + 40)), _saved(40), used)  # 4,000 bytes each: two fit
    assert [e.cached[0] for e in cache.entries] == [100, 200] and cache.evictions == 1 and cache.nbytes == 8_000
    assert cache.put(list(range(100, 145)), _saved(45), 5)  # a longer version of a file replaces it
    assert [e.cached[0] for e in cache.entries] == [200, 100] and cache.evictions == 1
    assert cache.entries[1].prompt == 45
    assert not cache.put(list(range(500, 700)), _saved(200), 6)  # larger than the whole cache: not kept
    assert cache.nbytes <= cache.capacity
    cache.shrink(4_500)
    assert [e.cached[0] for e in cache.entries] == [100] and cache.evictions == 2
