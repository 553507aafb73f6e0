"""A small CodeGen trained here on Python's standard library: the data's split, the samples, the loss, the cache."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from codegen_deploy.cli.make_checkpoint import main
from codegen_deploy.errors import InputError
from codegen_deploy.model import train as train_module
from codegen_deploy.model.make_checkpoint import _CORPUS_MODULES, SMALL_SHAPES, make_checkpoint
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.model.train import (
    IGNORE,
    Corpus,
    TrainConfig,
    stdlib_files,
    stdlib_root,
    train,
    trained_checkpoint,
)
from codegen_deploy.model.weights import load_checkpoint


def test_stdlib_split_is_disjoint_deterministic_and_keeps_the_tokenizer_corpus_in_train(monkeypatch):
    train_files, heldout = stdlib_files("train"), stdlib_files("heldout")
    assert train_files and heldout and not set(train_files) & set(heldout)
    assert 0.02 < len(heldout) / (len(train_files) + len(heldout)) < 0.1  # about one file in 20
    assert train_files == sorted(train_files) and stdlib_files("train") == train_files
    rel = {p.relative_to(stdlib_root()).as_posix() for p in heldout}
    # What crc32 of the relative path holds out, in every CPython 3.10+: the same files on every machine.
    assert {"copy.py", "glob.py", "shutil.py"} <= rel
    names = {p.relative_to(stdlib_root()).as_posix() for p in train_files}
    everything = names | rel
    assert not any(part in {"test", "tests", "site-packages", "idlelib"} for n in everything for part in n.split("/"))
    with pytest.raises(InputError, match="unknown split"):
        stdlib_files("validation")
    # Were every file held out, the tokenizer's corpus would still be training text, and nothing else.
    monkeypatch.setattr(train_module, "HELDOUT_ONE_IN", 1)
    kept = {p.relative_to(stdlib_root()).as_posix() for p in stdlib_files("train")}
    assert len(kept) == len(_CORPUS_MODULES) and {"argparse.py", "json/decoder.py", "collections/__init__.py"} <= kept


@pytest.fixture(scope="module")
def fim_tokenizer(codegen2_checkpoint):
    return load_tokenizer(codegen2_checkpoint)


def test_a_fim_sample_has_the_infill_layout_and_ends_with_eom(fim_tokenizer):
    tok, fim = fim_tokenizer, fim_tokenizer.fim
    corpus = Corpus(tok, "heldout")
    text = "".join(p.read_text(encoding="utf-8") + "<|endoftext|>" for p in stdlib_files("heldout"))
    generator = torch.Generator().manual_seed(0)
    for start in torch.randint(0, corpus.tokens - 65, (200,), generator=generator).tolist():
        ids, middle_at = corpus.fim_sample(start, 65, generator)
        mask = ids.index(fim.mask)
        assert ids[-1] == fim.eom and ids.count(fim.mask) == 2 and len(ids) <= 65
        after_suffix = ids.index(tok.eos_token_id, mask)
        assert (
            ids[after_suffix : after_suffix + 3]
            == [tok.eos_token_id, fim.sep, fim.mask]
            == ids[middle_at - 3 : middle_at]
        )
        prefix, suffix, middle = ids[:mask], ids[mask + 1 : after_suffix], ids[middle_at:-1]
        assert tok.decode(prefix + middle + suffix) in text  # the three parts are one window of a file, cut twice
    inputs, targets = corpus.batch(8, 64, 1.0, generator)
    for row in range(8):
        kept = targets[row][targets[row] != IGNORE].tolist()
        assert kept[-1] == fim.eom and fim.mask in inputs[row].tolist()
    inputs, _ = corpus.batch(8, 64, 0.0, generator)
    assert fim.mask not in inputs.flatten().tolist() and fim.eom not in inputs.flatten().tolist()
    inputs, targets = corpus.heldout_fim(4, 64)
    for row in range(4):  # only the middle and its <eom> are scored
        first = int((targets[row] != IGNORE).nonzero()[0])
        assert inputs[row, first].item() == fim.mask and inputs[row, first - 1].item() == fim.sep


def test_training_lowers_the_heldout_loss(tiny_tokenizer):
    config = replace(SMALL_SHAPES["tiny"], eos_token_id=tiny_tokenizer.eos_token_id)
    model = CodeGen.random(config, seed=0, std=0.02)
    lines = []
    run = TrainConfig(seconds=120, steps=60, seq_len=64, batch_size=8, warmup=5, eval_windows=16)
    report = train(model, tiny_tokenizer, run, lines.append)
    assert report.steps == 60 and report.tokens == 60 * 8 * 64 and not model.training
    assert report.heldout_after < report.heldout_before - 1.0, report  # 7.6 (uniform over 2048 ids) to ~5.5
    assert report.last_loss < report.first_loss - 1.0
    assert report.history[-1] == (60, pytest.approx(report.history[-1][1]), report.heldout_after)
    assert report.data["heldout"]["files"] == len(stdlib_files("heldout"))
    assert lines[-1].startswith(f"held-out loss {report.heldout_before:.3f} -> {report.heldout_after:.3f}")
    with pytest.raises(InputError, match="needs a tokenizer with <mask_1>"):
        train(model, tiny_tokenizer, replace(run, fim_rate=0.5))


def test_train_config_refuses_bad_values_in_one_line():
    for kwargs, message in (
        ({"seconds": 0}, "training seconds must be more than 0, got 0"),
        ({"seconds": float("nan")}, "training seconds must be a number"),
        ({"fim_rate": 1.5}, "training fim_rate must be at least 0 and at most 1, got 1.5"),
        ({"seq_len": 8}, "training seq_len must be at least 16, got 8"),
        ({"steps": 0}, "training steps must be at least 1, got 0"),
        ({"batch_size": 2.5}, "training batch_size must be a whole number"),
    ):
        with pytest.raises(InputError, match=message) as e:
            TrainConfig(**kwargs)
        assert "\n" not in str(e.value)


def test_trained_checkpoint_is_cached_loads_and_a_draft_shares_its_tokenizer(tmp_path, monkeypatch):
    # The main model learns to fill in the middle too: its tokenizer differs from the one a draft would train.
    main_model = trained_checkpoint("tiny", seconds=1, fim=True, seed=0, cache_dir=tmp_path)
    assert main_model.parent == tmp_path and main_model.name.startswith("tiny-fim-1s-seed0-py")
    record = json.loads((main_model / "training.json").read_text())
    assert record["steps"] >= 1 and record["config"]["fim_rate"] == 0.5 and record["heldout_fim_after"] > 0
    assert record["python"] and record["data"]["train"]["tokens"] > 1_000_000
    model = load_checkpoint(main_model)
    assert not model.training and model.config.eos_token_id == load_tokenizer(main_model).eos_token_id

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(train_module, "train", no_training)
    assert trained_checkpoint("tiny", seconds=1, fim=True, seed=0, cache_dir=tmp_path) == main_model
    monkeypatch.undo()

    draft = trained_checkpoint("tiny", seconds=1, seed=1, cache_dir=tmp_path, tokenizer=main_model)
    assert draft != main_model and draft.parent == tmp_path
    assert load_tokenizer(draft).fingerprint == load_tokenizer(main_model).fingerprint
    assert (
        load_tokenizer(draft).fingerprint != load_tokenizer(make_checkpoint(tmp_path / "own", shape="tiny")).fingerprint
    )
    assert load_checkpoint(draft).config.vocab_size == model.config.vocab_size


def test_cli_trains_and_says_the_heldout_loss(tmp_path, capsys):
    out = tmp_path / "trained"
    assert main([str(out), "--shape", "tiny", "--train", "0.02"]) == 0
    captured = capsys.readouterr()
    record = json.loads((out / "training.json").read_text())
    assert f"held-out loss {record['heldout_before']:.3f} -> {record['heldout_after']:.3f}" in captured.out
    assert str(out) in captured.out and "held-out loss" in captured.err  # progress on stderr
    assert record["config"]["seconds"] == pytest.approx(1.2) and record["config"]["fim_rate"] == 0.0


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "1441"])
def test_cli_refuses_a_bad_training_time_in_one_line(tmp_path, capsys, minutes):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "x"), "--shape", "tiny", "--train", minutes])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--train: must be more than 0 and at most 1440 minutes" in err
    assert not (tmp_path / "x").exists()
