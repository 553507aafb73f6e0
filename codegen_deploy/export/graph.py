"""Writing ONNX graphs node by node: the node and weight writer shared by the plain and the fused decoder.

Weights go to one external data file, tensor by tensor, as they are made, so building a graph never
holds a second copy of the model in memory. Every graph gets the same explicit IR version (one that
the oldest supported ONNX Runtime reads), whatever onnx version writes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..artifacts import io_spec
from ..atomic import replaced, write_bytes_atomic
from ..dtypes import onnx_type
from ..errors import ExportError

# ONNX IR version of every graph this package writes. onnxruntime 1.18 (the oldest pyproject allows)
# reads IR <= 10; onnx >= 1.17 would otherwise stamp its own newest IR, which older runtimes refuse.
IR_VERSION = 10
# Default opset of the written graphs: LayerNormalization needs 17; onnxruntime 1.18 and TensorRT 10
# parse it. The decoder uses no op whose definition changes between opsets 17 and 21.
OPSET = 17
MS_DOMAIN = "com.microsoft"
ALIGN = 64  # byte alignment of tensors in the data file (lets ONNX Runtime map them in place)
INLINE_BYTES = 1024  # tensors smaller than this stay inside the .onnx file
# ONNX protobufs cannot exceed 2 GiB: above this the weights stay in one external data file.
EXTERNAL_DATA_THRESHOLD = 2 * 10**9


class GraphWriter:
    """Collects nodes with unique names and streams initializers to one external data file.

    The data file is a sequence of protobuf records, `graph { initializer { <tensor> raw_data: <bytes> } }`,
    with each tensor's bytes at the external offset (64-byte aligned). To ONNX readers it is an ordinary
    external data file (the record headers sit between tensors); appending the graph without those
    initializers turns it into the inline model (inline_records), with no copy of the weights.

    dtype: of activations, float weights and the cache. weight_format: "float", or one of
    quantize.QUANTIZED_WEIGHTS for quantized projections (fused graph only). shared: external
    tensors another graph in the same folder already wrote, by name (shared_weights); a weight of the
    same name, dtype and shape points at those bytes instead of being written again.
    """

    def __init__(
        self,
        data_path: Path,
        location: str,
        dtype: np.dtype,
        weight_format: str = "float",
        shared: dict[str, TensorProto] | None = None,
    ):
        self.file = open(data_path, "wb")  # noqa: SIM115 - closed in close()
        self.shared = shared or {}
        self.location = location
        self.offset = 0
        self.dtype = np.dtype(dtype)
        self.weight_format = weight_format
        self.initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple, str] = {}
        self._once: dict[tuple, object] = {}

    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        n_out: int = 1,
        domain: str = "",
        outputs: list[str] | None = None,
        **attrs,
    ) -> list[str]:
        """Append one node named `name`; return its output names (given, or made from `name`)."""
        if outputs is None:
            outputs = [f"{name}/out{i}" for i in range(n_out)] if n_out > 1 else [f"{name}/out"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def op1(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        """op() for the common single-output node: its one output name."""
        return self.op(op_type, inputs, name, **attrs)[0]

    def weight(self, name: str, array: np.ndarray | Callable[[], np.ndarray]) -> str:
        """Add an initializer (large ones to the data file); return its name.

        array: the values, or a function that makes them (not called for a shared tensor: model weights
        are passed as functions, computed tables as arrays, shared only when their shape matches).
        """
        other = self.shared.get(name)
        if other is not None and callable(array):  # a model weight, written by the same layer code: the same
            self.initializers.append(other)
            return name
        array = np.asarray(array() if callable(array) else array, order="C")  # (ascontiguousarray: scalars 1-D)
        tensor = TensorProto(name=name, data_type=onnx_type(array.dtype), dims=array.shape)
        if other is not None and (other.data_type, list(other.dims)) == (tensor.data_type, list(tensor.dims)):
            self.initializers.append(other)  # a table of the same name and shape (rotary): the same values
            return name
        if array.nbytes < INLINE_BYTES:
            tensor.raw_data = array.tobytes()
        else:
            header = _record_header(tensor, array.nbytes, self.offset)
            self.file.write(header)
            self.offset += len(header)
            self.file.write(memoryview(array.reshape(-1).view(np.uint8)))  # bytes: buffers know no bfloat16
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.location), ("offset", self.offset), ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(value))
            self.offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def const(self, value, dtype) -> str:
        """A small constant, shared by every node that needs the same value and dtype."""
        array = np.array(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const.{len(self._consts)}", array)
        return self._consts[key]

    def once(self, key: tuple, make: Callable[[], object]):
        """make()'s result, from the first call with `key`: nodes that several consumers share (one
        quantization of an activation that two projections read) are written once."""
        if key not in self._once:
            self._once[key] = make()
        return self._once[key]

    def cast(self, x: str, to: np.dtype, name: str, source: np.dtype | None = None) -> str:
        """Cast `x` (of dtype `source`, default the graph's dtype) to `to`; no node when they are equal."""
        if np.dtype(to) == np.dtype(source if source is not None else self.dtype):
            return x
        return self.op1("Cast", [x], name, to=onnx_type(to))

    def output(self, x: str, name: str) -> None:
        """Expose `x` under the graph output name `name`."""
        self.nodes.append(helper.make_node("Identity", [x], [name], name=f"{name}/Identity"))

    def close(self) -> None:
        self.file.close()


def shared_weights(graph_path: Path) -> dict[str, TensorProto]:
    """The external tensors of a written graph, by name, for GraphWriter(shared=...): a second graph in the
    same folder then stores only what the first one does not hold."""
    model = onnx.load(str(graph_path), load_external_data=False)
    return {t.name: t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}


def value_info(spec: io_spec.TensorSpec) -> onnx.ValueInfoProto:
    """The graph input/output declaration of an io_spec tensor."""
    return helper.make_tensor_value_info(spec.name, onnx_type(spec.dtype), list(spec.shape))


def make_model(
    g: GraphWriter,
    name: str,
    inputs: list[io_spec.TensorSpec],
    outputs: list[io_spec.TensorSpec],
    *,
    opset: int = OPSET,
    domains: tuple[str, ...] = (),
    doc: str = "",
) -> onnx.ModelProto:
    """The ModelProto of a finished writer, with IR_VERSION and `opset` (plus opset 1 of `domains`)."""
    graph = helper.make_graph(
        g.nodes,
        name,
        [value_info(s) for s in inputs],
        [value_info(s) for s in outputs],
        initializer=g.initializers,
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="codegen-deploy", doc_string=doc
    )


def write_graph(build, graph_path: Path, data_path: Path) -> None:
    """Write a graph and its external data under temporary names, then rename both into place.

    build(data_path_to_write, data_location) -> ModelProto writes the weights and returns the graph.
    """
    # The data file is renamed first: a graph in place always finds the weights it points at.
    with replaced(graph_path) as tmp_graph:
        with replaced(data_path) as tmp_data, torch.no_grad():
            proto = build(tmp_data, data_path.name)
        with open(tmp_graph, "wb") as f:
            f.write(proto.SerializeToString())


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


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _record_header(tensor: TensorProto, nbytes: int, offset: int) -> bytes:
    """The bytes of `graph { initializer { <tensor> raw_data: ` (up to the raw bytes) for a record written at
    `offset`, sized so that the raw bytes start at a multiple of ALIGN: the tensor's doc_string is the padding
    (zero bytes between records would not parse)."""
    meta = TensorProto()
    meta.CopyFrom(tensor)
    for padding in range(4 * ALIGN):
        meta.doc_string = " " * padding
        meta_bytes = meta.SerializeToString()
        raw_head = _length_delimited(_RAW_DATA_FIELD, nbytes)
        tensor_len = len(meta_bytes) + len(raw_head) + nbytes
        tensor_head = _length_delimited(_INITIALIZER_FIELD, tensor_len)
        graph_head = _length_delimited(_GRAPH_FIELD, len(tensor_head) + tensor_len)
        header = graph_head + tensor_head + meta_bytes + raw_head
        if (offset + len(header)) % ALIGN == 0:
            return header
    raise AssertionError("no padding aligns the record")  # unreachable: one more space adds one byte


def inline_records(graph_path: Path) -> None:
    """Make a graph written by GraphWriter self-contained: its data file plus the graph without the external
    initializers is the inline model (protobuf merges the repeated `graph` fields), so only the small graph
    is written. Only for graphs under 2 GB (the protobuf limit)."""
    model = onnx.load(str(graph_path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    if not external:
        return
    if len(locations) != 1:
        raise ExportError(f"{graph_path.name} has weights in {len(locations)} files: it cannot be inlined")
    data_path = graph_path.parent / locations.pop()
    inline = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inline)
    with open(data_path, "ab") as f:
        f.write(model.SerializeToString())
    os.replace(data_path, graph_path)


def relocate_external_data(graph_path: Path, old: str, new: str) -> None:
    """Point the graph's tensors stored in file `old` at file `new` (same offsets).

    For a graph that shares another graph's weights after inline_records renamed their data file: the
    bytes stay where they were, in a file of another name.
    """
    model = onnx.load(str(graph_path), load_external_data=False)
    moved = False
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value, moved = new, True
    if moved:
        write_bytes_atomic(graph_path, model.SerializeToString())


def inline_external_data(graph_path: Path) -> None:
    """Move the weights of the graph's external data file into the graph file, one tensor at a time.

    onnx.save would build the whole protobuf and its serialized bytes in memory: 3x the weights at
    peak (measured). Protobuf merges repeated occurrences of a message field, so the model is written
    as its weightless protobuf followed by one `graph { initializer { ... } }` record per tensor; every
    protobuf reader (onnx, ONNX Runtime, TensorRT) parses that as one graph. The data file is deleted
    afterwards. Only for graphs under 2 GB (the protobuf limit).
    """
    model = onnx.load(str(graph_path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if not external:
        return
    inline = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inline)
    data_files = set()
    with replaced(graph_path) as tmp, open(tmp, "wb") as out:
        out.write(model.SerializeToString())
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            data_path = graph_path.parent / info["location"]
            data_files.add(data_path)
            with open(data_path, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                raw = f.read(int(info["length"]))  # one tensor's bytes at a time
            meta = TensorProto()
            meta.CopyFrom(tensor)
            meta.ClearField("external_data")
            meta.ClearField("data_location")
            meta_bytes = meta.SerializeToString()
            raw_head = _length_delimited(_RAW_DATA_FIELD, len(raw))
            tensor_len = len(meta_bytes) + len(raw_head) + len(raw)
            tensor_head = _length_delimited(_INITIALIZER_FIELD, tensor_len)
            out.write(_length_delimited(_GRAPH_FIELD, len(tensor_head) + tensor_len))
            out.write(tensor_head)
            out.write(meta_bytes)
            out.write(raw_head)
            out.write(raw)
            del raw
    for data_path in data_files:
        data_path.unlink()


def graph_summary(graph_path: Path) -> dict:
    """{"opset", "ir_version", "nodes", "dtypes": {input/output name: numpy dtype name}} of a written graph."""
    model = onnx.load(str(graph_path), load_external_data=False)
    values = [*model.graph.input, *model.graph.output]
    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": model.ir_version,
        "nodes": len(model.graph.node),
        "dtypes": {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in values},
    }
