"""onnxruntime-genai loads an export through its genai_config.json and generates the reference's greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codegen_deploy.artifacts import io_spec
from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.model.weights import load_checkpoint

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install '.[genai]')")

NEW_TOKENS = 8


def test_genai_config_declares_io_spec_names(fp32_export):
    config = json.loads((fp32_export / io_spec.GENAI_CONFIG_FILE).read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama" and decoder["filename"] == io_spec.GRAPH_FILE
    assert decoder["inputs"]["past_key_names"] % 1 == io_spec.past_name(1, "key")
    assert decoder["outputs"]["present_value_names"] % 1 == io_spec.present_name(1, "value")
    assert config["search"]["past_present_share_buffer"] is False


def test_genai_greedy_tokens_equal_reference(fp32_export, tiny_checkpoint):
    prompt = [5, 17, 99, 300, 42, 7]
    model = og.Model(str(fp32_export))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    ours = [int(t) for t in generator.get_sequence(0)]

    reference = load_checkpoint(tiny_checkpoint)
    ids = torch.tensor([prompt])  # [1, T]
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits, _ = reference(ids)
            ids = torch.cat((ids, logits[:, -1].argmax(-1, keepdim=True)), dim=1)  # [1, T + 1]
    assert ours == ids[0].tolist()


def test_genai_tokenizer_matches_ours(fp32_export):
    """The export carries what onnxruntime-extensions' tokenizer needs (tokenizer.json + tokenizer_config.json)."""
    text = "def add(a, b):\n    return a + b\n"
    tokenizer = og.Tokenizer(og.Model(str(fp32_export)))
    ids = [int(t) for t in tokenizer.encode(text)]
    assert ids == load_tokenizer(fp32_export).encode(text)
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == text
