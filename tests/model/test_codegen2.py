"""CodeGen2's layout: qkv_proj split for 8 model-parallel shards (config.json with head_dim 128 or 256).

The oracle is an outside implementation that knows the layout: CTranslate2's CodeGen converter (8 shards when
the config's head_dim is 128 or 256) and its generator. Random checkpoints in the CodeGen2 layout must give
CTranslate2's logits and greedy tokens through our loader, reference, exports and sessions; the same weights
read with the wrong shard count must not (the check has the power to fail).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from codegen_deploy.config import ModelConfig, qkv_shards_of
from codegen_deploy.errors import ConfigError
from codegen_deploy.model.make_checkpoint import make_checkpoint
from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.model.weights import load_checkpoint

ctranslate2 = pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")

# head_dim 128 with an odd number of heads, and 256 (CodeGen2-3.7B/7B/16B's width): both in the 8-shard rule.
SHAPES = {
    "odd-heads-128": ModelConfig(
        n_layer=2, n_embd=384, n_head=3, rotary_dim=64, n_positions=128, n_inner=256, vocab_size=2048, qkv_shards=8
    ),
    "wide-256": ModelConfig(
        n_layer=1, n_embd=512, n_head=2, rotary_dim=64, n_positions=128, n_inner=256, vocab_size=2048, qkv_shards=8
    ),
}


def test_the_shard_rule_reads_the_config():
    assert qkv_shards_of({"head_dim": 128}) == qkv_shards_of({"head_dim": 256}) == 8
    assert qkv_shards_of({}) == qkv_shards_of({"head_dim": 64}) == 4  # CodeGen1 configs have no head_dim
    config = SHAPES["wide-256"]
    hf = config.to_hf_config()
    assert hf["head_dim"] == 256 and ModelConfig.from_hf_config(hf) == config
    assert "head_dim" not in replace(config, qkv_shards=4).to_hf_config()
    with pytest.raises(ConfigError, match="8-shard"):
        replace(ModelConfig(1, 64, 4, 8, 64, 96, 100), qkv_shards=8)


@pytest.fixture(scope="module", params=list(SHAPES))
def codegen2(request, tmp_path_factory):
    """(checkpoint folder in the CodeGen2 layout, CTranslate2 model folder converted from it)."""
    from ctranslate2.converters import TransformersConverter

    root = tmp_path_factory.mktemp(f"codegen2-{request.param}")
    checkpoint = make_checkpoint(root / "checkpoint", config=SHAPES[request.param], seed=4)
    assert json.loads((checkpoint / "config.json").read_text())["head_dim"] in (128, 256)
    ct2 = root / "ct2"
    TransformersConverter(str(checkpoint)).convert(str(ct2), quantization="float32")
    return checkpoint, ct2


def _ct2_logits(ct2, ids: list[int]) -> np.ndarray:
    generator = ctranslate2.Generator(str(ct2), device="cpu", compute_type="float32", intra_threads=1)
    return np.asarray(generator.forward_batch([ids])).astype(np.float32)[0]  # [T, V]


def test_logits_and_greedy_tokens_equal_ctranslate2(codegen2):
    checkpoint, ct2 = codegen2
    model = load_checkpoint(checkpoint)
    assert model.config.qkv_shards == 8
    ids = np.random.default_rng(0).integers(0, 2000, 20).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()  # [T, V]
    theirs = _ct2_logits(ct2, ids)
    vocab = min(ours.shape[-1], theirs.shape[-1])
    diff = float(np.abs(ours[:, :vocab] - theirs[:, :vocab]).max())
    assert diff < 1e-3 * max(1.0, float(np.abs(theirs).max())), diff
    assert (ours[:, :vocab].argmax(-1) == theirs[:, :vocab].argmax(-1)).all()
    # Greedy generation: ours token for token as CTranslate2's.
    generator = ctranslate2.Generator(str(ct2), device="cpu", compute_type="float32", intra_threads=1)
    vocabulary = json.loads((ct2 / "vocabulary.json").read_text())
    prompt = [vocabulary[i] for i in ids]
    result = generator.generate_tokens(prompt, max_length=12, sampling_topk=1)
    their_tokens = [step.token_id for step in result]
    our_tokens, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(len(their_tokens)):
            token = int(model(torch.tensor([seq]))[0][0, -1].argmax())
            our_tokens.append(token)
            seq.append(token)
    assert our_tokens == their_tokens


def test_the_wrong_shard_count_is_caught_by_the_oracle(codegen2):
    checkpoint, ct2 = codegen2
    hf = json.loads((checkpoint / "config.json").read_text())
    del hf["head_dim"]  # read as CodeGen1: 4 shards
    (checkpoint / "config.json").write_text(json.dumps(hf))
    try:
        wrong = load_checkpoint(checkpoint)
    finally:
        hf["head_dim"] = hf["n_embd"] // hf["n_head"]
        (checkpoint / "config.json").write_text(json.dumps(hf))
    ids = list(range(1, 21))
    with torch.no_grad():
        ours = wrong(torch.tensor([ids]))[0][0].numpy()
    theirs = _ct2_logits(ct2, ids)
    vocab = min(ours.shape[-1], theirs.shape[-1])
    assert float(np.abs(ours[:, :vocab] - theirs[:, :vocab]).max()) > 1e-2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exports_of_the_codegen2_layout_match_the_reference(codegen2, tmp_path, dtype):
    """Both graph builders and the sessions run on the un-sharded q/k/v: an export checks against the
    reference (the export's own validation) and greedy tokens equal the reference's."""
    from codegen_deploy.pipeline import export_model
    from codegen_deploy.runtime import generate, open_session
    from codegen_deploy.runtime.generate import GenerationConfig

    checkpoint, _ = codegen2
    out = export_model(checkpoint, tmp_path / "export", dtype=dtype, progress=lambda line: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_config"]["qkv_shards"] == 8  # stated in the manifest
    fim = load_tokenizer(checkpoint).fim  # and that it fills in the middle, with which ids
    assert manifest["fill_in_the_middle"] == {
        "format": "codegen2",
        "<mask_1>": fim.mask,
        "<sep>": fim.sep,
        "<eom>": fim.eom,
    }
    model = load_checkpoint(checkpoint)
    ids = list(range(5, 17))
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=(-1,))
    with open_session("torch", checkpoint, threads=1) as reference:
        expected = generate(reference, _NoText(), [ids], config).ids
    with open_session("onnxruntime", out, threads=1) as session:
        assert generate(session, _NoText(), [ids], config).ids == expected
    assert model.config.qkv_shards == 8


class _NoText:
    eos_token_id = -1
    end_ids = (-1,)

    def decode(self, ids):
        return ""
