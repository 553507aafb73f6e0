"""Moving cached keys to other positions: the rotary embedding is a rotation by the position's angle, so turning a
key by an offset's angle gives the key computed at the shifted position (what chunk reuse rests on)."""

from __future__ import annotations

import pytest
import torch

from codegen_deploy.model.reference import CodeGen
from codegen_deploy.runtime.session import move_positions
from tests.conftest import TEST_CONFIGS


@pytest.mark.parametrize("offset", [-37, -1, 5, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_turning_keys_by_an_offset_equals_computing_them_at_the_shifted_positions(offset, dtype):
    config = next(iter(TEST_CONFIGS.values()))
    model = CodeGen.random(config, seed=1, std=0.1, dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    start = max(0, -offset)

    def cache_at(first: int):
        positions = torch.arange(first, first + ids.shape[1])[None, :]  # [1, T]
        with torch.inference_mode():
            return model(ids, position_ids=positions)[1]  # per layer (keys, values), each [1, H, T, D]

    there, moved = cache_at(start), cache_at(start + offset)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}
    for (keys, values), (want_keys, want_values) in zip(there, moved, strict=True):
        # Only the positions differ: relative positions, and so every hidden state and value, are the same.
        torch.testing.assert_close(values, want_values, **tolerance)
        turned = torch.from_numpy(move_positions(keys.numpy(), offset, config.rotary_dim))
        torch.testing.assert_close(turned, want_keys, **tolerance)
        if offset:  # the check has the power to fail: unturned keys are not the shifted ones
            assert not torch.allclose(keys.float(), want_keys.float(), **tolerance)
