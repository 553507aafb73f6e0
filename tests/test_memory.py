"""memory.lazy_zeros: a large zero buffer becomes resident only where it is written."""

from __future__ import annotations

import numpy as np

from codegen_deploy.memory import lazy_zeros, rss_bytes


def test_lazy_zeros_is_zero_writable_and_resident_only_where_written():
    shape = (4, 16, 2048, 64)  # 32 MB of float32, a slot cache's shape
    before = rss_bytes()
    cache = lazy_zeros(shape, np.float32)
    assert cache.shape == shape and cache.dtype == np.float32 and cache.flags.writeable
    cache[:, :, :3] = 1.0  # three tokens in every row and head: 64 regions, one 4 KB page each
    assert rss_bytes() - before < 4 * 2**20  # not all 32 MB, as with the huge pages np.zeros asks for
    assert cache[:, :, :3].min() == 1.0 and cache[:, :, 3:].max() == 0.0
    small = lazy_zeros((3,), np.int64)
    assert small.tolist() == [0, 0, 0]
