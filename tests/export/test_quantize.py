"""int8 projections: per-channel weights, per-token activations, run by MatMulIntegerToFloat."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codegen_deploy.artifacts.io_spec import TensorSpec
from codegen_deploy.export.graph import MS_DOMAIN, GraphWriter, make_model
from codegen_deploy.export.layers import linear
from codegen_deploy.export.quantize import ACTIVATION_MAX, INT8_WEIGHT_MAX, quantize_channels

ort = pytest.importorskip("onnxruntime")

K, N = 40, 24  # small enough for every tensor to stay inside the graph


def run_int8_linear(tmp_path, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """linear() of the int8 format as a one-projection graph, run on x [B, S, K]."""
    g = GraphWriter(tmp_path / "unused.data", "unused.data", np.dtype("float32"), "int8")
    y = linear(g, "x", torch.tensor(weight), "proj", torch.tensor(bias))
    g.output(y, "y")
    g.close()
    proto = make_model(
        g, "int8_linear", [TensorSpec("x", "float32", ("b", "s", K))], [TensorSpec("y", "float32", ("b", "s", N))]
    )
    proto.opset_import.add(domain=MS_DOMAIN, version=1)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return rng.normal(0, 0.05, (N, K)).astype(np.float32), rng.normal(0, 0.1, N).astype(np.float32)


def test_channels_are_quantized_symmetrically_in_matmul_layout():
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.05, (N, K)).astype(np.float32)
    weight[3] = 0.0  # a zero channel keeps a usable scale
    q, scales = quantize_channels(weight)
    assert q.dtype == np.int8 and q.shape == (K, N) and scales.shape == (N,)
    assert np.abs(q).max() == INT8_WEIGHT_MAX  # each nonzero channel's largest weight takes the top value
    assert np.isfinite(scales).all() and not q[:, 3].any()
    dequantized = q.T.astype(np.float32) * scales[:, None]
    assert np.all(np.abs(dequantized - weight) <= scales[:, None] / 2 + 1e-7)  # rounding error only


def test_int8_linear_is_the_quantized_product_per_token_and_channel(tmp_path, weights):
    weight, bias = weights
    x = np.random.default_rng(2).normal(0, 1, (2, 5, K)).astype(np.float32)
    y = run_int8_linear(tmp_path, x, weight, bias)
    # The same arithmetic in numpy: each token by its own scale (round half to even, as QuantizeLinear),
    # each output channel by its own.
    amax = np.abs(x).max(-1, keepdims=True)  # [B, S, 1]
    x_q = np.rint((x / amax) / np.float32(1 / ACTIVATION_MAX))  # [B, S, K] in [-127, 127]
    w_q, w_scales = quantize_channels(weight)
    expected = (x_q @ w_q.astype(np.float32)) * (amax / ACTIVATION_MAX) * w_scales + bias
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    exact = x @ weight.T + bias
    assert np.abs(y - exact).max() < 0.05 * np.abs(exact).max()  # lossy, but the same projection


def test_a_token_does_not_depend_on_the_others(tmp_path, weights):
    """Per-token scales: a prompt's tokens give what they give alone, whatever else is in the batch (one scale
    for the whole tensor would let the loud row below coarsen every other row)."""
    weight, bias = weights
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (1, 6, K)).astype(np.float32)
    loud = rng.normal(0, 50, (1, 6, K)).astype(np.float32)
    alone = run_int8_linear(tmp_path, x, weight, bias)
    together = run_int8_linear(tmp_path, np.concatenate([x, loud], axis=1), weight, bias)
    np.testing.assert_array_equal(together[:, :6], alone)
    one_token = run_int8_linear(tmp_path, x[:, 2:3], weight, bias)
    np.testing.assert_array_equal(one_token, alone[:, 2:3])


def test_a_zero_token_gives_the_bias(tmp_path, weights):
    weight, bias = weights
    x = np.zeros((1, 2, K), np.float32)
    x[0, 1] = 1.0
    y = run_int8_linear(tmp_path, x, weight, bias)
    np.testing.assert_array_equal(y[0, 0], bias)  # no 0 / 0 in the token's scale
