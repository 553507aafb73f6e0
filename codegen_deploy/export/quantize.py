"""Block quantization of MatMul weights for com.microsoft MatMulNBits (the fused graph's int8 / int4 option)."""

from __future__ import annotations

import numpy as np

from ..artifacts.manifest import FUSED_WEIGHTS

# (bits, block size) per weight format. The fused graph uses accuracy_level 4 (int8 activations):
# level 0 is slower than the float32 MatMul it replaces.
QUANTIZED_WEIGHTS = {"int8": (8, 64), "int4": (4, 128)}
WEIGHT_FORMATS = FUSED_WEIGHTS  # "float" and the keys of QUANTIZED_WEIGHTS


def quantize_blockwise(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization of weight [N, K] along K for MatMulNBits.

    Returns (packed uint8 [N, k_blocks, block * bits / 8], float32 scales [N, k_blocks]); the zero point
    is MatMulNBits' default 2^(bits - 1), so none is stored.
    """
    n, k = weight.shape
    k_blocks = -(-k // block)
    w = np.zeros((n, k_blocks * block), np.float32)
    w[:, :k] = weight
    w = w.reshape(n, k_blocks, block)  # [N, k_blocks, block]
    q_max = 2 ** (bits - 1) - 1
    scales = np.abs(w).max(axis=-1) / q_max  # [N, k_blocks]
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(w / scales[..., None]) + 2 ** (bits - 1), 0, 2**bits - 1).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # [N, k_blocks, block / 2]: first value in the low nibble
    return q, scales.astype(np.float32)
