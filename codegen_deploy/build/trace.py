"""Trace the reference CodeGen into ONE ONNX decoder graph with past-key-value I/O (io_spec's contract).

torch.onnx.export(dynamo=True) traces a flat wrapper (input_ids, attention_mask, position_ids, *past)
-> (logits, *present) at batch 2, seq 3, past 5: all different and seq >= 2, because equal or unit
example dims get specialised. The graph then runs at any batch, seq and past, past 0 included.
The model's own float32 islands (LayerNorm, rotary, attention scores and softmax) survive a half
precision trace as Cast nodes, so an fp16 trace is already the mixed-precision graph TensorRT needs.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifacts import io_spec
from ..config import ModelConfig
from ..errors import ExportError
from ..model.reference import CodeGen

# Example dims of the trace (see the module docstring for why these values).
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 5
# ONNX protobufs cannot exceed 2 GiB: above this the weights go to one external data file.
EXTERNAL_DATA_THRESHOLD = 2 * 10**9

_ONNX_DTYPE_NAMES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64"}


class DecoderWrapper(nn.Module):
    """CodeGen with a flat signature: (input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    `past` and `present` are ordered as io_spec.past_names / present_names: layer 0 key, layer 0 value, ...
    """

    def __init__(self, model: CodeGen):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
        logits, present = self.model(input_ids, attention_mask, position_ids, cache)
        return (logits, *(t for key_value in present for t in key_value))


@dataclass(frozen=True)
class GraphInfo:
    """What the exporter wrote: files, opset and the dtypes read back from the graph."""

    graph: Path
    data: Path | None
    opset: int
    cache_dtype: str
    logits_dtype: str
    num_nodes: int


def cache_dtype_name(dtype: torch.dtype) -> str:
    """numpy-style name of the KV cache dtype of a model in `dtype` (the cache keeps the weights' dtype)."""
    return str(dtype).removeprefix("torch.")


def example_inputs(
    config: ModelConfig, dtype: torch.dtype, batch: int = TRACE_BATCH, seq: int = TRACE_SEQ, past: int = TRACE_PAST
) -> tuple[torch.Tensor, ...]:
    """Trace inputs: ids, an all-ones mask, positions past..past+seq-1 and a random past cache."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)  # [B, T]
    mask = torch.ones(batch, past + seq, dtype=torch.int64)  # [B, total]
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()  # [B, T]
    kv_shape = (batch, config.n_head, past, config.head_dim)
    cache = [torch.randn(kv_shape, generator=generator).to(dtype) for _ in range(2 * config.n_layer)]
    return (ids, mask, positions, *cache)


def dynamic_shapes(config: ModelConfig) -> tuple:
    """Nested dynamic_shapes matching DecoderWrapper's signature, with io_spec's dim names."""
    kv = {0: io_spec.BATCH, 2: io_spec.PAST}
    return (
        {0: io_spec.BATCH, 1: io_spec.SEQ},
        {0: io_spec.BATCH, 1: io_spec.TOTAL},
        {0: io_spec.BATCH, 1: io_spec.SEQ},
        tuple(dict(kv) for _ in range(2 * config.n_layer)),
    )


def trace(model: CodeGen, opset: int | None = None):
    """Export `model` with torch.onnx.export(dynamo=True); return the onnx_ir Model (weights not copied).

    The returned graph's inputs and outputs carry io_spec's names, dtypes and dim names; this is
    checked here, so a torch or onnxscript upgrade that changes them fails loudly at export time.
    """
    config = model.config
    cache_dtype = cache_dtype_name(model.dtype)
    inputs = io_spec.decoder_inputs(config.n_layer, config.n_head, config.head_dim, cache_dtype)
    outputs = io_spec.decoder_outputs(config.n_layer, config.n_head, config.head_dim, config.vocab_size,
                                      cache_dtype)  # fmt: skip
    # The exporter logs one warning per missing torchvision op; CodeGen uses none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns about dims that share constraints (expected: batch appears in every input).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            DecoderWrapper(model.eval()),
            example_inputs(config, model.dtype),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(config),
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    ir_model = program.model
    _apply_io_spec(ir_model, inputs, outputs)
    ir_model.producer_name = "codegen-deploy"
    return ir_model


def _apply_io_spec(ir_model, inputs: list[io_spec.TensorSpec], outputs: list[io_spec.TensorSpec]) -> None:
    """Check names and dtypes against io_spec and give every dim io_spec's name.

    The exporter names the present length "past + seq"; io_spec calls it "total" (the mask's length),
    which is the same number at run time and lets consumers match dims by name.
    """
    import onnx_ir as ir

    graph = ir_model.graph
    for kind, values, specs in (("input", graph.inputs, inputs), ("output", graph.outputs, outputs)):
        names = [v.name for v in values]
        if names != [s.name for s in specs]:
            raise ExportError(f"the traced graph's {kind}s {names[:4]}... differ from io_spec: report this bug")
        for value, spec in zip(values, specs, strict=True):
            dtype = _ONNX_DTYPE_NAMES.get(value.dtype.name, value.dtype.name)
            if dtype != spec.dtype or len(value.shape) != len(spec.shape):
                raise ExportError(
                    f"graph {kind} {value.name} is {dtype} of rank {len(value.shape)}, io_spec says "
                    f"{spec.dtype} {list(spec.shape)}: report this bug"
                )
            value.shape = ir.Shape(list(spec.shape))


def graph_dtypes(ir_model) -> dict[str, str]:
    """{input/output name: numpy dtype name} of a graph."""
    graph = ir_model.graph
    return {v.name: _ONNX_DTYPE_NAMES.get(v.dtype.name, v.dtype.name) for v in [*graph.inputs, *graph.outputs]}


def initializer_bytes(ir_model) -> int:
    """Bytes of all initializers (weights and constants) of a graph."""
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save(ir_model, folder: Path) -> tuple[Path, Path]:
    """Write decoder.onnx and its weights, as one decoder.onnx.data beside it, into `folder`.

    onnx_ir streams each tensor from its torch storage to the data file: no second copy of the weights.
    External data is also what validation wants (the checker and ONNX Runtime map it instead of
    parsing it); inline_external_data moves small models' weights into the graph file afterwards.
    """
    import onnx_ir as ir

    graph_path = folder / io_spec.GRAPH_FILE
    ir.save(ir_model, graph_path, external_data=io_spec.DATA_FILE)
    return graph_path, folder / io_spec.DATA_FILE


def keep_external(ir_model, external_data: bool | None) -> bool:
    """Whether an export keeps decoder.onnx.data: forced (True/False), or when the weights exceed 2 GB."""
    return initializer_bytes(ir_model) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data


def release_weights(ir_model) -> None:
    """Drop the graph's references to the torch weights (call after saving).

    onnxscript's rewriter keeps every graph it optimised alive through module-level caches, so `del`
    alone would keep the weights in memory until the process ends.
    """
    for value in ir_model.graph.initializers.values():
        value.const_value = None
    ir_model.graph.initializers.clear()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(field_number: int, length: int) -> bytes:
    """Protobuf tag and length of a length-delimited field (wire type 2)."""
    return _varint(field_number << 3 | 2) + _varint(length)


def inline_external_data(graph_path: Path) -> None:
    """Move the weights of the graph's external data file into the graph file, one tensor at a time.

    onnx.save (and onnx_ir) would build the whole protobuf and its serialized bytes in memory: 3x the
    weights at peak (measured). Protobuf merges repeated occurrences of a message field, so the model
    is written as its weightless protobuf followed by one `graph { initializer { ... } }` record per
    tensor; every protobuf reader (onnx, ONNX Runtime, TensorRT) parses that as one graph.
    The data file is deleted afterwards. Only for graphs under 2 GB (the protobuf limit).
    """
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inline)
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    initializer_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    raw_data_field = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
    data_files = set()
    tmp = graph_path.with_name(graph_path.name + ".inline")
    with open(tmp, "wb") as out:
        out.write(model.SerializeToString())
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            data_path = graph_path.parent / info["location"]
            data_files.add(data_path)
            with open(data_path, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                raw = f.read(int(info["length"]))  # one tensor's bytes at a time
            meta = onnx.TensorProto()
            meta.CopyFrom(tensor)
            meta.ClearField("external_data")
            meta.ClearField("data_location")
            meta_bytes = meta.SerializeToString()
            raw_head = _length_delimited(raw_data_field, len(raw))
            tensor_len = len(meta_bytes) + len(raw_head) + len(raw)
            tensor_head = _length_delimited(initializer_field, tensor_len)
            out.write(_length_delimited(graph_field, len(tensor_head) + tensor_len))
            out.write(tensor_head)
            out.write(meta_bytes)
            out.write(raw_head)
            out.write(raw)
            del raw
    tmp.replace(graph_path)
    for data_path in data_files:
        data_path.unlink()


def export_onnx(
    model: CodeGen, folder: str | Path, *, opset: int | None = None, external_data: bool | None = None
) -> GraphInfo:
    """Trace `model` and write its decoder graph into `folder` (which must exist). Return what was written."""
    folder = Path(folder)
    ir_model = trace(model, opset=opset)
    keep = keep_external(ir_model, external_data)
    graph_path, data_path = save(ir_model, folder)
    release_weights(ir_model)
    if not keep:
        inline_external_data(graph_path)
        data_path = None
    dtypes = graph_dtypes(ir_model)
    info = GraphInfo(
        graph=graph_path,
        data=data_path,
        opset=ir_model.opset_imports[""],
        cache_dtype=dtypes[io_spec.present_name(0, "key")],
        logits_dtype=dtypes[io_spec.LOGITS],
        num_nodes=sum(1 for _ in ir_model.graph),
    )
    return info
