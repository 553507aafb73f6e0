"""A fused CodeGen decoder graph for ONNX Runtime, built node by node from a loaded reference model.

Why a second graph: the plain export grows its cache with a Concat on every step, a copy of the whole
cache per token. Here each layer's attention is one com.microsoft GroupQueryAttention (GQA) node whose
past and present are the same [batch, heads, max_length, head_dim] buffer, so a step writes one new
position in place and reads only the filled part.

What GQA does for CodeGen (see io_spec for the I/O contract):
- packed q|k|v input (one MatMul), rotary inside the node: do_rotary=1, rotary_interleaved=1 (GPT-J's
  rotate_every_two), cos/sin caches [positions, width] where a width below head_dim / 2 makes the rotary
  partial. The CPU kernel wants the width a multiple of 8 (and head_dim a multiple of 8): rotary_dim / 2
  is padded with cos 1 / sin 0 columns, an exact identity on the extra dims. Causal, scale
  1/sqrt(head_dim) (CodeGen adds its mask before scaling; with no mask term the order does not matter).
- rows start at index 0 (right padding): row b's tokens sit at [0, seqlens_k[b] + 1) of its buffer and
  rotary positions count from 0 there. The session re-lays a left-padded batch out right-padded, which
  makes every row exactly what it would be alone. Positions come from the row's length, so the graph
  has no mask or position inputs.
- the graph returns logits of each row's last real token only ([batch, vocab]): the prompt's other
  positions never go through lm_head.

Blocks are LayerNormalization (float32), MatMul (+ Add for biases), FastGelu (gelu_new) or BiasGelu
(exact gelu) or Relu, and the parallel residual x + attn + mlp. Optionally the projections and lm_head
are MatMulNBits with int8 or int4 block-quantized weights (accuracy_level 4), a lossy speed option.

Weights go to one external data file written tensor by tensor, so building the graph never holds a
second copy of the model in memory.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..artifacts import io_spec
from ..config import ModelConfig
from ..errors import ExportError
from ..model.reference import CodeGen, rotary_tables

OPSET = 17  # LayerNormalization
MAX_CONTEXT_KEY, WEIGHTS_KEY, ROTARY_KEY = "max_context", "weights", "rotary"  # the graph's metadata_props
# Where the rotary embedding is applied: inside GroupQueryAttention, or by plain ops before it.
ROTARY_VARIANTS = ("gqa", "graph")
MS_DOMAIN = "com.microsoft"
_ALIGN = 64  # byte alignment of tensors in the data file (lets ORT use them in place)
_INLINE_BYTES = 1024  # tensors smaller than this stay inside the .onnx file

_NP_TO_ONNX = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
               np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32,
               np.dtype("uint8"): TensorProto.UINT8}  # fmt: skip


class _Weights:
    """Appends initializers to one external data file as they are made; returns their TensorProtos."""

    def __init__(self, data_path: Path, location: str):
        self.file = open(data_path, "wb")  # noqa: SIM115 - closed in close()
        self.location = location
        self.offset = 0
        self.initializers: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        tensor = TensorProto(name=name, data_type=_NP_TO_ONNX[array.dtype], dims=array.shape)
        if array.nbytes < _INLINE_BYTES:
            tensor.raw_data = array.tobytes()
        else:
            pad = -self.offset % _ALIGN
            self.file.write(b"\0" * pad)
            self.offset += pad
            self.file.write(memoryview(array).cast("B"))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.location), ("offset", self.offset), ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(value))
            self.offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


def _np(t: torch.Tensor, dtype: np.dtype | None = None) -> np.ndarray:
    """A torch tensor as numpy (float tensors in `dtype` when given)."""
    a = t.detach().cpu()
    if dtype is not None:
        a = a.to({np.dtype("float32"): torch.float32, np.dtype("float16"): torch.float16}[np.dtype(dtype)])
    return a.numpy()


class _GraphBuilder:
    """Nodes with unique names; one helper per op kind used in the decoder."""

    def __init__(self, weights: _Weights, dtype: np.dtype, weight_format: str):
        self.w = weights
        self.dtype = dtype  # of activations, float weights and the cache
        self.weights = weight_format  # "float" or a key of QUANTIZED_WEIGHTS
        self.nodes: list[onnx.NodeProto] = []
        self._shared: set[str] = set()

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outputs = [f"{name}/out{i}" for i in range(n_out)] if n_out > 1 else [f"{name}/out"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, name: str, array: np.ndarray) -> str:
        return self.w.add(name, array)

    def shared_const(self, name: str, array: np.ndarray) -> str:
        """A constant that several nodes use (a shape, split sizes): added the first time only."""
        if name not in self._shared:
            self._shared.add(self.w.add(name, array))
        return name


def _layer_norm(g: _GraphBuilder, x: str, ln: torch.nn.LayerNorm, name: str, half: bool) -> str:
    """LayerNorm in float32 (fp16 variance overflows on large models), cast back for fp16 graphs."""
    w = g.const(f"{name}.weight", _np(ln.weight, np.float32))
    b = g.const(f"{name}.bias", _np(ln.bias, np.float32))
    if half:
        x = g.op("Cast", [x], f"{name}/to_fp32", to=TensorProto.FLOAT)[0]
    y = g.op("LayerNormalization", [x, w, b], name, axis=-1, epsilon=ln.eps)[0]
    if half:
        y = g.op("Cast", [y], f"{name}/to_fp16", to=TensorProto.FLOAT16)[0]
    return y


# weights= option of the builder: MatMul weights kept in the model dtype, or block-quantized MatMulNBits.
# (bits, block size); accuracy_level 4 (int8 activations) matters: level 0 is slower than fp32 MatMul.
QUANTIZED_WEIGHTS = {"int8": (8, 64), "int4": (4, 128)}
WEIGHT_FORMATS = ("float", *QUANTIZED_WEIGHTS)


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


def _matmul(g: _GraphBuilder, x: str, weight: torch.Tensor, name: str, bias: torch.Tensor | None = None) -> str:
    """x @ weight.T (+ bias). Float: weight stored transposed, [in, out], as MatMul wants it. Quantized:
    MatMulNBits with weight [out, in] (torch's own layout) in blocks along `in`, the bias fused in."""
    if g.weights == "float":
        w = g.const(f"{name}.weight", _np(weight.T.contiguous(), g.dtype))  # [in, out]
        y = g.op("MatMul", [x, w], f"{name}/MatMul")[0]
        if bias is not None:
            y = g.op("Add", [y, g.const(f"{name}.bias", _np(bias, g.dtype))], f"{name}/Add")[0]
        return y
    bits, block = QUANTIZED_WEIGHTS[g.weights]
    n, k = weight.shape
    packed, scales = quantize_blockwise(_np(weight, np.float32), bits, block)
    inputs = [x, g.const(f"{name}.weight_q{bits}", packed), g.const(f"{name}.scales", scales.astype(g.dtype))]
    if bias is not None:
        inputs += ["", "", g.const(f"{name}.bias", _np(bias, g.dtype))]  # no zero points, no g_idx
    return g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN, K=k, N=n, bits=bits,
                block_size=block, accuracy_level=4)[0]  # fmt: skip


def _mlp(g: _GraphBuilder, h: str, mlp, activation: str, name: str) -> str:
    fc_in_bias = g.const(f"{name}.fc_in.bias", _np(mlp.fc_in.bias, g.dtype))
    a = _matmul(g, h, mlp.fc_in.weight, f"{name}.fc_in")  # [B, S, inner]
    if activation == "gelu_new":  # the tanh approximation, with the bias add fused in
        a = g.op("FastGelu", [a, fc_in_bias], f"{name}/FastGelu", domain=MS_DOMAIN)[0]
    elif activation == "gelu":  # erf gelu, bias fused
        a = g.op("BiasGelu", [a, fc_in_bias], f"{name}/BiasGelu", domain=MS_DOMAIN)[0]
    else:
        a = g.op("Add", [a, fc_in_bias], f"{name}/fc_in/Add")[0]
        a = g.op("Relu", [a], f"{name}/Relu")[0]
    return _matmul(g, a, mlp.fc_out.weight, f"{name}.fc_out", mlp.fc_out.bias)


def rotary_table_width(config) -> int:
    """Width of GQA's cos/sin tables: rotary_dim / 2 rounded up to a multiple of 8 (GQA's CPU kernel requires
    it), at most head_dim / 2. Raises ExportError for shapes that GQA cannot express."""
    width = -(-(config.rotary_dim // 2) // 8) * 8  # rounded up to a multiple of 8
    if config.head_dim % 8 or width > config.head_dim // 2:
        raise ExportError(
            f"the fused graph cannot express head_dim {config.head_dim} with rotary_dim {config.rotary_dim} "
            "(GroupQueryAttention on CPU needs head_dim and twice the rotary table width to be multiples "
            "of 8 and 16): use the plain decoder graph"
        )
    return width


def _step_positions(g: _GraphBuilder) -> str:
    """0, 1, ..., S - 1 along each row of input_ids, [B, S] float32, computed on the device.

    Shape/Range ops would run on the CPU next to device-resident seqlens_k, and the copies ONNX Runtime then
    inserts rule out CUDA graph capture; a CumSum over ones derived from input_ids stays on the device.
    """
    zero = g.op("Mul", [io_spec.INPUT_IDS, g.const("steps.zero", np.array(0, np.int64))], "steps/zero")[0]
    ones = g.op("Cast", [zero], "steps/ones_f", to=TensorProto.FLOAT)[0]
    ones = g.op("Add", [ones, g.const("steps.one", np.array(1.0, np.float32))], "steps/ones")[0]  # [B, S]
    counts = g.op("CumSum", [ones, g.const("steps.axis", np.array(1, np.int64))], "steps/CumSum")[0]  # 1..S
    return g.op("Sub", [counts, "steps.one"], "steps/positions")[0]  # [B, S]


def _seqlens_f(g: _GraphBuilder) -> str:
    """seqlens_k as float32 [B, 1] (each row's real tokens before this run's last one)."""
    if "seqlens/f" not in {n.name for n in g.nodes}:
        lens = g.op("Cast", [io_spec.SEQLENS_K], "seqlens/f", to=TensorProto.FLOAT)[0]  # [B]
        g.op("Unsqueeze", [lens, g.const("seqlens.axis", np.array([1], np.int64))], "seqlens/unsqueeze")
    return "seqlens/unsqueeze/out"  # [B, 1]


def _last_token_hidden(g: _GraphBuilder, x: str, steps: str) -> str:
    """Each row's last real token of x [B, S, E]: index min(seqlens_k, S - 1) (the prompt: its length - 1,
    right-padded; a step: 0), as [B, E]. ArgMax of the step index masked to <= seqlens_k finds it without
    shape ops, so the graph stays capturable as a CUDA graph."""
    allowed = g.op("LessOrEqual", [steps, _seqlens_f(g)], "last/allowed")[0]  # [B, S]
    score = g.op("Mul", [steps, g.op("Cast", [allowed], "last/allowed_f", to=TensorProto.FLOAT)[0]], "last/score")[0]
    index = g.op("ArgMax", [score], "last/index", axis=1, keepdims=1)[0]  # [B, 1] int64; all-zero rows give 0
    return g.op("GatherND", [x, index], "last/GatherND", batch_dims=1)[0]  # [B, E]


def _rotary_sin_cos(g: _GraphBuilder, steps: str, positions: int, rotary_dim: int) -> tuple[str, str]:
    """sin and cos of each token's rotary position, each [B, S, 1, R/2, 1] float32, for _rotate_qk.

    A token's position is max(seqlens_k + 1 - S, 0) + s: the prompt (rows right-padded from 0) counts from 0,
    a step or a continued prompt from the tokens already in its row's cache, as GQA does for do_rotary=1.
    """
    sin, cos = rotary_tables(positions, rotary_dim)  # each [positions, R/2] float32
    seq = g.op("ReduceMax", [steps], "rotary/last_step", axes=[1], keepdims=1)[0]  # [B, 1]: S - 1
    past = g.op("Sub", [_seqlens_f(g), seq], "rotary/past")[0]  # seqlens_k + 1 - S
    past = g.op("Relu", [past], "rotary/past_clipped")[0]
    pos = g.op("Cast", [g.op("Add", [past, steps], "rotary/pos_f")[0]], "rotary/pos", to=TensorProto.INT64)[0]
    shape = g.const("rotary.gathered_shape", np.array([0, 0, 1, rotary_dim // 2, 1], np.int64))
    out = []
    for name, table in (("sin", sin), ("cos", cos)):
        gathered = g.op("Gather", [g.const(f"rotary.{name}_table", _np(table, np.float32)), pos], f"rotary/{name}")[0]
        out.append(g.op("Reshape", [gathered, shape], f"rotary/{name}_5d")[0])  # [B, S, 1, R/2, 1]
    return out[0], out[1]


def _rotate_qk(g: _GraphBuilder, qkv: str, sin_cos: tuple[str, str], config, name: str, half: bool) -> str:
    """Packed q|k|v [B, S, 3E] with GPT-J's interleaved rotary applied (in float32) to the first rotary_dim
    dims of each head of q and k, as reference.model.apply_rotary does; v passes through."""
    h, d, r, e = config.n_head, config.head_dim, config.rotary_dim, config.n_embd
    sin, cos = sin_cos
    split = g.shared_const("rotary.qkv_split", np.array([e, e, e], np.int64))
    q, k, v = g.op("Split", [qkv, split], f"{name}/split_qkv", n_out=3, axis=-1)
    heads = g.shared_const("rotary.heads_shape", np.array([0, 0, h, d], np.int64))
    pairs = g.shared_const("rotary.pairs_shape", np.array([0, 0, h, r // 2, 2], np.int64))
    flat_rot = g.shared_const("rotary.rot_shape", np.array([0, 0, h, r], np.int64))
    flat = g.shared_const("rotary.flat_shape", np.array([0, 0, e], np.int64))
    rotated = []
    for part, x in (("q", q), ("k", k)):
        x = g.op("Reshape", [x, heads], f"{name}/{part}_heads")[0]  # [B, S, H, D]
        if r < d:
            x_rot, x_pass = g.op(
                "Split",
                [x, g.shared_const("rotary.rot_split", np.array([r, d - r], np.int64))],
                f"{name}/{part}_split_rot",
                n_out=2,
                axis=-1,
            )
        else:
            x_rot, x_pass = x, None
        if half:
            x_rot = g.op("Cast", [x_rot], f"{name}/{part}_to_fp32", to=TensorProto.FLOAT)[0]
        x_rot = g.op("Reshape", [x_rot, pairs], f"{name}/{part}_pairs")[0]  # [B, S, H, R/2, 2]
        x0, x1 = g.op(
            "Split",
            [x_rot, g.shared_const("rotary.pair_split", np.array([1, 1], np.int64))],
            f"{name}/{part}_split_pair",
            n_out=2,
            axis=-1,
        )
        # (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin): rotate_every_two
        y0 = g.op(
            "Sub",
            [g.op("Mul", [x0, cos], f"{name}/{part}_x0cos")[0], g.op("Mul", [x1, sin], f"{name}/{part}_x1sin")[0]],
            f"{name}/{part}_y0",
        )[0]
        y1 = g.op(
            "Add",
            [g.op("Mul", [x1, cos], f"{name}/{part}_x1cos")[0], g.op("Mul", [x0, sin], f"{name}/{part}_x0sin")[0]],
            f"{name}/{part}_y1",
        )[0]
        y = g.op("Concat", [y0, y1], f"{name}/{part}_pairs_out", axis=-1)[0]  # [B, S, H, R/2, 2]
        y = g.op("Reshape", [y, flat_rot], f"{name}/{part}_rot")[0]  # [B, S, H, R]
        if half:
            y = g.op("Cast", [y], f"{name}/{part}_to_fp16", to=TensorProto.FLOAT16)[0]
        if x_pass is not None:
            y = g.op("Concat", [y, x_pass], f"{name}/{part}_joined", axis=-1)[0]  # [B, S, H, D]
        rotated.append(g.op("Reshape", [y, flat], f"{name}/{part}_flat")[0])  # [B, S, E]
    return g.op("Concat", [*rotated, v], f"{name}/qkv", axis=-1)[0]  # [B, S, 3E]


def build_fused_graph(
    model: CodeGen,
    data_path: Path,
    data_location: str,
    max_context: int | None = None,
    weights: str = "float",
    rotary: str = "gqa",
) -> onnx.ModelProto:
    """The fused decoder as a ModelProto whose large weights are already written to `data_path`.

    rotary: "gqa" (inside GroupQueryAttention: do_rotary=1, checked on CPU) or "graph" (plain ops on q and k
    before a GQA with do_rotary=0: for the CUDA provider, whose GQA gave wrong logits for CodeGen's rotary).
    """
    config = model.config
    if rotary not in ROTARY_VARIANTS:
        raise ExportError(f"unknown rotary variant {rotary!r}: choose one of {', '.join(ROTARY_VARIANTS)}")
    if weights not in WEIGHT_FORMATS:
        raise ExportError(f"unknown weight format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if model.dtype not in (torch.float32, torch.float16):
        raise ExportError(f"the fused graph supports float32 and float16 models, not {model.dtype}: "
                          "load the model in one of them")  # fmt: skip
    half = model.dtype == torch.float16
    dtype = np.dtype(np.float16 if half else np.float32)
    positions = min(max_context or config.n_positions, config.n_positions)
    h, d = config.n_head, config.head_dim

    store = _Weights(data_path, data_location)
    g = _GraphBuilder(store, dtype, weights)
    try:
        steps = _step_positions(g)  # [B, S] float32 0..S-1, without shape ops (CUDA graph capture forbids copies)
        if rotary == "gqa":
            sin, cos = rotary_tables(positions, config.rotary_dim)  # each [positions, rotary_dim / 2]
            # GQA wants a table width that is a multiple of 8: pad with cos 1, sin 0 (an exact identity rotation).
            pad = rotary_table_width(config) - config.rotary_dim // 2
            cos = torch.nn.functional.pad(cos, (0, pad), value=1.0)  # [positions, width]
            sin = torch.nn.functional.pad(sin, (0, pad), value=0.0)  # [positions, width]
            rotary_inputs = [g.const("rotary.cos_cache", _np(cos, dtype)), g.const("rotary.sin_cache", _np(sin, dtype))]
        else:
            sin_cos = _rotary_sin_cos(g, steps, positions, config.rotary_dim)
            rotary_inputs = []

        x = g.op("Gather", [g.const("wte.weight", _np(model.wte.weight, dtype)), io_spec.INPUT_IDS], "wte")[0]
        for i, block in enumerate(model.blocks):
            name = f"blocks.{i}"
            hidden = _layer_norm(g, x, block.ln_1, f"{name}.ln_1", half)
            attn = block.attn
            qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)  # [3E, E]
            qkv = _matmul(g, hidden, qkv_weight, f"{name}.attn.qkv_proj")  # [B, S, 3E], packed q|k|v
            if rotary == "graph":
                qkv = _rotate_qk(g, qkv, sin_cos, config, f"{name}.attn.rotary", half)
            past_k, past_v = (io_spec.past_name(i, kind) for kind in io_spec.KV_KINDS)
            present_k, present_v = (io_spec.present_name(i, kind) for kind in io_spec.KV_KINDS)
            g.nodes.append(helper.make_node(
                "GroupQueryAttention",
                [qkv, "", "", past_k, past_v, io_spec.SEQLENS_K, io_spec.TOTAL_SEQUENCE_LENGTH, *rotary_inputs],
                [f"{name}.attn/out", present_k, present_v],
                name=f"{name}.attn/GroupQueryAttention", domain=MS_DOMAIN,
                num_heads=h, kv_num_heads=h, scale=1.0 / math.sqrt(d),
                **({"do_rotary": 1, "rotary_interleaved": 1} if rotary == "gqa" else {}),
            ))  # fmt: skip
            attn_out = _matmul(g, f"{name}.attn/out", attn.out_proj.weight, f"{name}.attn.out_proj")
            mlp_out = _mlp(g, hidden, block.mlp, config.activation, f"{name}.mlp")
            x = g.op("Add", [x, attn_out], f"{name}/residual_attn")[0]
            x = g.op("Add", [x, mlp_out], f"{name}/residual_mlp")[0]

        x = _last_token_hidden(g, x, steps)  # [B, E]

        x = _layer_norm(g, x, model.ln_f, "ln_f", half)
        logits = _matmul(g, x, model.lm_head.weight, "lm_head", model.lm_head.bias)  # [B, vocab]
        if half:
            logits = g.op("Cast", [logits], "logits/to_fp32", to=TensorProto.FLOAT)[0]
        g.nodes.append(helper.make_node("Identity", [logits], [io_spec.LOGITS], name="logits"))
    finally:
        store.close()

    cache_dtype = dtype.name
    inputs = io_spec.fused_decoder_inputs(config.n_layer, h, d, cache_dtype)
    outputs = io_spec.fused_decoder_outputs(config.n_layer, h, d, config.vocab_size, cache_dtype)

    def value_info(spec: io_spec.TensorSpec):
        return helper.make_tensor_value_info(spec.name, _NP_TO_ONNX[np.dtype(spec.dtype)], list(spec.shape))

    graph = helper.make_graph(g.nodes, "codegen_decoder_fused", [value_info(s) for s in inputs],
                              [value_info(s) for s in outputs], initializer=store.initializers)  # fmt: skip
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="codegen-deploy",
        doc_string="CodeGen decoder fused for ONNX Runtime (GroupQueryAttention, in-place cache buffers)",
    )
    # The rotary tables end here: a session must not hold a longer context (FusedOrtSession reads this).
    helper.set_model_props(proto, {MAX_CONTEXT_KEY: str(positions), WEIGHTS_KEY: weights, ROTARY_KEY: rotary})
    return proto


def write_fused_graph(model: CodeGen, folder: Path, max_context: int | None = None, weights: str = "float",
                      check: bool = True, rotary: str = "gqa") -> list[str]:  # fmt: skip
    """Write the fused decoder (FUSED_GRAPH_FILE + FUSED_DATA_FILE) into `folder`; return the file names.

    `max_context` bounds the rotary tables (default: the model's n_positions); a session's cache buffer
    may not be longer. weights: "float" (the model's dtype), or "int8" / "int4" block-quantized
    MatMulNBits for the projections and lm_head (not exact: check with codegen-parity). rotary: "gqa" or
    "graph" (see build_fused_graph). Files are written under temporary names and renamed when complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graph_path, data_path = folder / io_spec.FUSED_GRAPH_FILE, folder / io_spec.FUSED_DATA_FILE
    tmp_graph, tmp_data = graph_path.with_name(graph_path.name + ".tmp"), data_path.with_name(data_path.name + ".tmp")
    start = time.perf_counter()
    try:
        with torch.no_grad():
            proto = build_fused_graph(model, tmp_data, io_spec.FUSED_DATA_FILE, max_context, weights, rotary)
        with open(tmp_graph, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp_data, data_path)
        os.replace(tmp_graph, graph_path)
    except OSError as e:
        raise ExportError(f"could not write the fused graph into {folder} ({e}): check free disk space") from e
    finally:
        for p in (tmp_graph, tmp_data):
            p.unlink(missing_ok=True)
    if check:
        onnx.checker.check_model(str(graph_path))
    print(f"fused graph: {graph_path.name} + {data_path.name} "
          f"({data_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return [io_spec.FUSED_GRAPH_FILE, io_spec.FUSED_DATA_FILE]


def add_fused_graph(folder: str | Path, model: CodeGen | None = None, max_context: int | None = None,
                    weights: str = "float", rotary: str = "gqa") -> list[str]:  # fmt: skip
    """Add the fused graph to an existing export folder and record it in its manifest; return the files.

    model: the loaded reference (default: load the checkpoint the manifest records as its source, in
    the export's dtype). rotary: "gqa", or "graph" for the CUDA provider (see build_fused_graph).
    """
    from ..artifacts.manifest import read_manifest, write_manifest

    folder = Path(folder)
    manifest = read_manifest(folder, verify="none")
    if model is None:
        source = manifest.get("source")
        if not source:
            raise ExportError(f"{folder}/{io_spec.MANIFEST_FILE} records no source checkpoint: pass the model")
        model = CodeGen.from_pretrained(source, dtype=getattr(torch, manifest.get("dtype", "float32")))
    files = write_fused_graph(model, folder, max_context=max_context, weights=weights, rotary=rotary)
    body = {k: v for k, v in manifest.items() if k not in ("format_version", "files")}
    body.update(fused_manifest_entries(model.config, str(model.dtype).removeprefix("torch."), weights, rotary))
    write_manifest(folder, body)
    return files


def fused_manifest_entries(config: ModelConfig, dtype: str, weights: str, rotary: str = "gqa") -> dict:
    """The manifest entries that describe a fused graph of a model in `dtype` ("float32" / "float16")."""
    cache_dtype = "float16" if dtype == "float16" else "float32"
    spec_args = (config.n_layer, config.n_head, config.head_dim)
    return {
        "fused_graph_file": io_spec.FUSED_GRAPH_FILE,
        "fused_data_file": io_spec.FUSED_DATA_FILE,
        "fused_weights": weights,
        "fused_dtype": dtype,
        "fused_rotary": rotary,
        "fused_inputs": [s.to_dict() for s in io_spec.fused_decoder_inputs(*spec_args, cache_dtype)],
        "fused_outputs": [
            s.to_dict() for s in io_spec.fused_decoder_outputs(*spec_args, config.vocab_size, cache_dtype)
        ],
    }
