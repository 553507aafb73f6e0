"""The embedded default: a small CodeGen checkpoint in the Hugging Face layout, made offline on any machine.

Random weights of a chosen shape, and a byte-level BPE tokenizer trained with `tokenizers` on Python
source that ships with Python itself, with CodeGen's whitespace-run tokens and <|endoftext|>, and an id for
every row of the embedding (a model that samples an id the tokenizer lacks would print nothing).
With internet, users export real models instead; this exists so the demo and tests need no hub.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..atomic import check_output, staging_folder
from ..config import PUBLISHED_SHAPES, ModelConfig
from ..dtypes import dtype_name
from ..errors import InputError, TokenizerError
from .hub import TOKENIZER_FILES
from .reference import CodeGen
from .tokenizer import EOS_TOKEN, FIM_EOM, FIM_MASK, FIM_SEP, Tokenizer, load_tokenizer
from .weights import save_checkpoint

# Small shapes for demos and tests; the published shapes come from config.PUBLISHED_SHAPES.
SMALL_SHAPES = {
    "tiny": ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, n_inner=256, vocab_size=2048),
    "demo": ModelConfig(
        n_layer=4, n_embd=256, n_head=8, rotary_dim=16, n_positions=1024, n_inner=1024, vocab_size=2048
    ),
    # CodeGen2's layout (qkv_proj split for 8 shards, head_dim in config.json) on a small shape.
    "codegen2-tiny": ModelConfig(
        n_layer=2, n_embd=256, n_head=2, rotary_dim=64, n_positions=256, n_inner=512, vocab_size=2048, qkv_shards=8
    ),
    # For training here (make_checkpoint's train_seconds): in 3 to 5 minutes on 2 cores these reach a lower
    # held-out loss than "demo" (measured: 3.35 against 3.69 nats/token in 3 minutes), since a smaller model takes
    # more steps in the same time; "codegen2-small" is its CodeGen2 layout (one 128-wide head), "codegen2-demo"
    # demo's.
    "small": ModelConfig(
        n_layer=4, n_embd=128, n_head=4, rotary_dim=16, n_positions=1024, n_inner=512, vocab_size=2048
    ),
    "codegen2-small": ModelConfig(
        n_layer=4, n_embd=128, n_head=1, rotary_dim=32, n_positions=1024, n_inner=512, vocab_size=2048, qkv_shards=8
    ),
    "codegen2-demo": ModelConfig(
        n_layer=4, n_embd=256, n_head=2, rotary_dim=32, n_positions=1024, n_inner=1024, vocab_size=2048, qkv_shards=8
    ),
}
SHAPES = {**SMALL_SHAPES, **PUBLISHED_SHAPES}
TRAINED_VOCAB = 2048  # the small shapes' embedding rows

FIM_SPECIALS = (FIM_MASK, FIM_SEP, FIM_EOM)
# CodeGen's added tokens: runs of 31..2 spaces, then 9..2 tabs (Salesforce's tokenizer recipe).
WHITESPACE_RUNS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]

# Modules whose source trains the tokenizer: present in every CPython 3.10+.
_CORPUS_MODULES = (
    "argparse",
    "ast",
    "dataclasses",
    "functools",
    "json.decoder",
    "json.encoder",
    "textwrap",
    "typing",
    "collections",
    "inspect",
    "string",
    "random",
)


def train_tokenizer(vocab_size: int = TRAINED_VOCAB, fim: bool = False):
    """A byte-level BPE tokenizer trained on Python's own source, laid out like CodeGen's, with exactly
    `vocab_size` ids: BPE tokens as far as the corpus has merges for, CodeGen's whitespace runs, CodeGen2's
    fill-in-the-middle tokens if `fim`, then (for vocabularies the corpus cannot fill, e.g. the published
    shapes' 51200) `<|extra_N|>` tokens, so every id a model of that many rows samples decodes to text."""
    import importlib

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for name in _CORPUS_MODULES:
        path = inspect.getsourcefile(importlib.import_module(name))
        texts.append(Path(path).read_text(encoding="utf-8"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(WHITESPACE_RUNS) - (len(FIM_SPECIALS) if fim else 0),
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(run, normalized=True, special=False) for run in WHITESPACE_RUNS])
    if fim:
        add_fim_tokens(tok)
    extra = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_tokens([AddedToken(f"<|extra_{i}|>", normalized=False, special=False) for i in range(extra)])
    return tok


def add_fim_tokens(backend) -> None:
    """Add CodeGen2's fill-in-the-middle tokens to a `tokenizers` Tokenizer as special tokens (as CodeGen2's
    tokenizer has them: never split, decoded as written)."""
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in FIM_SPECIALS])


def make_checkpoint(
    output: str | Path,
    shape: str = "demo",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    layout: str = "safetensors",
    max_shard_bytes: int | None = None,
    config: ModelConfig | None = None,
    fim: bool | None = None,
    train_seconds: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a random-weight CodeGen checkpoint (config.json, weights, tokenizer files) into `output`, or with
    `train_seconds` one trained that long on Python's standard library (model.train).

    shape: one of SHAPES ("tiny", "demo", "codegen2-tiny", "small", ..., "350M", "2B", "6B", "16B"), or `config`
    a shape of its own (small weights, as the small shapes have). tokenizer: a folder with
    CodeGen tokenizer files to copy (the real one); default: train a small one here. fim: give the tokenizer
    CodeGen2's fill-in-the-middle tokens (default: for CodeGen2's layout, 8 qkv shards), added to a copied
    one as CodeGen2 adds them to CodeGen's. The embedding has max(shape's vocab, tokenizer size rounded up to
    64) rows and eos is the tokenizer's <|endoftext|>.

    train_seconds: start from a training init (std 0.02), train in float32 for this wall-clock budget
    (train.checkpoint_train_config: fill-in-the-middle samples too if `fim`), then cast to `dtype`; the
    TrainReport, the Python version and the data's sizes go to training.json. progress: gets training's lines.
    """
    if config is None and shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise InputError(f"the shard size must be at least 1 byte, got {max_shard_bytes}: give a positive size")
    if train_seconds is not None:
        from .train import TrainConfig

        TrainConfig(seconds=train_seconds)  # a bad budget is refused before anything is trained or written
    if tokenizer is not None:
        tokenizer_files = _tokenizer_files(Path(tokenizer))
        tok = load_tokenizer(Path(tokenizer))  # errors name the user's folder, not the temporary one
    hint = "choose another folder or delete it"
    output = check_output(output, hint=hint)
    with staging_folder(output, hint=hint, protect=[tokenizer] if tokenizer else []) as tmp:
        small = config is not None or shape in SMALL_SHAPES
        config = config or SHAPES[shape]
        fim = config.qkv_shards == 8 if fim is None else fim
        if tokenizer is None:  # as many ids as the embedding has rows
            train_tokenizer(config.vocab_size, fim=fim).save(str(tmp / "tokenizer.json"))
            tok = load_tokenizer(tmp)
        else:
            for path in tokenizer_files:
                shutil.copyfile(path, tmp / path.name)
            if fim and tok.fim is None:
                add_fim_tokens(tok._tok)
                tok._tok.save(str(tmp / "tokenizer.json"))  # read before vocab.json + merges.txt
                tok = Tokenizer(tok._tok, tok.eos_token_id)  # the same backend, its new tokens found
        vocab = max(config.vocab_size, -(-tok.vocab_size // 64) * 64)
        config = replace(config, vocab_size=vocab, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        if train_seconds is None:
            # Weights large enough that logits vary by several units: parity checks then mean something.
            model = CodeGen.random(config, dtype=dtype, seed=seed, std=0.1 if small else 0.02)
        else:
            model = _trained(config, tok, train_seconds, fim, seed, progress, tmp).to(dtype)
        save_checkpoint(model, tmp, layout=layout, max_shard_bytes=max_shard_bytes)
        hf_config = json.loads((tmp / "config.json").read_text())
        hf_config["torch_dtype"] = dtype_name(dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return output


def _trained(config: ModelConfig, tok: Tokenizer, seconds: float, fim: bool, seed: int, progress, folder: Path):
    """A float32 model of `config` trained for `seconds`; its training.json written into `folder`."""
    from .train import checkpoint_train_config, train

    model = CodeGen.random(config, dtype=torch.float32, seed=seed, std=0.02)
    report = train(model, tok, checkpoint_train_config(seconds, fim, seed), progress)
    record = {
        **report.to_dict(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "tokenizer_fingerprint": tok.fingerprint,
    }
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return model


def _tokenizer_files(folder: Path) -> list[Path]:
    """The CodeGen tokenizer files in `folder`; one line naming what is missing otherwise."""
    if not folder.is_dir():
        raise TokenizerError(
            f"tokenizer folder {folder} does not exist: give a folder with tokenizer.json or vocab.json + merges.txt"
        )
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    names = {p.name for p in files}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise TokenizerError(
            f"{folder} has no tokenizer.json and no vocab.json + merges.txt: give a CodeGen tokenizer folder"
        )
    return files
