"""genai_config.json: what onnxruntime-genai needs to load and run an export folder.

onnxruntime-genai has no CodeGen model type; its generic decoder ("llama") runs our graphs when every
input/output name is declared (from io_spec). Two graphs can be described (genai_config's `graph`):
- "plain": decoder.onnx, whose present is past + seq long (a new tensor each step), so the cache is not a
  shared buffer (past_present_share_buffer false). Every export has it; it decodes slowly (Concat-grown
  float32 cache, float weights even in an int8/int4 export).
- "fused": genai_graph.py's decoder_genai.onnx, the fused graph (GroupQueryAttention, quantized weights
  where exported) with genai's attention_mask input and [batch, 1, vocab] logits. Its cache buffers are
  shared (past_present_share_buffer true): genai allocates them [batch, heads, search.max_length,
  head_dim] in the graph's cache dtype, so max_length is capped at the fused graph's rotary tables.
  write_genai_graph (genai_graph.py) must have written it first.
CodeGen's rotary lives inside either graph, so genai's own rotary settings do not matter. Its tokenizer
(onnxruntime-extensions) reads tokenizer.json and needs a tokenizer_config.json beside it: published CodeGen
repos have one; for others write_tokenizer_config makes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import io_spec
from ..atomic import write_text_atomic
from ..config import ModelConfig
from ..errors import ExportError
from .genai_graph import genai_max_context, write_genai_graph

GENAI_MODEL_TYPE = "llama"
GENAI_GRAPHS = ("plain", "fused")


def genai_config(
    config: ModelConfig,
    *,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    graph: str = "plain",
    max_context: int | None = None,
    threads: int | None = None,
) -> dict:
    """The genai_config.json dict for an export of `config` (greedy search by default).

    graph: "plain" (decoder.onnx) or "fused" (decoder_genai.onnx, see genai_graph.py); max_context: where
    the fused graph's rotary tables end (its metadata), which bounds search.max_length; threads: the
    session's intra_op_num_threads (default: onnxruntime's choice).
    """
    if graph not in GENAI_GRAPHS:
        raise ExportError(f"unknown genai graph {graph!r}: choose one of {', '.join(GENAI_GRAPHS)}")
    fused = graph == "fused"
    context = min(config.n_positions, max_context or config.n_positions)
    session_options = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:
        session_options["intra_op_num_threads"] = threads
    inputs = {"input_ids": io_spec.INPUT_IDS, "attention_mask": io_spec.ATTENTION_MASK}
    if not fused:  # the fused graph counts positions from the mask (GroupQueryAttention's seqlens_k)
        inputs["position_ids"] = io_spec.POSITION_IDS
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.eos_token_id if pad_token_id is None else pad_token_id,
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": io_spec.GENAI_GRAPH_FILE if fused else io_spec.GRAPH_FILE,
                "session_options": session_options,
                "head_size": config.head_dim,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_key_value_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "inputs": {
                    **inputs,
                    "past_key_names": io_spec.past_name(0, "key").replace(".0.", ".%d."),
                    "past_value_names": io_spec.past_name(0, "value").replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": io_spec.LOGITS,
                    "present_key_names": io_spec.present_name(0, "key").replace(".0.", ".%d."),
                    "present_value_names": io_spec.present_name(0, "value").replace(".0.", ".%d."),
                },
            },
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": min(context, max_length or context),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": fused,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config: ModelConfig, graph: str = "plain", threads: int | None = None) -> Path:
    """Write genai_config.json into an export folder (under a temporary name, renamed); return its path.

    graph "fused" describes decoder_genai.onnx, which must be in the folder (genai_graph.write_genai_graph).
    """
    folder = Path(folder)
    max_context = None
    if graph == "fused":
        if not (folder / io_spec.GENAI_GRAPH_FILE).is_file():
            raise ExportError(
                f"{folder} has no {io_spec.GENAI_GRAPH_FILE}: write it first (genai_graph.write_genai_graph)"
            )
        max_context = genai_max_context(folder)
    body = genai_config(config, graph=graph, max_context=max_context, threads=threads)
    path = folder / io_spec.GENAI_CONFIG_FILE
    write_text_atomic(path, json.dumps(body, indent=2) + "\n")
    return path


def write_genai_files(folder: Path, config: ModelConfig, fused: bool) -> Path:
    """genai_config.json for an export folder, describing the fused graph where the folder has one (its
    decoder_genai.onnx written here first), else the plain graph (any decoder_genai.onnx removed: it would
    read a fused graph that is gone); return the config's path."""
    folder = Path(folder)
    if fused:
        write_genai_graph(folder)
    else:
        (folder / io_spec.GENAI_GRAPH_FILE).unlink(missing_ok=True)
    return write_genai_config(folder, config, graph="fused" if fused else "plain")


def write_tokenizer_config(folder: Path, config: ModelConfig, eos_token: str = "<|endoftext|>") -> Path | None:
    """Write a minimal tokenizer_config.json (CodeGen's GPT-2 style BPE) when the folder lacks one.

    Returns the path written, or None when there was one already or no tokenizer.json to describe.
    """
    folder = Path(folder)
    path = folder / "tokenizer_config.json"
    if path.exists() or not (folder / "tokenizer.json").is_file():
        return None
    body = {
        "tokenizer_class": "CodeGenTokenizer",
        "add_prefix_space": False,
        "bos_token": eos_token,
        "eos_token": eos_token,
        "unk_token": eos_token,
        "model_max_length": config.n_positions,
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path
