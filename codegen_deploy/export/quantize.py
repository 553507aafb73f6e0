"""Quantized MatMul weights for the fused graph's int8 / int4 option.

int8: one scale per output channel, for com.microsoft MatMulIntegerToFloat with activations quantized per
token (layers.linear_int8). ONNX Runtime runs that as MLAS's uint8 x int8 GEMM (AVX-512 VNNI, AMX), which a
long prompt needs: MatMulNBits' 8-bit kernel was barely faster than float32 at many rows.
int4: blocks along K for com.microsoft MatMulNBits (accuracy_level 4: level 0 is slower than the float32
MatMul it replaces); there is no uint8 x int4 GEMM to run it otherwise.
"""

from __future__ import annotations

import numpy as np

from ..artifacts.manifest import FUSED_WEIGHTS

QUANTIZED_WEIGHTS = ("int8", "int4")
WEIGHT_FORMATS = FUSED_WEIGHTS  # "float" and QUANTIZED_WEIGHTS
BLOCKWISE = {"int4": (4, 128)}  # (bits, block size) of the MatMulNBits formats
# int8 weights take [-63, 63] (7 bits): x86 CPUs without VNNI multiply uint8 x int8 pairs with vpmaddubsw,
# whose int16 sum saturates above 32767; 255 * 63 * 2 stays below it, 255 * 127 * 2 does not. The graph then
# gives the same result on every CPU its export check did not run on, for ~1.5x the logits error of [-127, 127].
INT8_WEIGHT_MAX = 63
# Activations take [-127, 127] per token, stored as uint8 with zero point 128 (the GEMM's fast kind).
ACTIVATION_MAX, ACTIVATION_ZERO_POINT = 127, 128


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


def quantize_channels(weight: np.ndarray, q_max: int = INT8_WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of weight [N, K] with one scale per output channel (row).

    Returns (int8 [K, N], MatMul's layout, values in [-q_max, q_max]; float32 scales [N]).
    """
    scales = np.abs(weight).max(axis=1) / q_max  # [N]
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(weight / scales[:, None]), -q_max, q_max).astype(np.int8)  # [N, K]
    return np.ascontiguousarray(q.T), scales.astype(np.float32)
