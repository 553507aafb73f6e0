"""The CodeGen decoder as ONNX nodes, shared by the plain and the fused graph; only attention differs.

Follows model/reference.py step by step: embedding, then per block one LayerNorm (float32) feeding
attention and the MLP in parallel, x + attn + mlp; final LayerNorm, lm_head, float32 logits.
Projections are MatMul (+ Add for biases) with weights stored [in, out], or, in the fused graph,
com.microsoft MatMulIntegerToFloat (int8) or MatMulNBits (int4) for quantized weights. `fused_ops`
picks the MLP activation: com.microsoft FastGelu / BiasGelu (fused graph) or standard ONNX ops (plain
graph: TensorRT and onnxruntime-genai read it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from ..artifacts import io_spec
from ..dtypes import to_numpy
from ..model.reference import CodeGen, rotary_tables
from .graph import MS_DOMAIN, GraphWriter
from .quantize import ACTIVATION_MAX, ACTIVATION_ZERO_POINT, BLOCKWISE, quantize_blockwise, quantize_channels

F32, I64 = np.dtype("float32"), np.dtype("int64")


def layer_norm(g: GraphWriter, x: str, ln: torch.nn.LayerNorm, name: str) -> str:
    """LayerNorm in float32 (fp16 variance overflows on large models), cast back to the graph's dtype."""
    w = g.weight(f"{name}.weight", to_numpy(ln.weight, F32))
    b = g.weight(f"{name}.bias", to_numpy(ln.bias, F32))
    x = g.cast(x, F32, f"{name}/to_fp32")
    y = g.op1("LayerNormalization", [x, w, b], name, axis=-1, epsilon=ln.eps)
    return g.cast(y, g.dtype, f"{name}/to_model_dtype", source=F32)


def linear(
    g: GraphWriter,
    x: str,
    weight: torch.Tensor | Callable[[], torch.Tensor],
    name: str,
    bias: torch.Tensor | None = None,
) -> str:
    """x @ weight.T (+ bias). Float: weight stored transposed, [in, out], as MatMul wants it. int8: per-channel
    weights and per-token activations (linear_int8). int4: MatMulNBits with weight [out, in] (torch's own
    layout) in blocks along `in`, the bias fused in.
    weight: [out, in], or a function that makes it (not called when the writer shares the tensor)."""
    get = weight if callable(weight) else lambda: weight
    if g.weight_format == "float":
        w = g.weight(f"{name}.weight", lambda: to_numpy(get().T.contiguous(), g.dtype))  # [in, out]
        y = g.op1("MatMul", [x, w], f"{name}/MatMul")
        if bias is not None:
            y = g.op1("Add", [y, g.weight(f"{name}.bias", to_numpy(bias, g.dtype))], f"{name}/Add")
        return y
    if g.weight_format in BLOCKWISE:
        return linear_blockwise(g, x, get(), name, bias, *BLOCKWISE[g.weight_format])
    return linear_int8(g, x, get(), name, bias)


def linear_blockwise(
    g: GraphWriter, x: str, weight: torch.Tensor, name: str, bias: torch.Tensor | None, bits: int, block: int
) -> str:
    """x @ weight.T (+ bias) as com.microsoft MatMulNBits: weight [out, in] (torch's own layout) quantized in
    blocks along `in` (quantize.quantize_blockwise), the bias fused in; accuracy_level 4 quantizes the
    activations to int8 inside the kernel, per row and block."""
    n, k = weight.shape
    packed, scales = quantize_blockwise(to_numpy(weight, F32), bits, block)
    inputs = [x, g.weight(f"{name}.weight_q{bits}", packed), g.weight(f"{name}.scales", scales.astype(g.dtype))]
    if bias is not None:
        inputs += ["", "", g.weight(f"{name}.bias", to_numpy(bias, g.dtype))]  # no zero points, no g_idx
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4}
    return g.op1("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN, **attrs)


def quantize_rows(g: GraphWriter, x: str) -> tuple[str, str]:
    """Each row (token) of x [..., K] quantized on its own: (uint8 [..., K] = round(127 x / amax) + 128,
    float32 amax [..., 1] = max|row|). Written once per x: qkv_proj and fc_in read the same ln_1 output.

    Per row, so a token's result never depends on the other tokens of its prompt or batch (a prompt in
    chunks gives what it gives at once). The activation scale is amax / 127: linear_int8 folds the 1 / 127
    into the weight scales, which saves a node per quantization (a decode step runs 3 per layer).
    """

    def make() -> tuple[str, str]:
        name = f"{x}/quantize_rows"
        x32 = g.cast(x, F32, f"{name}/to_fp32")
        amax = g.op1("ReduceMax", [g.op1("Abs", [x32], f"{name}/Abs")], f"{name}/ReduceMax", axes=[-1], keepdims=1)
        # A zero row keeps a positive scale: 0 / amax is 0, where 0 / 0 would be NaN.
        amax = g.op1("Max", [amax, g.const(np.finfo(np.float32).tiny, F32)], f"{name}/amax")  # [..., 1]
        unit = g.op1("Div", [x32, amax], f"{name}/Div")  # [..., K] in [-1, 1]
        step, zero = g.const(1 / ACTIVATION_MAX, F32), g.const(ACTIVATION_ZERO_POINT, np.uint8)
        q = g.op1("QuantizeLinear", [unit, step, zero], f"{name}/QuantizeLinear")  # rounds half to even
        return q, amax

    return g.once(("quantize_rows", x), make)


def linear_int8(g: GraphWriter, x: str, weight: torch.Tensor, name: str, bias: torch.Tensor | None) -> str:
    """x @ weight.T (+ bias) as com.microsoft MatMulIntegerToFloat: uint8 activations per token (quantize_rows)
    times int8 weights per output channel (quantize.quantize_channels), scaled back to float32.

    The kernel multiplies its output by the per-row activation scale after adding its bias input, so the
    bias is a separate Add.
    """
    q, amax = quantize_rows(g, x)
    w, w_scales = quantize_channels(to_numpy(weight, F32))  # [in, out] int8, [out]
    scales = (w_scales / ACTIVATION_MAX).astype(np.float32)  # the activations' 1 / 127 (quantize_rows)
    inputs = [q, g.weight(f"{name}.weight_int8", w), amax, g.weight(f"{name}.weight_scale", scales)]
    inputs.append(g.const(ACTIVATION_ZERO_POINT, np.uint8))
    y = g.op1("MatMulIntegerToFloat", inputs, f"{name}/MatMulIntegerToFloat", domain=MS_DOMAIN)  # float32
    if bias is not None:
        y = g.op1("Add", [y, g.weight(f"{name}.bias", to_numpy(bias, F32))], f"{name}/Add")
    return g.cast(y, g.dtype, f"{name}/to_model_dtype", source=F32)


def _gelu_tanh(g: GraphWriter, x: str, name: str) -> str:
    """gelu_new = 0.5 x (1 + tanh(sqrt(2 / pi) x (1 + 0.044715 x^2))), in the graph's dtype.

    x (1 + c x^2) rather than x + c x^3: x^3 overflows float16 from |x| > 40, x^2 only from 256.
    """
    c = g.dtype
    x2 = g.op1("Mul", [x, x], f"{name}/x2")
    inner = g.op1("Mul", [x2, g.const(0.044715, c)], f"{name}/cx2")
    inner = g.op1("Add", [inner, g.const(1.0, c)], f"{name}/1+cx2")
    inner = g.op1("Mul", [x, inner], f"{name}/x(1+cx2)")
    inner = g.op1("Mul", [inner, g.const(math.sqrt(2 / math.pi), c)], f"{name}/scaled")
    t = g.op1("Add", [g.op1("Tanh", [inner], f"{name}/Tanh"), g.const(1.0, c)], f"{name}/1+tanh")
    return g.op1("Mul", [g.op1("Mul", [x, t], f"{name}/x(1+tanh)"), g.const(0.5, c)], f"{name}/half")


def _gelu_erf(g: GraphWriter, x: str, name: str) -> str:
    """Exact gelu = 0.5 x (1 + erf(x / sqrt(2))), in the graph's dtype."""
    c = g.dtype
    e = g.op1("Erf", [g.op1("Div", [x, g.const(math.sqrt(2.0), c)], f"{name}/scaled")], f"{name}/Erf")
    t = g.op1("Add", [e, g.const(1.0, c)], f"{name}/1+erf")
    return g.op1("Mul", [g.op1("Mul", [x, t], f"{name}/x(1+erf)"), g.const(0.5, c)], f"{name}/half")


def mlp(g: GraphWriter, h: str, module, activation: str, name: str, fused_ops: bool) -> str:
    """fc_out(act(fc_in(h))): [B, S, E] -> [B, S, inner] -> [B, S, E]."""
    fc_in_bias = g.weight(f"{name}.fc_in.bias", to_numpy(module.fc_in.bias, g.dtype))
    a = linear(g, h, module.fc_in.weight, f"{name}.fc_in")  # [B, S, inner], bias not yet added
    if fused_ops and activation == "gelu_new":  # the tanh approximation, bias add fused in
        a = g.op1("FastGelu", [a, fc_in_bias], f"{name}/FastGelu", domain=MS_DOMAIN)
    elif fused_ops and activation == "gelu":  # erf gelu, bias fused
        a = g.op1("BiasGelu", [a, fc_in_bias], f"{name}/BiasGelu", domain=MS_DOMAIN)
    else:
        a = g.op1("Add", [a, fc_in_bias], f"{name}/fc_in/Add")
        if activation == "gelu_new":
            a = _gelu_tanh(g, a, f"{name}/gelu_new")
        elif activation == "gelu":
            a = _gelu_erf(g, a, f"{name}/gelu")
        else:
            a = g.op1("Relu", [a], f"{name}/Relu")
    return linear(g, a, module.fc_out.weight, f"{name}.fc_out", module.fc_out.bias)


def rotary(g: GraphWriter, n_positions: int, rotary_dim: int, positions: str) -> tuple[str, str]:
    """cos and signed sin of each token's position, float32, each [B, S, 1, 1, rotary_dim] (broadcast over
    the q/k axis and the heads of rotate_qk's input). positions: int64 [B, S].

    The [n_positions, rotary_dim] tables repeat cos_i on dims 2i and 2i + 1 and carry the sign of GPT-J's
    rotate_every_two in sin: -sin_i on dim 2i, +sin_i on 2i + 1.
    """
    sin, cos = rotary_tables(n_positions, rotary_dim)  # each [P, R/2]
    cos = cos.repeat_interleave(2, dim=-1)  # [P, R]
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)  # [P, R]
    axes = g.const([2, 3], I64)
    out = []
    for name, table in (("cos", cos), ("sin", sin)):
        t = g.op1("Gather", [g.weight(f"rotary.{name}", table.numpy()), positions], f"rotary/{name}")  # [B, S, R]
        out.append(g.op1("Unsqueeze", [t, axes], f"rotary/{name}/Unsqueeze"))  # [B, S, 1, 1, R]
    return out[0], out[1]


def _slice(g: GraphWriter, x: str, start: int, end: int, axis: int, name: str) -> str:
    return g.op1("Slice", [x, g.const([start], I64), g.const([end], I64), g.const([axis], I64)], name)


def rotate_qk(g: GraphWriter, qkv: str, cos: str, sin: str, config, name: str) -> tuple[str, str]:
    """Split packed q|k|v [B, S, 3E] into heads and apply GPT-J's interleaved rotary, in float32, to the first
    rotary_dim dims of each head of q and k, as model/reference.py's apply_rotary does.

    x * cos + swap(x) * sin, where swap exchanges each (even, odd) pair (a Gather along the last axis) and
    sin carries the sign (see rotary). Returns (q and k rotated [B, S, 2, H, D], v [B, S, 1, H, D]).
    """
    h, d, r = config.n_head, config.head_dim, config.rotary_dim
    qkv = g.op1("Reshape", [qkv, g.const([0, 0, 3, h, d], I64)], f"{name}/split_heads")  # [B, S, 3, H, D]
    qk = _slice(g, qkv, 0, 2, 2, f"{name}/qk_heads")  # [B, S, 2, H, D]
    v = _slice(g, qkv, 2, 3, 2, f"{name}/v_heads")  # [B, S, 1, H, D]
    rot, keep = qk, None
    if r < d:
        rot = _slice(g, qk, 0, r, 4, f"{name}/rot")  # [B, S, 2, H, R]
        keep = _slice(g, qk, r, d, 4, f"{name}/pass")  # [B, S, 2, H, D - R]
    rot = g.cast(rot, F32, f"{name}/rot/to_fp32")  # [B, S, 2, H, R]
    swap = g.const(np.arange(r).reshape(-1, 2)[:, ::-1].reshape(-1), I64)  # [R]: 1, 0, 3, 2, ...
    swapped = g.op1("Gather", [rot, swap], f"{name}/rot/swap_pairs", axis=4)  # [B, S, 2, H, R]
    by_cos = g.op1("Mul", [rot, cos], f"{name}/rot/cos")
    by_sin = g.op1("Mul", [swapped, sin], f"{name}/rot/sin")
    rot = g.cast(g.op1("Add", [by_cos, by_sin], f"{name}/rotary"), g.dtype, f"{name}/rot/to_model_dtype", source=F32)
    if keep is not None:
        rot = g.op1("Concat", [rot, keep], f"{name}/qk_rotated", axis=4)  # [B, S, 2, H, D]
    return rot, v


def qkv_weight(attn) -> torch.Tensor:
    """q, k and v projections as one [3E, E] weight: one MatMul gives q | k | v, each E wide."""
    return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)  # [3E, E]


# attention(layer index, packed qkv [B, S, 3E]) -> attention heads merged back, [B, S, E]
Attention = Callable[[int, str], str]


def decoder(
    g: GraphWriter,
    model: CodeGen,
    attention: Attention,
    *,
    fused_ops: bool,
    select: Callable[[str], str] | None = None,
    flatten: bool = False,
) -> None:
    """Write the decoder's nodes, from input_ids to the float32 logits output.

    select: applied to the last hidden states [B, S, E] before ln_f (the fused graph keeps each row's
    last tokens only). flatten: logits [B, S, V] as [B * S, V].
    """
    wte = g.weight("wte.weight", to_numpy(model.wte.weight, g.dtype))
    x = g.op1("Gather", [wte, io_spec.INPUT_IDS], "wte")  # [B, S, E]
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}"
        hidden = layer_norm(g, x, block.ln_1, f"{name}.ln_1")  # [B, S, E]
        qkv_proj = partial(qkv_weight, block.attn)  # made only if the tensor is written
        qkv = linear(g, hidden, qkv_proj, f"{name}.attn.qkv_proj")  # [B, S, 3E]: q | k | v
        heads = attention(i, qkv)  # [B, S, E]
        attn_out = linear(g, heads, block.attn.out_proj.weight, f"{name}.attn.out_proj")  # [B, S, E]
        mlp_out = mlp(g, hidden, block.mlp, model.config.activation, f"{name}.mlp", fused_ops)  # [B, S, E]
        x = g.op1("Add", [x, attn_out], f"{name}/residual_attn")
        x = g.op1("Add", [x, mlp_out], f"{name}/residual_mlp")
    if select is not None:
        x = select(x)
    x = layer_norm(g, x, model.ln_f, "ln_f")
    logits = g.cast(linear(g, x, model.lm_head.weight, "lm_head", model.lm_head.bias), F32, "logits/to_fp32")
    if flatten:
        vocab = model.config.vocab_size
        logits = g.op1("Reshape", [logits, g.const([-1, vocab], I64)], "logits/flatten")  # [B * S, V]
    g.output(logits, io_spec.LOGITS)
