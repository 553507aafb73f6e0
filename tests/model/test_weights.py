"""Checkpoint loading: every HF layout, the published checkpoints' extra buffers, and bad files."""

from __future__ import annotations

import json

import pytest
import torch

from codegen_deploy.errors import CheckpointError, ConfigError
from codegen_deploy.model import CodeGen, load_checkpoint, save_checkpoint
from codegen_deploy.model.weights import shard_qkv, to_hf_state_dict, unshard_qkv
from tests.conftest import TEST_CONFIGS

CONFIG = TEST_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def model():
    return CodeGen.random(CONFIG, seed=7, std=0.1)


def assert_same_weights(a: CodeGen, b: CodeGen) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=0, rtol=0, msg=k)


@pytest.mark.parametrize(
    "layout,shard_bytes",
    [("safetensors", None), ("safetensors", 60_000), ("bin", None), ("bin", 60_000)],
    ids=["safetensors", "sharded-safetensors", "bin", "sharded-bin"],
)
def test_every_layout_round_trips(model, tmp_path, layout, shard_bytes):
    save_checkpoint(model, tmp_path, layout=layout, max_shard_bytes=shard_bytes)
    index = list(tmp_path.glob("*.index.json"))
    assert bool(index) == (shard_bytes is not None)
    assert_same_weights(model, load_checkpoint(tmp_path))


def test_qkv_unshard_matches_codegen_layout():
    e = 8
    qkv = torch.arange(3 * e * e, dtype=torch.float32).view(3 * e, e)
    q, k, v = unshard_qkv(qkv)
    # Shard 0 holds rows [q0 q1 | v0 v1 | k0 k1] (E/4 = 2 rows each); shard 1 starts at row 6.
    torch.testing.assert_close(q[:2], qkv[0:2])
    torch.testing.assert_close(v[:2], qkv[2:4])
    torch.testing.assert_close(k[:2], qkv[4:6])
    torch.testing.assert_close(q[2:4], qkv[6:8])
    torch.testing.assert_close(shard_qkv(q, k, v), qkv)


def test_published_checkpoint_buffers_are_accepted(model, tmp_path):
    """Salesforce's pytorch_model.bin holds causal_mask and masked_bias per layer: not weights, not errors."""
    state = to_hf_state_dict(model)
    for i in range(CONFIG.n_layer):
        state[f"transformer.h.{i}.attn.causal_mask"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    save_checkpoint(model, tmp_path, layout="bin")
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_weights(model, load_checkpoint(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loads_straight_into_dtype(model, tmp_path, dtype):
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.to(dtype))


def _rewrite_bin(model, folder, edit):
    state = to_hf_state_dict(model)
    edit(state)
    save_checkpoint(model, folder, layout="bin")
    torch.save(state, folder / "pytorch_model.bin")


def test_unknown_tensor_is_refused(model, tmp_path):
    _rewrite_bin(model, tmp_path, lambda s: s.__setitem__("transformer.h.0.attn.rogue", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unknown tensor 'transformer\.h\.0\.attn\.rogue'"):
        load_checkpoint(tmp_path)


def test_missing_tensor_is_refused(model, tmp_path):
    _rewrite_bin(model, tmp_path, lambda s: s.pop("transformer.h.1.mlp.fc_out.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors, first 'blocks\.1\.mlp\.fc_out\.bias'"):
        load_checkpoint(tmp_path)


def test_wrong_shape_names_the_tensor(model, tmp_path):
    _rewrite_bin(model, tmp_path, lambda s: s.__setitem__("lm_head.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"lm_head\.bias in pytorch_model\.bin has shape \(5,\)"):
        load_checkpoint(tmp_path)


def test_extra_layer_is_refused(model, tmp_path):
    _rewrite_bin(model, tmp_path, lambda s: s.__setitem__("transformer.h.9.ln_1.bias", torch.zeros(64)))
    with pytest.raises(CheckpointError, match="beyond the 2 layers"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_file_names_the_file(model, tmp_path, name):
    save_checkpoint(model, tmp_path, layout="safetensors" if name.endswith("safetensors") else "bin")
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{name}.*corrupted or truncated"):
        load_checkpoint(tmp_path)


def test_missing_shard_is_named(model, tmp_path):
    save_checkpoint(model, tmp_path, max_shard_bytes=60_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} listed in model.safetensors.index.json"):
        load_checkpoint(tmp_path)


def test_no_weights_and_no_config(model, tmp_path):
    save_checkpoint(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_non_codegen_model_is_refused(model, tmp_path):
    save_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type is 'gpt2', not 'codegen'"):
        load_checkpoint(tmp_path)


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="^no such folder: .*nope/deeper/x: check the path"):
        load_checkpoint(tmp_path / "nope" / "deeper" / "x")


@pytest.mark.parametrize("sharded", [False, True])
def test_loading_and_downloading_prefer_the_same_layout(model, tmp_path, sharded):
    """Both layouts in one folder: the loader reads the files a download would fetch (safetensors)."""
    from codegen_deploy.model.hub import choose_weight_files
    from codegen_deploy.model.weights import weight_files

    shard = 20_000 if sharded else None
    save_checkpoint(model, tmp_path, layout="bin", max_shard_bytes=shard)
    save_checkpoint(model, tmp_path, layout="safetensors", max_shard_bytes=shard)
    chosen = choose_weight_files(sorted(p.name for p in tmp_path.iterdir()))
    loaded = [p.name for p in weight_files(tmp_path)]
    assert all(name.endswith(".safetensors") for name in loaded)
    assert set(loaded) == {n for n in chosen if not n.endswith(".json")}


class _Runs:
    """A pickle that runs a program when loaded unsafely: it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_malicious_pickle_is_refused_as_unsafe_without_running(model, tmp_path, capsys, legacy):
    from codegen_deploy.cli.export import main

    checkpoint, marker = tmp_path / "checkpoint", tmp_path / "ran"
    save_checkpoint(model, checkpoint)
    (checkpoint / "model.safetensors").unlink()
    state = {**to_hf_state_dict(model), "extra": _Runs(marker)}
    torch.save(state, checkpoint / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="holds objects that safe loading .* refuses.* it may be unsafe"):
        load_checkpoint(checkpoint)
    assert main(["--model", str(checkpoint), "--output", str(tmp_path / "out"), "--no-validate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "may be unsafe" in err[0] and "re-download" not in err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_model_larger_than_the_machine_is_refused_before_loading(model, tmp_path, monkeypatch):
    import codegen_deploy.memory

    def machine_of(nbytes: int) -> None:  # raising=False: without the check there is no such function
        monkeypatch.setattr(codegen_deploy.memory, "machine_memory_bytes", lambda: nbytes, raising=False)

    save_checkpoint(model, tmp_path)
    need = CONFIG.memory_bytes(4)
    machine_of(need - 1)  # a machine just too small
    monkeypatch.setattr(CodeGen, "__init__", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=r"\(0.1M parameters in float32\) takes 0.0 GB of memory, this machine has"):
        load_checkpoint(tmp_path)
    machine_of(need // 2 - 1)
    with pytest.raises(ConfigError, match="in float16"):
        load_checkpoint(tmp_path, dtype=torch.float16)
    monkeypatch.undo()
    machine_of(need)
    load_checkpoint(tmp_path)


def test_machine_memory_is_the_lower_of_ram_and_the_container_limit():
    import psutil

    from codegen_deploy.memory import machine_memory_bytes

    assert 0 < machine_memory_bytes() <= psutil.virtual_memory().total
