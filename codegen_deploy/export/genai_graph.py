"""decoder_genai.onnx: the fused graph with the inputs and logits onnxruntime-genai feeds and expects.

Why: genai_config.json pointing onnxruntime-genai at the plain graph (decoder.onnx) makes it decode with a
cache that a Concat copies every step, in float32, even where the export's fast graph is the fused one
(int8 / int4 weights, GroupQueryAttention on one in-place buffer). genai cannot run decoder_fused.onnx as
it is: it feeds no seqlens_k / total_sequence_length / logits_to_keep, and it binds logits as
[batch, seq, vocab] (or [batch, 1, vocab] when the graph declares that dim as 1), not [batch * keep, vocab].

What: a copy of the fused graph's GraphProto (loaded without its weights) where
- the inputs seqlens_k and total_sequence_length are replaced by attention_mask (int64 [batch, total]),
  computed from it as onnxruntime-genai's model builder does for its GQA models:
  seqlens_k = int32(ReduceSum(mask, axis 1) - 1), total_sequence_length = int32(Shape(mask)[1]);
- logits_to_keep is a constant 1 and logits become [batch, 1, vocab] (an Unsqueeze of [batch, vocab]):
  the static 1 is what makes genai (Model::IsPruned) bind last-token logits, for the prompt too;
- every initializer keeps its external_data entry, so the weights are read from the fused graph's data
  file(s) (decoder_fused.onnx.data, and decoder.onnx.data where the fused graph shares the plain graph's):
  the wrapper is a few hundred KB and duplicates no weight. It must stay in the same folder.

The cache inputs/outputs are untouched, whatever their dtype: genai reads the dtype of past_key_values.0.key
from the session and allocates its [batch, heads, max_length, head_dim] buffers in it (with
past_present_share_buffer true, genai_config's search.max_length is the buffer length).

Rows: onnxruntime-genai 0.18 pads a batch on the right, as the fused graph wants: its CPU mask marks a
row's trailing pad_token_id tokens 0 and all before them 1 (position_inputs.cpp), and each step appends a
1 (cpu/interface.cpp UpdateAttentionMask), so sum(mask) - 1 is exactly the row's seqlens_k and the new
token lands right after the row's real tokens. A prompt is given to genai right-padded with pad_token_id;
a prompt whose last real token is pad_token_id (here eos) is read as shorter (genai's rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifacts import io_spec
from ..atomic import replaced
from ..errors import ExportError

_PREFIX = "genai_wrapper/"


def build_genai_graph(fused: onnx.ModelProto) -> onnx.ModelProto:
    """The genai-shaped ModelProto made from the fused graph `fused` (loaded with load_external_data=False)."""
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    graph = model.graph
    names = [i.name for i in graph.input]
    for required in (io_spec.INPUT_IDS, io_spec.SEQLENS_K, io_spec.TOTAL_SEQUENCE_LENGTH, io_spec.past_name(0, "key")):
        if required not in names:
            raise ExportError(f"{graph.name} is not a fused decoder graph (no {required} input): export it again")
    outputs = [o.name for o in graph.output]
    if io_spec.LOGITS not in outputs:
        raise ExportError(f"{graph.name} has no {io_spec.LOGITS} output: export it again")

    dropped = {io_spec.SEQLENS_K, io_spec.TOTAL_SEQUENCE_LENGTH, io_spec.LOGITS_TO_KEEP}
    kept_inputs = [i for i in graph.input if i.name not in dropped]
    mask = helper.make_tensor_value_info(io_spec.ATTENTION_MASK, TensorProto.INT64, [io_spec.BATCH, io_spec.TOTAL])
    del graph.input[:]
    graph.input.extend([kept_inputs[0], mask, *kept_inputs[1:]])  # input_ids, attention_mask, caches

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, _PREFIX + name))
        return _PREFIX + name

    p = _PREFIX
    flat_logits = p + "logits_flat"
    head = [
        # seqlens_k = sum(mask) - 1 per row (int32 [batch])
        helper.make_node(
            "ReduceSum",
            [io_spec.ATTENTION_MASK, const("axis1", np.array([1], np.int64))],
            [p + "mask_sum"],
            p + "ReduceSum",
            keepdims=0,
        ),
        helper.make_node("Sub", [p + "mask_sum", const("one", np.array(1, np.int64))], [p + "seqlens_i64"], p + "Sub"),
        helper.make_node("Cast", [p + "seqlens_i64"], [io_spec.SEQLENS_K], p + "Cast_seqlens", to=TensorProto.INT32),
        # total_sequence_length = mask.shape[1] (int32 scalar)
        helper.make_node("Shape", [io_spec.ATTENTION_MASK], [p + "total_1d"], p + "Shape", start=1, end=2),
        helper.make_node(
            "Squeeze", [p + "total_1d", const("axis0", np.array([0], np.int64))], [p + "total_i64"], p + "Squeeze"
        ),
        helper.make_node(
            "Cast", [p + "total_i64"], [io_spec.TOTAL_SEQUENCE_LENGTH], p + "Cast_total", to=TensorProto.INT32
        ),
    ]
    if io_spec.LOGITS_TO_KEEP in names:  # graphs written before it existed return [batch, vocab] already
        head.append(
            helper.make_node(
                "Constant",
                [],
                [io_spec.LOGITS_TO_KEEP],
                p + "keep",
                value=numpy_helper.from_array(np.array([1], np.int64)),
            )
        )
    for node in graph.node:
        for k, out in enumerate(node.output):  # the node that wrote logits now writes [batch, vocab] under another name
            if out == io_spec.LOGITS:
                node.output[k] = flat_logits
    tail = helper.make_node(
        "Unsqueeze",
        [flat_logits, const("axis1_out", np.array([1], np.int64))],
        [io_spec.LOGITS],
        p + "Unsqueeze_logits",
    )
    nodes = [*head, *graph.node, tail]
    del graph.node[:]
    graph.node.extend(nodes)

    old = graph.output[outputs.index(io_spec.LOGITS)]
    vocab = old.type.tensor_type.shape.dim[-1]
    vocab = vocab.dim_value if vocab.HasField("dim_value") else vocab.dim_param
    logits = helper.make_tensor_value_info(io_spec.LOGITS, old.type.tensor_type.elem_type, [io_spec.BATCH, 1, vocab])
    old.CopyFrom(logits)
    graph.name = "codegen_decoder_genai"
    graph.doc_string = (
        "CodeGen fused decoder with onnxruntime-genai's inputs (attention_mask) and logits [batch, 1, vocab]"
    )
    return model


def write_genai_graph(folder: Path, check: bool = True) -> list[str]:
    """Write io_spec.GENAI_GRAPH_FILE beside the fused graph in `folder` (under a temporary name, renamed when
    complete); return the file names written. Its weights stay in the fused graph's data file(s)."""
    folder = Path(folder)
    source = folder / io_spec.FUSED_GRAPH_FILE
    if not source.is_file():
        raise ExportError(f"{folder} has no {io_spec.FUSED_GRAPH_FILE}: export with the fused graph first")
    proto = build_genai_graph(onnx.load(str(source), load_external_data=False))
    target = folder / io_spec.GENAI_GRAPH_FILE
    with replaced(target) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        if check:
            # The checker resolves external data relative to the graph's folder: the temporary file sits
            # beside the fused data files, so this checks the references too.
            onnx.checker.check_model(str(tmp))
    return [io_spec.GENAI_GRAPH_FILE]


def genai_max_context(folder: Path) -> int | None:
    """The longest context the fused graph's rotary tables cover (its metadata), or None if unrecorded."""
    model = onnx.load(str(Path(folder) / io_spec.FUSED_GRAPH_FILE), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    value = props.get(io_spec.FUSED_MAX_CONTEXT_KEY)
    return int(value) if value else None
