"""Which ops of an fp16 graph ONNX Runtime's CPU provider computes in float32 (between Casts it inserts, as it
has no float16 kernel for them): learnt from a weightless copy of the graph, never from ORT's kernel registry."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from ..runtime.ort import create_session, import_onnxruntime, session_options

# Ops that move or reshape data without arithmetic: ORT may run them in float32 between its casts, which
# changes no value, so they are left out of the list.
_PRECISION_FREE = frozenset(
    {
        "Concat",
        "Expand",
        "Flatten",
        "Gather",
        "Identity",
        "Reshape",
        "Slice",
        "Split",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
    }
)
_INLINED = re.compile(r"_inlfunc_([A-Za-z0-9]+)_")


def _weightless_model(graph_path: Path):
    """The graph at `graph_path` with every float initializer made by a ConstantOfShape node instead.

    Same nodes and dtypes, no weights: ONNX Runtime places kernels on it exactly as on the real graph, at
    the cost of a few megabytes whatever the model's size.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    kept, makers = [], []
    for t in graph.initializer:
        if t.data_type not in floats:
            kept.append(t)
            continue
        shape = numpy_helper.from_array(np.array(t.dims, np.int64), f"{t.name}.shape")
        kept.append(shape)
        zero = helper.make_tensor("value", t.data_type, [1], [0])
        makers.append(helper.make_node("ConstantOfShape", [shape.name], [t.name], value=zero))
    nodes = [*makers, *graph.node]
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(kept)
    graph.node.extend(nodes)
    return model


def _elem_types(model) -> dict[str, int]:
    """ONNX element type of every value of `model`, by name, from onnx's shape inference."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def cpu_float32_fallbacks(graph_path: Path) -> list[str] | None:
    """Op types of the graph that ONNX Runtime's CPU provider computes in float32 between casts it inserts
    (it has no float16 kernel for them), so an fp16 graph validated on CPU checks the wiring and the
    float16 rounding between those ops, not float16 arithmetic inside them.

    Learnt from the model ORT writes after placing kernels on a weightless copy of the graph (ops whose
    float16 inputs became float32), not from ORT's kernel registry: reading that registry loads every
    provider library in-process, which kills the process (SIGSEGV) on GPU machines without TensorRT's
    libraries. None when it cannot be learnt.
    """
    import onnx
    from onnx import TensorProto

    ort = import_onnxruntime()
    try:
        model = _weightless_model(graph_path)
        before = _elem_types(model)
        options = session_options(ort)
        options.log_severity_level = 3
        # Kernels placed on the graph as it is: an optimised graph would fuse or fold the nodes looked up below.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        with tempfile.TemporaryDirectory() as tmp:
            options.optimized_model_filepath = str(Path(tmp) / "placed.onnx")
            create_session(model.SerializeToString(), options, ["CPUExecutionProvider"])
            placed = onnx.load(options.optimized_model_filepath)
        after = _elem_types(placed)
    except Exception:  # ORT and onnx raise many types; the list is informative, never worth failing for
        return None
    fp16, fp32 = TensorProto.FLOAT16, TensorProto.FLOAT
    original = {n.name: n for n in model.graph.node if n.name}
    fp16_ops = {n.op_type for n in original.values() if any(before.get(i) == fp16 for i in n.input)}
    ops = set()
    for node in placed.graph.node:
        if node.op_type == "Cast" or not any(after.get(i) == fp32 for i in node.input):
            continue
        if node.name in original:  # one of ours: did a float16 input become float32?
            was = original[node.name]
            if any(before.get(o) == fp16 and after.get(p) == fp32 for o, p in zip(was.input, node.input, strict=False)):
                ops.add(node.op_type)
        # A function op without a float16 kernel is inlined: its nodes' outputs are named _inlfunc_<Op>_...
        elif (m := next(filter(None, map(_INLINED.search, node.output)), None)) and m.group(1) in fp16_ops:
            ops.add(m.group(1))
    return sorted(ops - _PRECISION_FREE)
