"""The embedded default checkpoint: made offline, loadable by us and by transformers."""

from __future__ import annotations

import json

import pytest
import torch

from codegen_deploy.cli.make_checkpoint import main
from codegen_deploy.config import ModelConfig
from codegen_deploy.errors import InputError
from codegen_deploy.model import load_checkpoint
from codegen_deploy.model.make_checkpoint import make_checkpoint
from codegen_deploy.model.tokenizer import load_tokenizer


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main([str(out), "--shape", "tiny", "--seed", "5"]) == 0
    assert "wrote a random tiny CodeGen checkpoint" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    config = ModelConfig.from_file(out)
    tok = load_tokenizer(out)
    assert config.eos_token_id == tok.eos_token_id and config.vocab_size >= tok.vocab_size
    model = load_checkpoint(out)
    ids = torch.tensor([tok.encode("def f(x):\n    return x\n")])
    logits, _ = model(ids)
    assert logits.std() > 0.5  # weights large enough that greedy decoding is not degenerate

    transformers = pytest.importorskip("transformers")
    hf = transformers.CodeGenForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits, atol=1e-4, rtol=0)


def test_same_seed_same_checkpoint(tmp_path):
    main([str(tmp_path / "a"), "--shape", "tiny", "--seed", "1"])
    main([str(tmp_path / "b"), "--shape", "tiny", "--seed", "1"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_real_tokenizer_and_bin_layout(tmp_path, real_tokenizer_dir):
    out = tmp_path / "real-tok"
    assert (
        main(
            [
                str(out),
                "--shape",
                "tiny",
                "--tokenizer",
                str(real_tokenizer_dir),
                "--layout",
                "bin",
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    config = ModelConfig.from_file(out)
    assert config.vocab_size == 50304 and config.eos_token_id == 50256  # 50295 ids rounded up to 64
    assert (out / "pytorch_model.bin").is_file() and (out / "vocab.json").is_file()
    assert load_checkpoint(out, dtype=torch.float16).dtype == torch.float16


def test_refuses_non_empty_output_and_unknown_shape(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main([str(tmp_path / "x"), "--shape", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "exists and is not empty" in err and "\n" not in err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "y"), "--shape", "7B"])


def test_bad_options_are_one_line(tmp_path, capsys):
    for shard in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "s"), "--shape", "tiny", "--shard-size-mb", shard])
        assert e.value.code == 2 and "--shard-size-mb: must be at least 1" in capsys.readouterr().err
    with pytest.raises(InputError, match="shard size must be at least 1 byte"):
        make_checkpoint(tmp_path / "s", shape="tiny", max_shard_bytes=0)
    assert main([str(tmp_path / "t"), "--shape", "tiny", "--tokenizer", "/nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tokenizer folder /nope does not exist") and ".partial" not in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no .partial named anywhere


def test_two_runs_into_one_folder(tmp_path, tiny_checkpoint, capsys):
    from codegen_deploy.atomic import staging_folder

    with staging_folder(tmp_path / "ck"):  # another run is writing ck
        assert main([str(tmp_path / "ck"), "--shape", "tiny", "--tokenizer", str(tiny_checkpoint)]) == 2
    assert "is being written by another run" in capsys.readouterr().err


def test_full_disk_is_one_line(tmp_path, tiny_checkpoint, capsys, tmpfs):
    with tmpfs(tmp_path / "small", "400k") as disk:
        for layout in ("safetensors", "bin"):
            argv = [str(disk / "ck"), "--shape", "tiny", "--tokenizer", str(tiny_checkpoint), "--layout", layout]
            assert main(argv) == 2
            assert "(No space left on device)" in capsys.readouterr().err
            assert list(disk.iterdir()) == []


def test_the_trained_tokenizer_has_an_id_for_every_embedding_row(tmp_path, monkeypatch, capsys):
    """A random checkpoint of a published shape (51200 rows) with the tokenizer trained here: every id the model
    can sample decodes to text (before, ids past the tokenizer's 2000 printed nothing, 96% of them)."""
    from codegen_deploy.cli import generate as generate_cli
    from codegen_deploy.model import make_checkpoint as make

    wide = ModelConfig(n_layer=1, n_embd=32, n_head=2, rotary_dim=8, n_positions=64, n_inner=64, vocab_size=51200)
    monkeypatch.setitem(make.SHAPES, "wide", wide)  # the 350M shape's vocabulary on a tiny body
    out = make_checkpoint(tmp_path / "wide", shape="wide", seed=0)
    config, tok = ModelConfig.from_file(out), load_tokenizer(out)
    assert config.vocab_size == tok.vocab_size == 51200
    assert all(tok.decode([i]) for i in range(config.vocab_size))
    assert generate_cli.main([str(out), "def f(x):", "--max-new-tokens", "8", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["ids"]) == 8 and len(body["text"]) >= 8
    small = load_tokenizer(make_checkpoint(tmp_path / "tiny", shape="tiny"))
    assert small.vocab_size == ModelConfig.from_file(tmp_path / "tiny").vocab_size == 2048


def test_generate_warns_when_most_ids_have_no_text(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint whose tokenizer covers few of the model's ids (one made before the trained tokenizer filled the
    embedding, or another model's tokenizer) is said so, once, instead of printing nothing without a word."""
    import shutil

    from codegen_deploy.cli import generate as generate_cli
    from codegen_deploy.model.make_checkpoint import train_tokenizer

    out = tmp_path / "mismatched"
    shutil.copytree(tiny_checkpoint, out)
    train_tokenizer(500).save(str(out / "tokenizer.json"))
    assert generate_cli.main([str(out), "def f(x):", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the model has 2048 token ids, the tokenizer 500") == 1
