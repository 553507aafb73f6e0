"""A fused CodeGen decoder graph for ONNX Runtime, built node by node from a loaded reference model.

Why a second graph: the plain export grows its cache with a Concat on every step, a copy of the whole
cache per token. Here each layer's attention is one com.microsoft GroupQueryAttention (GQA) node whose
past and present are the same [batch, heads, max_length, head_dim] buffer, so a step writes one new
position in place and reads only the filled part.

What GQA does for CodeGen (see io_spec for the I/O contract):
- packed q|k|v input (one MatMul), rotary inside the node: do_rotary=1, rotary_interleaved=1 (GPT-J's
  rotate_every_two), cos/sin caches [positions, width] where a width below head_dim / 2 makes the rotary
  partial. The kernel accepts rotary caches only with a head_size that is a multiple of 16 and a
  table width that is a multiple of 8 and at most head_size / 2 (onnxruntime 1.32's checks).
  rotary_dim / 2 is padded to a multiple of 8 with cos 1 / sin 0 columns, an exact identity on the
  extra dims; other shapes get no fused graph (fused_support says why). Causal, scale
  1/sqrt(head_dim) (CodeGen adds its mask before scaling; with no mask term the order does not matter).
- rows start at index 0 (right padding): row b's tokens sit at [0, seqlens_k[b] + 1) of its buffer and
  rotary positions count from 0 there. The session re-lays a left-padded batch out right-padded, which
  makes every row exactly what it would be alone. Positions come from the row's length, so the graph
  has no mask or position inputs.
- the graph returns logits of each row's last real token only ([batch, vocab]): the prompt's other
  positions never go through lm_head. The input logits_to_keep (1 for that) asks for each row's last K
  positions ([batch * K, vocab]): a speculative step checks K drafted tokens in one run.

Everything but attention is layers.py's decoder, shared with the plain graph, with com.microsoft
FastGelu (gelu_new) or BiasGelu (exact gelu). Optionally the projections and lm_head have quantized
weights, a lossy speed option: int8 (MatMulIntegerToFloat, activations quantized per token) or int4
(MatMulNBits blocks, accuracy_level 4); see quantize.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ..artifacts import io_spec
from ..artifacts.manifest import CACHE_DTYPES, ROTARY_VARIANTS
from ..config import ModelConfig
from ..dtypes import numpy_dtype, to_numpy
from ..errors import ExportError
from ..model.reference import CodeGen, rotary_tables
from .graph import MS_DOMAIN, OPSET, GraphWriter, make_model, shared_weights, write_graph
from .layers import F32, I64, decoder, rotate_qk
from .layers import rotary as rotary_inputs
from .quantize import WEIGHT_FORMATS

# GroupQueryAttention runs a float cache in the dtype of its query: a float16 cache under float32 weights casts
# q|k|v to float16 before the node and the heads' output back after it. An int8 cache keeps the query's dtype:
# the node stores round(k / scale) per channel and reads it back scaled, with scales fixed at export
# (kv_cache_scales), and no prompt or step ever reads unquantized keys, so chunks and steps agree exactly.
CACHE_CHOICES = ("auto", *CACHE_DTYPES)
KV_INT8_MAX = 127
# Token ids the int8 cache's scales are measured on when the export gives none (a random model's tests):
# 4 windows of 256 random tokens.
_RANDOM_CALIBRATION = (4, 256)


def kv_cache_scales(model: CodeGen, calibration: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the int8 cache's (key scales, value scales), each float32 [heads * head_dim]: the largest
    magnitude a channel takes over the calibration token ids [N, T], / 127. The two channels of a rotary
    pair share the pair's largest norm: rotation keeps that norm, so a key at any position stays in range,
    and a cached key can be turned to another position (session.move_positions) without its scales."""
    config = model.config
    r = config.rotary_dim
    scales = []
    with torch.no_grad():
        present = [model(torch.as_tensor(row[None]))[1] for row in np.asarray(calibration, np.int64)]
    for layer in range(config.n_layer):
        keys = torch.cat([p[layer][0] for p in present], dim=2).float()  # [1, H, N * T, D] (rotated)
        values = torch.cat([p[layer][1] for p in present], dim=2).float()  # [1, H, N * T, D]
        k_max = keys.abs().amax(dim=(0, 2))  # [H, D]
        pair = keys[..., :r].unflatten(-1, (r // 2, 2)).norm(dim=-1).amax(dim=(0, 2))  # [H, R / 2]
        k_max[:, :r] = pair.repeat_interleave(2, dim=-1)  # [H, R]
        v_max = values.abs().amax(dim=(0, 2))  # [H, D]
        k_scale, v_scale = (
            (np.maximum(m.reshape(-1).numpy(), np.finfo(np.float32).tiny) / KV_INT8_MAX).astype(np.float32)
            for m in (k_max, v_max)
        )
        scales.append((k_scale, v_scale))
    return scales


def random_calibration(config: ModelConfig) -> np.ndarray:
    """Random token ids [N, T] for kv_cache_scales when no text is at hand (a random model's tests)."""
    n, t = _RANDOM_CALIBRATION
    return np.random.default_rng(0).integers(0, config.vocab_size, (n, min(t, config.n_positions)))


def cache_support(cache: str, dtype: str, rotary: str) -> str | None:
    """None if a fused graph of a `dtype` model with its rotary `rotary` can hold a `cache` KV cache, else why
    not and what to do (one line): GroupQueryAttention's int8 cache is exact on the CPU provider, whose kernel
    takes it under float32 activations with the rotary inside the node."""
    if cache == "int8" and (dtype != "float32" or rotary != "gqa"):
        return (
            "an int8 KV cache runs on ONNX Runtime's CPU provider over float32 weights with the rotary inside "
            "GroupQueryAttention: export float32 with --fused-rotary gqa, or choose --kv-cache float16"
        )
    return None


def cache_dtype_for(choice: str | None, dtype: str, weights: str) -> str:
    """The fused graph's KV cache dtype for `choice` ("auto", "float32", "float16", "int8" or None = auto), a
    model in `dtype` and its `weights` format. auto: float16 under quantized weights (half the memory per
    token of context or cached prompt, for a rounding 10-500x below the weights' own; decode speed on CPU within
    the noise of a float32 cache's, since GroupQueryAttention widens a float16 cache to float32 at every step),
    else the model's dtype. int8 is never chosen for the user: it decodes faster at long contexts but reads a
    long prompt ~1.5x slower on CPU, and rounds more than int8 weights."""
    choice = choice or "auto"
    if choice not in CACHE_CHOICES:
        raise ExportError(f"unknown KV cache dtype {choice!r}: choose one of {', '.join(CACHE_CHOICES)}")
    if choice != "auto":
        return choice
    return "float16" if weights != "float" or dtype == "float16" else "float32"


def fused_support(config: ModelConfig, rotary: str = "gqa") -> str | None:
    """None if GroupQueryAttention's CPU kernel runs this shape, else why not (for a note).

    With its rotary inside (rotary="gqa") the kernel refuses a head_size that is not a multiple of 16 at run
    time (tried: 8, 20, 24 and 40 fail, 16, 32, 48, 64, 80, 96, 128 and 256 run with every rotary_dim); with
    head_dim a multiple of 16, rotary_dim / 2 rounded up to a multiple of 8 never exceeds head_dim / 2, so the
    table fits. Without it (rotary="graph") the kernel wants a multiple of 8.
    """
    multiple = 16 if rotary == "gqa" else 8
    if config.head_dim % multiple:
        return f"GroupQueryAttention on CPU needs a head_dim that is a multiple of {multiple}, not {config.head_dim}"
    return None


def rotary_table_width(config: ModelConfig) -> int:
    """Width of GQA's cos/sin tables: rotary_dim / 2 rounded up to a multiple of 8. Raises ExportError for
    shapes that GQA cannot run."""
    reason = fused_support(config)
    if reason:
        raise ExportError(f"no fused graph for this shape ({reason}): use the plain decoder graph")
    return -(-(config.rotary_dim // 2) // 8) * 8


def _step_positions(g: GraphWriter) -> str:
    """0, 1, ..., S - 1 along each row of input_ids, [B, S] float32, computed on the device.

    Shape/Range ops would run on the CPU next to device-resident seqlens_k, and the copies ONNX Runtime then
    inserts rule out CUDA graph capture; a CumSum over ones derived from input_ids stays on the device.
    """
    zero = g.op1("Mul", [io_spec.INPUT_IDS, g.const(0, I64)], "steps/zero")
    ones = g.op1("Add", [g.cast(zero, F32, "steps/zero_f", source=I64), g.const(1.0, F32)], "steps/ones")  # [B, S]
    counts = g.op1("CumSum", [ones, g.const(1, I64)], "steps/CumSum")  # 1..S
    return g.op1("Sub", [counts, g.const(1.0, F32)], "steps/positions")  # [B, S]


def _last_tokens(g: GraphWriter, x: str, steps: str, seqlens: str) -> str:
    """Each row's last K = logits_to_keep real tokens of x [B, S, E], in order, as [B, K, E]. A row's last
    token is at index L = min(seqlens_k, S - 1) (the prompt: its length - 1, right-padded; a step: 0).
    A TopK of the step indices masked to <= seqlens_k finds L, L - 1, ..., a second one puts them in
    order: no shape ops, and K is read only by TopK, on the CPU, so the graph stays capturable as a CUDA
    graph. A row with fewer than K tokens fills the rest with other positions (their logits mean nothing)."""
    allowed = g.op1("LessOrEqual", [steps, seqlens], "last/allowed")  # [B, S]
    score = g.op1("Mul", [steps, g.cast(allowed, F32, "last/allowed_f", source=np.dtype(bool))], "last/score")
    keep = io_spec.LOGITS_TO_KEEP
    latest, _ = g.op("TopK", [score, keep], "last/latest", n_out=2, largest=1)  # [B, K] L, L - 1, ... (float)
    ordered, _ = g.op("TopK", [latest, keep], "last/ordered", n_out=2, largest=0)  # [B, K] ascending
    index = g.cast(ordered, I64, "last/index", source=F32)  # [B, K]
    index = g.op1("Unsqueeze", [index, g.const([2], I64)], "last/index_3d")  # [B, K, 1]
    return g.op1("GatherND", [x, index], "last/GatherND", batch_dims=1)  # [B, K, E]


def _rotary_positions(g: GraphWriter, steps: str, seqlens: str) -> str:
    """Each token's rotary position, int64 [B, S]: max(seqlens_k + 1 - S, 0) + s. The prompt (rows
    right-padded from 0) counts from 0, a step or a continued prompt from the tokens already in its row's
    cache, as GQA does for do_rotary=1."""
    last = g.op1("ReduceMax", [steps], "rotary/last_step", axes=[1], keepdims=1)  # [B, 1]: S - 1
    past = g.op1("Relu", [g.op1("Sub", [seqlens, last], "rotary/past")], "rotary/past_clipped")
    return g.cast(g.op1("Add", [past, steps], "rotary/pos_f"), I64, "rotary/pos", source=F32)  # [B, S]


def build_fused_graph(
    model: CodeGen,
    data_path: Path,
    data_location: str,
    max_context: int | None = None,
    weights: str = "float",
    rotary: str = "gqa",
    shared: dict[str, onnx.TensorProto] | None = None,
    cache: str | None = None,
    calibration: np.ndarray | None = None,
) -> onnx.ModelProto:
    """The fused decoder as a ModelProto whose large weights are already written to `data_path` (or, when
    given in `shared`, held by the plain graph's data file).

    rotary: "gqa" (inside GroupQueryAttention: do_rotary=1, checked on CPU) or "graph" (layers.rotate_qk, the
    plain graph's rotary, before a GQA with do_rotary=0: for the CUDA provider, whose GQA gave wrong logits
    for CodeGen's rotary). cache: the KV cache's dtype (see cache_dtype_for; None: auto). calibration: token
    ids [N, T] the int8 cache's scales are measured on (default: random_calibration).
    """
    config = model.config
    if rotary not in ROTARY_VARIANTS:
        raise ExportError(f"unknown rotary variant {rotary!r}: choose one of {', '.join(ROTARY_VARIANTS)}")
    if weights not in WEIGHT_FORMATS:
        raise ExportError(f"unknown weight format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if model.dtype not in (torch.float32, torch.float16):
        raise ExportError(
            f"the fused graph supports float32 and float16 models, not {model.dtype}: load the model in one of them"
        )
    dtype = numpy_dtype(model.dtype)
    cache_dtype = np.dtype(cache_dtype_for(cache, dtype.name, weights))
    quantized_cache = cache_dtype == np.int8
    if reason := cache_support(cache_dtype.name, dtype.name, rotary):
        raise ExportError(reason)
    activations = dtype if quantized_cache else cache_dtype  # GQA's query, rotary tables and output
    if quantized_cache:
        kv_scales = kv_cache_scales(model, random_calibration(config) if calibration is None else calibration)
    positions = min(max_context or config.n_positions, config.n_positions)
    h, d = config.n_head, config.head_dim
    reason = fused_support(config, rotary)
    if reason:
        raise ExportError(f"no fused graph for this shape ({reason}): use the plain decoder graph")

    g = GraphWriter(data_path, data_location, dtype, weights, shared)
    try:
        steps = _step_positions(g)  # [B, S] float32 0..S-1
        seqlens = g.cast(io_spec.SEQLENS_K, F32, "seqlens/f", source=np.dtype("int32"))  # [B]
        seqlens = g.op1("Unsqueeze", [seqlens, g.const([1], I64)], "seqlens/unsqueeze")  # [B, 1]
        if rotary == "gqa":
            width = rotary_table_width(config)
            sin, cos = rotary_tables(positions, config.rotary_dim)  # each [positions, rotary_dim / 2]
            pad = width - config.rotary_dim // 2
            cos = torch.nn.functional.pad(cos, (0, pad), value=1.0)  # [positions, width]
            sin = torch.nn.functional.pad(sin, (0, pad), value=0.0)  # [positions, width]
            caches = [
                g.weight("rotary.cos_cache", to_numpy(cos, activations)),
                g.weight("rotary.sin_cache", to_numpy(sin, activations)),
            ]
            rotary_attrs = {"do_rotary": 1, "rotary_interleaved": 1}
        else:
            cos_sin = rotary_inputs(g, positions, config.rotary_dim, _rotary_positions(g, steps, seqlens))
            caches, rotary_attrs = [], {}

        def attention(i: int, qkv: str) -> str:
            name = f"blocks.{i}.attn"
            if rotary == "graph":
                qk, v = rotate_qk(g, qkv, *cos_sin, config, f"{name}/rotary")  # [B, S, 2, H, D], [B, S, 1, H, D]
                qkv = g.op1("Concat", [qk, v], f"{name}/rotary/qkv", axis=2)  # [B, S, 3, H, D]
                qkv = g.op1("Reshape", [qkv, g.const([0, 0, 3 * h * d], I64)], f"{name}/rotary/packed")  # [B, S, 3E]
            qkv = g.cast(qkv, activations, f"{name}/qkv_to_cache_dtype")
            past = [io_spec.past_name(i, kind) for kind in io_spec.KV_KINDS]
            present = [io_spec.present_name(i, kind) for kind in io_spec.KV_KINDS]
            inputs = [qkv, "", "", *past, io_spec.SEQLENS_K, io_spec.TOTAL_SEQUENCE_LENGTH, *caches]
            quantization = {}
            if quantized_cache:
                k_scale, v_scale = kv_scales[i]
                # After the rotary tables: no position_ids, attention_bias or head_sink, then the cache's scales.
                inputs += ["", "", "", g.weight(f"{name}.k_scale", k_scale), g.weight(f"{name}.v_scale", v_scale)]
                quantization = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
            out = g.op(
                "GroupQueryAttention",
                inputs,
                f"{name}/GroupQueryAttention",
                domain=MS_DOMAIN,
                outputs=[f"{name}/out", *present],
                num_heads=h,
                kv_num_heads=h,
                scale=1.0 / math.sqrt(d),
                **rotary_attrs,
                **quantization,
            )
            return g.cast(out[0], dtype, f"{name}/to_model_dtype", source=activations)  # [B, S, E]

        decoder(
            g,
            model,
            attention,
            fused_ops=True,
            select=lambda x: _last_tokens(g, x, steps, seqlens),
            flatten=True,  # [B, K, V] -> [B * K, V]: with logits_to_keep 1, [B, V] as before
        )
    finally:
        g.close()

    inputs = io_spec.fused_decoder_inputs(config.n_layer, h, d, cache_dtype.name)
    outputs = io_spec.fused_decoder_outputs(config.n_layer, h, d, config.vocab_size, cache_dtype.name)
    doc = "CodeGen decoder fused for ONNX Runtime (GroupQueryAttention, in-place cache buffers)"
    proto = make_model(g, "codegen_decoder_fused", inputs, outputs, opset=OPSET, domains=(MS_DOMAIN,), doc=doc)
    # The rotary tables end here: a session must not hold a longer context (FusedOrtSession reads this).
    props = {
        io_spec.FUSED_MAX_CONTEXT_KEY: str(positions),
        io_spec.FUSED_WEIGHTS_KEY: weights,
        io_spec.FUSED_DTYPE_KEY: dtype.name,
    }
    helper.set_model_props(proto, {**props, io_spec.FUSED_ROTARY_KEY: rotary})
    return proto


def write_fused_graph(
    model: CodeGen,
    folder: Path,
    max_context: int | None = None,
    weights: str = "float",
    check: bool = True,
    rotary: str = "gqa",
    share_with: Path | None = None,
    cache: str | None = None,
    calibration: np.ndarray | None = None,
) -> list[str]:
    """Write the fused decoder (FUSED_GRAPH_FILE + FUSED_DATA_FILE) into `folder`; return the file names.

    `max_context` bounds the rotary tables (default: the model's n_positions); a session's cache buffer
    may not be longer. weights: "float" (the model's dtype), or "int8" / "int4" quantized weights for
    the projections and lm_head (quantize.py; not exact: check with codegen-parity). rotary: "gqa" or
    "graph" (see build_fused_graph). cache: the KV cache's dtype ("auto" or None, "float32", "float16",
    "int8"; see cache_dtype_for; int8: scales measured on the token ids `calibration`). share_with: a
    graph in `folder` whose external data holds the same weights (the plain decoder): the fused graph
    points at them and writes only its own tensors, which halves the bytes an export writes. Files are
    written under temporary names and renamed when complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graph_path, data_path = folder / io_spec.FUSED_GRAPH_FILE, folder / io_spec.FUSED_DATA_FILE
    shared = shared_weights(share_with) if share_with is not None else None
    write_graph(
        lambda path, location: build_fused_graph(
            model, path, location, max_context, weights, rotary, shared, cache, calibration
        ),
        graph_path,
        data_path,
    )
    if check:
        onnx.checker.check_model(str(graph_path))
    return [io_spec.FUSED_GRAPH_FILE, io_spec.FUSED_DATA_FILE]


def shared_data_file(folder: Path) -> str | None:
    """The other file the fused graph in `folder` reads weights from (the plain graph's), or None."""
    model = onnx.load(str(Path(folder) / io_spec.FUSED_GRAPH_FILE), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    others = sorted(locations - {io_spec.FUSED_DATA_FILE})
    return others[0] if others else None
