"""ModelConfig from HF config.json, the size registry, and refusals."""

from __future__ import annotations

import json

import pytest

from codegen_deploy.config import PUBLISHED_SHAPES, ModelConfig, hub_id
from codegen_deploy.errors import ConfigError

HF_350M_MONO = {  # the fields of Salesforce/codegen-350M-mono's config.json that matter
    "model_type": "codegen",
    "n_layer": 20,
    "n_embd": 1024,
    "n_head": 16,
    "rotary_dim": 32,
    "n_positions": 2048,
    "n_ctx": 2048,
    "n_inner": None,
    "vocab_size": 51200,
    "layer_norm_epsilon": 1e-05,
    "activation_function": "gelu_new",
    "bos_token_id": 1,
    "eos_token_id": 50256,
}


def test_from_hf_config_reads_the_published_350m():
    config = ModelConfig.from_hf_config(HF_350M_MONO)
    assert config.head_dim == 64 and config.n_inner == 4096 and config.bos_token_id == 1
    assert config == PUBLISHED_SHAPES["350M"].__class__(**{**PUBLISHED_SHAPES["350M"].to_dict(), "bos_token_id": 1})


@pytest.mark.parametrize("size", list(PUBLISHED_SHAPES))
def test_parameter_count_equals_transformers(size):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    import torch

    config = PUBLISHED_SHAPES[size]
    with torch.device("meta"):
        model = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(**config.to_hf_config()))
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_round_trip_through_hf_dict():
    config = PUBLISHED_SHAPES["6B"]
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config


def test_non_codegen_is_refused():
    with pytest.raises(ConfigError, match="model_type is 'gptj', not 'codegen'"):
        ModelConfig.from_hf_config({**HF_350M_MONO, "model_type": "gptj"})


def test_missing_field_is_named():
    hf = dict(HF_350M_MONO)
    del hf["n_head"]
    with pytest.raises(ConfigError, match="lacks the field 'n_head'"):
        ModelConfig.from_hf_config(hf)


def test_bad_shapes_are_refused():
    with pytest.raises(ConfigError, match="not divisible by n_head"):
        ModelConfig.from_hf_config({**HF_350M_MONO, "n_head": 7})
    with pytest.raises(ConfigError, match="rotary_dim 96 must be even and between 2 and head_dim 64"):
        ModelConfig.from_hf_config({**HF_350M_MONO, "rotary_dim": 96})


def test_unreadable_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not readable JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="does not hold a JSON object"):
        ModelConfig.from_file(tmp_path)


def test_registry():
    assert hub_id("6B") == "Salesforce/codegen-6B-mono"
    assert hub_id("16B", "nl") == "Salesforce/codegen-16B-nl"
    with pytest.raises(ConfigError, match="unknown size '7B'"):
        hub_id("7B")
    with pytest.raises(ConfigError, match="unknown data 'python'"):
        hub_id("350M", "python")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layer": 1e9}, "n_layer 1000000000 is out of range"),  # was: killed for memory building the model
        ({"n_positions": 1e12}, "n_positions 1000000000000 is out of range"),  # was: an 8 TB rotary table
        ({"n_head": 0}, "n_head 0 is out of range"),  # was: ZeroDivisionError
        ({"n_embd": -1024}, "n_embd -1024 is out of range"),
        ({"vocab_size": 0}, "vocab_size 0 is out of range"),
        ({"n_inner": 10**7}, "n_inner 10000000 is out of range"),
        ({"n_layer": 2.5}, "n_layer is 2.5, not a whole number"),
        ({"n_layer": "20"}, "n_layer is '20', not a whole number"),
        ({"n_layer": True}, "n_layer is True, not a whole number"),
        ({"n_layer": None}, "lacks the field 'n_layer'"),
        ({"n_positions": float("inf")}, "n_positions is inf, not a whole number"),
        ({"rotary_dim": "x"}, "rotary_dim is 'x', not a whole number"),
        ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon is nan, not a number between 0 and 1"),
        ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon is '1e-5', not a number"),
        ({"eos_token_id": -1}, "eos_token_id is -1, not a token id"),
        ({"bos_token_id": [1, 2]}, r"bos_token_id is \[1, 2\], not a whole number"),
    ],
)
def test_numbers_are_checked_before_anything_is_allocated(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_hf_config({**HF_350M_MONO, **change})
    assert "\n" not in str(e.value)


def test_published_shapes_and_their_nulls_pass():
    for config in PUBLISHED_SHAPES.values():
        assert ModelConfig.from_hf_config(config.to_hf_config()) == config
    nulls = {"n_inner": None, "rotary_dim": None, "bos_token_id": None, "layer_norm_epsilon": None}
    config = ModelConfig.from_hf_config({**HF_350M_MONO, **nulls})
    assert config.n_inner == 4096 and config.rotary_dim == 64 and config.bos_token_id == 50256


def test_config_in_the_api_is_checked_too():
    with pytest.raises(ConfigError, match="n_layer is 2.0, not a whole number"):
        ModelConfig(n_layer=2.0, n_embd=64, n_head=4, rotary_dim=8, n_positions=64, n_inner=64, vocab_size=64)


def test_memory_counts_weights_and_rotary_tables():
    config = PUBLISHED_SHAPES["16B"]
    assert config.memory_bytes(2) == config.num_parameters() * 2 + 2048 * 64 * 4


def test_a_head_dim_that_disagrees_with_the_shape_is_refused():
    # A hand-edited CodeGen2 config (head_dim 128) whose n_head no longer gives 128-wide heads: read with CodeGen2's
    # 8-shard layout it would load scrambled weights without a word.
    with pytest.raises(ConfigError, match=r"head_dim 128 disagrees with n_embd / n_head = 1024 / 16 = 64"):
        ModelConfig.from_hf_config({**HF_350M_MONO, "head_dim": 128})
    with pytest.raises(ConfigError, match="head_dim is 64.5, not a whole number"):
        ModelConfig.from_hf_config({**HF_350M_MONO, "head_dim": 64.5})
    codegen2 = ModelConfig.from_hf_config({**HF_350M_MONO, "n_head": 8, "head_dim": 128})
    assert codegen2.head_dim == 128 and codegen2.qkv_shards == 8


def test_a_head_dim_that_agrees_but_is_not_codegen2s_keeps_the_4_shard_layout():
    config = ModelConfig.from_hf_config({**HF_350M_MONO, "head_dim": 64})
    assert config.head_dim == 64 and config.qkv_shards == 4
