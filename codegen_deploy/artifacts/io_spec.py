"""The one place where the decoder graph's input/output names, dtypes and symbolic dims are defined.

The exporters, the manifest, every runtime backend and the C++ example read names from here, so no
component guesses them. Naming follows optimum's CodeGen decoder (past_key_values.{i}.key, present.{i}.value).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ArtifactError

# Files of an export folder.
GRAPH_FILE = "decoder.onnx"
DATA_FILE = "decoder.onnx.data"
MANIFEST_FILE = "manifest.json"
GENAI_CONFIG_FILE = "genai_config.json"
GENAI_GRAPH_FILE = "decoder_genai.onnx"  # the fused graph as onnxruntime-genai feeds it (export/genai_graph.py)
ENGINE_FILE = "decoder.engine"
ENGINE_MANIFEST_FILE = "engine.json"

# Symbolic dims. TOTAL is past + seq; it has a name of its own because exporters reject `Dim + Dim`.
BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "total"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

KV_KINDS = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (a numpy dtype name) and shape (ints and symbolic dim names) of one graph input or output."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def past_names(n_layer: int) -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ... (graph input order)."""
    return [past_name(i, kind) for i in range(n_layer) for kind in KV_KINDS]


def present_names(n_layer: int) -> list[str]:
    """present.0.key, present.0.value, present.1.key, ... (graph output order)."""
    return [present_name(i, kind) for i in range(n_layer) for kind in KV_KINDS]


def decoder_input_names(n_layer: int) -> list[str]:
    """The plain decoder's input names in graph order."""
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layer)]


def decoder_output_names(n_layer: int) -> list[str]:
    """The plain decoder's output names in graph order."""
    return [LOGITS, *present_names(n_layer)]


def check_decoder_io(
    names_in: Iterable[str],
    names_out: Iterable[str],
    n_layer: int,
    where: str,
    fix: str = "export it again with codegen-export",
    ordered: bool = False,
    fused: bool = False,
) -> None:
    """Raise a one-line ArtifactError unless `names_in` / `names_out` are the plain (or, with `fused`, the fused)
    decoder's input and output names for `n_layer` layers (in graph order too when `ordered`). where: the
    graph or engine, for the message; fix: what to do about it."""
    names_in, names_out = list(names_in), list(names_out)
    layers = {n.split(".")[1] for n in names_in if n.startswith("past_key_values.")}
    # The likeliest damage: a model config that does not belong to the graph.
    layer_note = f" (it has cache inputs for {len(layers)} layers but the model config says n_layer {n_layer})"
    want_in = fused_input_names(n_layer) if fused else decoder_input_names(n_layer)
    if fused and LOGITS_TO_KEEP not in names_in:
        want_in = fused_input_names(n_layer, keep=False)  # written before logits_to_keep: still served
    for kind, got, want in (
        ("inputs", names_in, want_in),
        ("outputs", names_out, decoder_output_names(n_layer)),
    ):
        if got == want or (not ordered and sorted(got) == sorted(want)):
            continue
        missing = [n for n in want if n not in got]
        extra = [n for n in got if n not in want]
        parts = [f"{what} {_few(names)}" for what, names in (("missing", missing), ("unexpected", extra)) if names]
        problem = ", ".join(parts) or f"in another order: {_few(got)}"
        note = layer_note if kind == "inputs" and len(layers) != n_layer else ""
        raise ArtifactError(f"{where} does not have the {n_layer}-layer decoder's {kind} ({problem}): {fix}{note}")


def cache_dtype(specs: Iterable[dict], where: str) -> str:
    """The KV cache's dtype name (one of dtypes.DTYPES, or int8: the fused graph's quantized cache) from a
    graph's or engine's input/output specs ({"name", "dtype"} dicts, as manifests record them); a one-line
    ArtifactError when there is no cache input or its dtype is not one of those. The one place every reader of
    a cache dtype asks."""
    from ..dtypes import DTYPES

    known = (*DTYPES, "int8")
    dtypes = {s["name"]: s["dtype"] for s in specs}
    dtype = dtypes.get(past_name(0, "key"))
    if dtype not in known:
        raise ArtifactError(f"{where} has a {dtype} cache, not one of {', '.join(known)}: export it again")
    return dtype


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def decoder_inputs(n_layer: int, n_head: int, head_dim: int, cache_dtype: str) -> list[TensorSpec]:
    """Graph inputs in order: ids, mask, positions, then the past cache of every layer."""
    kv_shape = (BATCH, n_head, PAST, head_dim)
    return [
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQ)),
        TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
        TensorSpec(POSITION_IDS, "int64", (BATCH, SEQ)),
        *(TensorSpec(name, cache_dtype, kv_shape) for name in past_names(n_layer)),
    ]


def decoder_outputs(n_layer: int, n_head: int, head_dim: int, vocab_size: int, cache_dtype: str) -> list[TensorSpec]:
    """Graph outputs in order: float32 logits, then the present cache of every layer (past + seq long)."""
    kv_shape = (BATCH, n_head, TOTAL, head_dim)
    return [
        TensorSpec(LOGITS, "float32", (BATCH, SEQ, vocab_size)),
        *(TensorSpec(name, cache_dtype, kv_shape) for name in present_names(n_layer)),
    ]


# The fused ONNX Runtime decoder (export/fused.py): GroupQueryAttention with one cache buffer per layer
# and kind, bound as both past and present so the graph writes the new tokens in place. Each row starts at
# index 0 of its buffer (right padding): row b holds its tokens at [0, seqlens_k[b] + 1); the rest is unread.
FUSED_GRAPH_FILE = "decoder_fused.onnx"
FUSED_DATA_FILE = "decoder_fused.onnx.data"
SEQLENS_K = "seqlens_k"  # int32 [batch]: tokens in the cache after this run, minus one (GQA's convention)
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: max over rows of seqlens_k + 1
# int64 [1]: how many of each row's last positions go through lm_head (1: the last token only); logits are
# [batch * keep, vocab], row b's positions at b * keep .. b * keep + keep - 1. Graphs written before it
# existed have neither the input nor more than one position per row; sessions still run them.
LOGITS_TO_KEEP = "logits_to_keep"
KEEP = "batch_x_keep"  # the logits' first dim: batch * logits_to_keep
MAX_LENGTH = "max_length"  # symbolic dim: the cache buffer's capacity in tokens
# The fused graph's metadata_props: where its rotary tables end, its weights format, its rotary variant, the
# dtype of its activations (its cache may be narrower; graphs written before the key had the cache's).
FUSED_MAX_CONTEXT_KEY, FUSED_WEIGHTS_KEY, FUSED_ROTARY_KEY = "max_context", "weights", "rotary"
FUSED_DTYPE_KEY = "dtype"


def fused_input_names(n_layer: int, keep: bool = True) -> list[str]:
    """The fused decoder's input names in graph order (keep=False: a graph from before LOGITS_TO_KEEP)."""
    return [INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *past_names(n_layer), *([LOGITS_TO_KEEP] if keep else [])]


def fused_decoder_inputs(n_layer: int, n_head: int, head_dim: int, cache_dtype: str) -> list[TensorSpec]:
    """Fused graph inputs in order: ids, seqlens_k, total_sequence_length, then every layer's cache buffer."""
    kv_shape = (BATCH, n_head, MAX_LENGTH, head_dim)
    return [
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQ)),
        TensorSpec(SEQLENS_K, "int32", (BATCH,)),
        TensorSpec(TOTAL_SEQUENCE_LENGTH, "int32", ()),
        *(TensorSpec(name, cache_dtype, kv_shape) for name in past_names(n_layer)),
        TensorSpec(LOGITS_TO_KEEP, "int64", (1,)),
    ]


def fused_decoder_outputs(
    n_layer: int, n_head: int, head_dim: int, vocab_size: int, cache_dtype: str
) -> list[TensorSpec]:
    """Fused graph outputs: float32 logits of each row's last LOGITS_TO_KEEP real tokens [batch * keep, vocab]
    ([batch, vocab] by default), then the caches (the same buffers as the inputs when bound in place)."""
    kv_shape = (BATCH, n_head, MAX_LENGTH, head_dim)
    return [
        TensorSpec(LOGITS, "float32", (KEEP, vocab_size)),
        *(TensorSpec(name, cache_dtype, kv_shape) for name in present_names(n_layer)),
    ]
