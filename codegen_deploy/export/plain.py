"""The plain decoder graph (io_spec's contract), built node by node from the weights.

This is the graph TensorRT and onnxruntime-genai read, so it holds standard ONNX ops only (no
com.microsoft domain). It shares every layer but attention with the fused graph (layers.py) and
follows model/reference.py's arithmetic, float32 islands included:

- rotary: GPT-J's interleaved rotation on the first rotary_dim dims of each head, in float32:
  x * cos + swap(x) * sin, where swap exchanges each (even, odd) pair (a Gather along the last axis)
  and the sin table carries the sign (-sin on even dims, +sin on odd dims); the [n_positions,
  rotary_dim] tables are gathered by position_ids, so left padding gets each row's real positions.
- attention: q and k in float32; the additive mask (causal and padding, float32 min where blocked)
  added to the raw scores before dividing by sqrt(head_dim); softmax in float32; the cache grows by
  Concat of past and the new keys/values (past may be 0 long).
- LayerNorm in float32; logits float32. In a float16 graph everything else is float16, so the graph
  itself says which ops run in which precision (what TensorRT's strongly typed networks need).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..artifacts import io_spec
from ..dtypes import DTYPES, dtype_name, numpy_dtype
from ..errors import ExportError
from ..model.reference import CodeGen
from .graph import OPSET, GraphWriter, make_model, write_graph
from .layers import F32, I64, decoder, rotary, rotate_qk


def attention_bias(g: GraphWriter) -> str:
    """Additive float32 mask [B, 1, S, total]: 0 where a query may attend, float32 min where not.

    Query j of the S new tokens sits at position total - S + j; it may attend to key positions up to
    its own (causal) whose attention_mask is 1 (padding is 0).
    """
    zero, one = g.const(0, I64), g.const(1, I64)
    seq = g.op1("Gather", [g.op1("Shape", [io_spec.INPUT_IDS], "mask/ids_shape"), one], "mask/seq", axis=0)
    total = g.op1("Gather", [g.op1("Shape", [io_spec.ATTENTION_MASK], "mask/shape"), one], "mask/total", axis=0)
    first = g.op1("Sub", [total, seq], "mask/first_query")
    keys = g.op1("Range", [zero, total, one], "mask/key_positions")  # [total]
    queries = g.op1("Range", [first, total, one], "mask/query_positions")  # [S]
    queries = g.op1("Unsqueeze", [queries, g.const([1], I64)], "mask/query_column")  # [S, 1]
    future = g.op1("Greater", [keys, queries], "mask/future")  # [S, total]
    padding = g.op1("Equal", [io_spec.ATTENTION_MASK, zero], "mask/padding")  # [B, total]
    padding = g.op1("Unsqueeze", [padding, g.const([1, 2], I64)], "mask/padding_4d")  # [B, 1, 1, total]
    blocked = g.op1("Or", [future, padding], "mask/blocked")  # [B, 1, S, total]
    lowest = g.const(np.finfo(np.float32).min, F32)
    return g.op1("Where", [blocked, lowest, g.const(0.0, F32)], "mask/bias")


def build_plain_graph(model: CodeGen, data_path: Path, data_location: str, opset: int | None = None):
    """The plain decoder as a ModelProto whose large weights are already written to `data_path`."""
    config = model.config
    if dtype_name(model.dtype) not in DTYPES:
        raise ExportError(f"the plain graph supports float32, float16 and bfloat16 models, not {model.dtype}")
    dtype = numpy_dtype(model.dtype)
    h, d = config.n_head, config.head_dim
    g = GraphWriter(data_path, data_location, dtype)
    try:
        cos, sin = rotary(g, config.n_positions, config.rotary_dim, io_spec.POSITION_IDS)
        bias = attention_bias(g)
        merged_shape = g.const([0, 0, h * d], I64)
        scale = g.const(math.sqrt(d), F32)

        def attention(i: int, qkv: str) -> str:
            name = f"blocks.{i}.attn"
            qk, v = rotate_qk(g, qkv, cos, sin, config, name)  # [B, S, 2, H, D], [B, S, 1, H, D]
            heads = {}
            for index, part, source in ((0, "q", qk), (1, "k", qk), (0, "v", v)):
                x = g.op1("Gather", [source, g.const(index, I64)], f"{name}/{part}", axis=2)  # [B, S, H, D]
                heads[part] = g.op1("Transpose", [x], f"{name}/{part}/heads", perm=[0, 2, 1, 3])  # [B, H, S, D]
            present = []
            for kind, part in zip(io_spec.KV_KINDS, "kv", strict=True):
                grown = [io_spec.present_name(i, kind)]  # [B, H, total, D]
                present += g.op("Concat", [io_spec.past_name(i, kind), heads[part]], grown[0], outputs=grown, axis=2)
            q = g.cast(heads["q"], F32, f"{name}/q/to_fp32")
            k = g.cast(present[0], F32, f"{name}/k/to_fp32")
            k_t = g.op1("Transpose", [k], f"{name}/k/transpose", perm=[0, 1, 3, 2])  # [B, H, D, total]
            scores = g.op1("MatMul", [q, k_t], f"{name}/scores")  # [B, H, S, total]
            scores = g.op1("Add", [scores, bias], f"{name}/masked")  # CodeGen masks before scaling
            scores = g.op1("Div", [scores, scale], f"{name}/scaled")
            probs = g.op1("Softmax", [scores], f"{name}/Softmax", axis=-1)
            probs = g.cast(probs, dtype, f"{name}/probs/to_model_dtype", source=F32)
            y = g.op1("MatMul", [probs, present[1]], f"{name}/context")  # [B, H, S, D]
            y = g.op1("Transpose", [y], f"{name}/merge/transpose", perm=[0, 2, 1, 3])  # [B, S, H, D]
            return g.op1("Reshape", [y, merged_shape], f"{name}/merge_heads")  # [B, S, E]

        decoder(g, model, attention, fused_ops=False)
    finally:
        g.close()

    cache_dtype = dtype.name
    inputs = io_spec.decoder_inputs(config.n_layer, h, d, cache_dtype)
    outputs = io_spec.decoder_outputs(config.n_layer, h, d, config.vocab_size, cache_dtype)
    doc = "CodeGen decoder with past-key-value I/O, standard ONNX ops"
    return make_model(g, "codegen_decoder", inputs, outputs, opset=opset or OPSET, doc=doc)


def write_plain_graph(model: CodeGen, folder: Path, opset: int | None = None) -> tuple[Path, Path]:
    """Write decoder.onnx and its weights (decoder.onnx.data) into `folder`; return both paths."""
    graph_path, data_path = Path(folder) / io_spec.GRAPH_FILE, Path(folder) / io_spec.DATA_FILE
    write_graph(lambda path, location: build_plain_graph(model, path, location, opset), graph_path, data_path)
    return graph_path, data_path
