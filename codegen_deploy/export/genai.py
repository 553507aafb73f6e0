"""genai_config.json: what onnxruntime-genai needs to load and run an export folder.

onnxruntime-genai has no CodeGen model type; its generic decoder ("llama") runs our graph when every
input/output name is declared (from io_spec) and the cache is not a shared buffer (our present is
past + seq long, a new tensor each step). CodeGen's rotary lives inside the graph, so genai's own
rotary settings do not matter. Its tokenizer (onnxruntime-extensions) reads tokenizer.json and needs a
tokenizer_config.json beside it: published CodeGen repos have one; for others write_tokenizer_config makes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import io_spec
from ..config import ModelConfig

GENAI_MODEL_TYPE = "llama"


def genai_config(config: ModelConfig, *, pad_token_id: int | None = None, max_length: int | None = None) -> dict:
    """The genai_config.json dict for an export of `config` (greedy search by default)."""
    context = config.n_positions
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.eos_token_id if pad_token_id is None else pad_token_id,
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": io_spec.GRAPH_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": config.head_dim,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_key_value_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "inputs": {
                    "input_ids": io_spec.INPUT_IDS,
                    "attention_mask": io_spec.ATTENTION_MASK,
                    "position_ids": io_spec.POSITION_IDS,
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
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config: ModelConfig) -> Path:
    """Write genai_config.json into an export folder; return its path."""
    path = Path(folder) / io_spec.GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai_config(config), indent=2) + "\n")
    return path


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
