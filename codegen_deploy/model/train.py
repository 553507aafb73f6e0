"""Train a small CodeGen here, offline, on Python's own standard library: minutes on a laptop's CPU.

A random-weight model prints noise, never ends a filled-in middle and is never agreed with by a draft model, so
every behaviour measured on it is meaningless. A few minutes of training on the standard library (the same text
on every machine with the same Python) gives a model that writes code-like text: `train` does the training,
`trained_checkpoint` keeps trained checkpoints in a cache for benchmarks, demos and tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import max_threads
from ..errors import InputError
from .make_checkpoint import _CORPUS_MODULES, SHAPES, make_checkpoint
from .reference import CodeGen
from .tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "heldout")
HELDOUT_ONE_IN = 20  # a file is held out when the crc32 of its path is divisible by this: ~5% of the files
# Folders whose files are not what a user's code looks like: tests (thousands of asserts), vendored or third-party
# packages, GUI code that needs tkinter, machine-made tables (encodings' charmaps, pydoc_data's help text).
_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "encodings",
        "pydoc_data",
        "ensurepip",
        "__phello__",
        "__pycache__",
    }
)
# turtle.py is tkinter's; this.py is the Zen of Python in rot13; antigravity.py opens a web comic.
_EXCLUDED_FILES = frozenset({"turtle.py", "this.py", "antigravity.py"})
FIM_RATE = 0.5  # the share of fill-in-the-middle samples when training a model whose tokenizer has the tokens
LINE_CUTS = 0.0  # the share of those whose middle is whole lines rather than between two random characters
IGNORE = -100  # the target of a padding position: cross_entropy's ignore_index
PROGRESS_EVERY = 10.0  # seconds between progress lines


def stdlib_root() -> Path:
    """The folder of this Python's standard library (sysconfig's "stdlib" path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "train") -> list[Path]:
    """The .py files of this Python's standard library in `split` ("train" or "heldout"), sorted by path.

    Tests, third-party packages (site-packages), GUI code (tkinter, idlelib, turtle) and machine-made tables
    (encodings, pydoc_data) are left out. A file is held out when the crc32 of its path relative to the library's
    root is divisible by HELDOUT_ONE_IN (about 5% of the files), so the held-out slice is the same on every machine
    with the same Python version, and text never seen in training: evaluations use it as their default held-out
    text. The modules the small tokenizer is trained on (make_checkpoint._CORPUS_MODULES) are always in "train".
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    root = stdlib_root()
    tokenizer_corpus = set()
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            tokenizer_corpus.add(os.path.relpath(spec.origin, root).replace(os.sep, "/"))
    chosen = []
    for folder, dirs, files in os.walk(root):  # symlinked folders are not followed
        rel_folder = Path(folder).relative_to(root)
        dirs[:] = [
            d for d in dirs if d not in _EXCLUDED_DIRS and not (rel_folder == Path() and d.startswith("config-"))
        ]
        for name in files:
            if not name.endswith(".py") or name in _EXCLUDED_FILES:
                continue
            rel = (rel_folder / name).as_posix()
            heldout = rel not in tokenizer_corpus and zlib.crc32(rel.encode()) % HELDOUT_ONE_IN == 0
            if heldout == (split == "heldout"):
                chosen.append(rel)
    return [root / rel for rel in sorted(chosen)]


@dataclass(frozen=True)
class TrainConfig:
    """How to train: a wall-clock budget, the batch, the optimiser's schedule and the data's mix.

    seconds: the wall-clock budget of the optimisation loop (its periodic held-out evaluations included; reading
    the data and the first and last evaluations not); the learning rate warms up linearly over `warmup` steps, then
    decays along a cosine to 10% over the budget. steps: also stop after this many steps (the schedule then
    decays over whichever ends first): a run that must be the same on every machine sets it and a long `seconds`.
    fim_rate: the share of samples laid out for fill-in-the-middle (CodeGen2's layout; needs a tokenizer with
    its tokens); the rest are plain causal windows. eval_every: seconds between held-out evaluations;
    eval_windows: how many held-out windows each one reads. threads: torch's intra-op threads (default: all cores).
    """

    seconds: float = 180.0
    steps: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    fim_rate: float = 0.0
    eval_every: float = 60.0
    eval_windows: int = 64
    threads: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"training {name} must be a number, not {value!r}")
            if value < low or (low_open and value == low) or value > high:
                where = f"more than {low:g}" if low_open else f"at least {low:g}"
                where += "" if high == math.inf else f" and at most {high:g}"
                raise InputError(f"training {name} must be {where}, got {value:g}")

        def whole(name: str, low: int, high: float = math.inf) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"training {name} must be a whole number, not {value!r}")
            number(name, low, high)

        number("seconds", 0, low_open=True)
        if self.steps is not None:
            whole("steps", 1)
        whole("seq_len", 16)  # a fill-in-the-middle sample needs room for its 5 special tokens and some text
        whole("batch_size", 1)
        number("lr", 0, 1, low_open=True)
        whole("warmup", 0)
        number("weight_decay", 0)
        whole("seed", 0)
        number("fim_rate", 0, 1)
        number("eval_every", 0, low_open=True)
        whole("eval_windows", 1)
        if self.threads is not None:
            whole("threads", 1, max_threads())


@dataclass(frozen=True)
class TrainReport:
    """What a training run did. Losses are mean cross-entropies in nats per token; held-out ones are on fixed
    windows of the "heldout" split (the same windows before and after, and for every run with the same tokenizer
    and seq_len). heldout_fim_*: the loss of the middles (and their <eom>) of fixed held-out fill-in-the-middle
    samples, for a run with fim_rate > 0. history: (step, mean train loss since the last entry, held-out loss) at
    each evaluation. last_loss: the mean train loss of the last 20 steps. cpu_seconds: the CPU time the process
    used meanwhile: far below seconds times the threads, the run shared its cores with other work (and took fewer
    steps than it would on an idle machine)."""

    config: TrainConfig
    steps: int
    seconds: float
    cpu_seconds: float
    tokens: int
    first_loss: float
    last_loss: float
    heldout_before: float
    heldout_after: float
    heldout_fim_before: float | None
    heldout_fim_after: float | None
    history: tuple[tuple[int, float, float], ...]
    data: dict = field(default_factory=dict)  # {"train": {"files": n, "tokens": n}, "heldout": {...}}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["history"] = [list(row) for row in self.history]
        return out


class Corpus:
    """The token ids of a split of the standard library, packed into one stream with <|endoftext|> after each file,
    and the training samples drawn from it."""

    def __init__(self, tokenizer: Tokenizer, split: str):
        self.tokenizer = tokenizer
        self.files = len(stdlib_files(split))
        self.stream, self.ends = _tokenized(tokenizer, split)  # ends[i]: where file i's <|endoftext|> sits

    @property
    def tokens(self) -> int:
        return len(self.stream)

    def window(self, start: int, length: int) -> list[int]:
        return self.stream[start : start + length].tolist()

    def fim_sample(self, start: int, length: int, generator: torch.Generator) -> tuple[list[int], int]:
        """A fill-in-the-middle sample of at most `length` ids from the file at stream position `start`, and where
        its middle starts: a window of the file cut at two random characters into prefix, middle and suffix, laid
        out as tokenizer.infill_ids(prefix, suffix, middle) + [<eom>], so the model learns to write a middle and end
        it. Each part is encoded alone, as an infill prompt's parts are."""
        tok = self.tokenizer
        file = int(torch.searchsorted(self.ends, start, right=False))
        begin = 0 if file == 0 else int(self.ends[file - 1]) + 1
        end = int(self.ends[file])
        # 5 special tokens, and 3 ids of slack: text cut inside a token mostly encodes to one more on each side.
        budget = length - 5 - 3
        first = max(begin, min(start, end - budget))
        text = tok.decode(self.window(first, min(budget, end - first)))
        a, b = _cuts(text, generator)
        prefix, middle, suffix = (tok.encode(part) for part in (text[:a], text[a:b], text[b:]))
        # A cut inside a token (a run of spaces or of '#') can encode to several more ids: those come off the far
        # ends of the prefix and suffix, so that the sample still ends its middle with <eom>.
        excess = max(0, len(prefix) + len(middle) + len(suffix) + 5 - length)
        drop = min(excess, len(prefix))
        prefix, suffix = prefix[drop:], suffix[: max(0, len(suffix) - (excess - drop))]
        ids = [*tok.infill_ids(prefix, suffix, middle), tok.fim.eom]
        return ids[:length], len(ids) - len(middle) - 1

    def batch(
        self, size: int, seq_len: int, fim_rate: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random samples: inputs [size, seq_len] and targets [size, seq_len] (IGNORE where a short
        fill-in-the-middle sample is padded)."""
        rows = []
        starts = torch.randint(0, self.tokens - seq_len, (size,), generator=generator).tolist()
        fim = (torch.rand(size, generator=generator) < fim_rate).tolist()
        for start, as_fim in zip(starts, fim, strict=True):
            rows.append(
                self.fim_sample(start, seq_len + 1, generator)[0] if as_fim else self.window(start, seq_len + 1)
            )
        return _pad(rows, seq_len, self.tokenizer.eos_token_id)

    def heldout_windows(self, count: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` causal windows spread evenly over the stream: the same ones for every run."""
        last = self.tokens - seq_len - 1
        starts = [i * last // max(count - 1, 1) for i in range(count)]
        return _pad([self.window(s, seq_len + 1) for s in starts], seq_len, self.tokenizer.eos_token_id)

    def heldout_fim(self, count: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` fixed fill-in-the-middle samples whose targets are only their middles and <eom>."""
        generator = torch.Generator().manual_seed(0)
        last = self.tokens - seq_len - 1
        rows = []
        for i in range(count):
            ids, middle_at = self.fim_sample(i * last // max(count - 1, 1), seq_len + 1, generator)
            rows.append((ids, middle_at))
        inputs, targets = _pad([ids for ids, _ in rows], seq_len, self.tokenizer.eos_token_id)
        for row, (_, middle_at) in enumerate(rows):
            targets[row, : max(middle_at - 1, 0)] = IGNORE  # target j is id j + 1: the middle's first id is kept
        return inputs, targets


def _cuts(text: str, generator: torch.Generator) -> tuple[int, int]:
    """Where a fill-in-the-middle sample's middle starts and ends in `text`: two random characters (CodeGen2's
    objective), or for a share LINE_CUTS of the samples whole lines: one line in half of them, else 2 to 4, as an
    editor's gaps are (verify.infilling.plan_gaps)."""
    if torch.rand(1, generator=generator).item() >= LINE_CUTS:
        a, b = sorted(torch.randint(0, len(text) + 1, (2,), generator=generator).tolist())
        return a, b
    bounds = [0, *(i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text)), len(text)]
    i = int(torch.randint(0, len(bounds) - 1, (1,), generator=generator))
    lines = (
        1 if torch.rand(1, generator=generator).item() < 0.5 else int(torch.randint(2, 5, (1,), generator=generator))
    )
    return bounds[i], bounds[min(i + lines, len(bounds) - 1)]


def _pad(rows: list[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.int64)
    for i, ids in enumerate(rows):
        ids = torch.tensor(ids, dtype=torch.int64)
        inputs[i, : len(ids) - 1] = ids[:-1]
        targets[i, : len(ids) - 1] = ids[1:]
    return inputs, targets


_TOKENIZED: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _tokenized(tokenizer: Tokenizer, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's files encoded and packed (cached for the process: the whole library takes seconds to encode)."""
    key = (tokenizer.fingerprint, split)
    if key not in _TOKENIZED:
        texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files(split)]
        encoded = tokenizer._tok.encode_batch(texts, add_special_tokens=False)
        pieces, ends, total = [], [], 0
        for e in encoded:
            pieces.append(torch.tensor([*e.ids, tokenizer.eos_token_id], dtype=torch.int32))
            total += len(e.ids) + 1
            ends.append(total - 1)
        _TOKENIZED[key] = (torch.cat(pieces), torch.tensor(ends, dtype=torch.int64))
    return _TOKENIZED[key]


def _lr(config: TrainConfig, step: int, fraction: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from lr down to lr / 10 as `fraction` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    return config.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(fraction, 1.0))))


@torch.no_grad()
def _loss(model: CodeGen, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 16) -> float:
    """The mean loss per target token, `chunk` rows at a time."""
    total, count = 0.0, 0
    for i in range(0, len(inputs), chunk):
        logits, _ = model(inputs[i : i + chunk])
        t = targets[i : i + chunk]
        total += F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((t != IGNORE).sum())
    return total / max(count, 1)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def train(
    model: CodeGen, tokenizer: Tokenizer, config: TrainConfig, progress: Callable[[str], None] | None = None
) -> TrainReport:
    """Train `model` (float32, in place) on the "train" split of the standard library for `config.seconds`:
    AdamW, warm-up then cosine decay, gradients clipped to norm 1. Leaves the model in eval mode and returns a
    TrainReport; `progress` gets a line every few seconds."""
    progress = progress or (lambda line: None)
    if model.dtype != torch.float32:
        raise InputError(f"training runs in float32, and the model is {model.dtype}: build it in float32")
    if config.seq_len > model.config.n_positions:
        raise InputError(
            f"training seq_len {config.seq_len} is longer than the model's {model.config.n_positions} positions"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(
            f"the tokenizer has {tokenizer.vocab_size} ids and the model only {model.config.vocab_size} rows"
        )
    if config.fim_rate > 0 and tokenizer.fim is None:
        raise InputError("fill-in-the-middle training needs a tokenizer with <mask_1>, <sep> and <eom>: set fim_rate 0")
    train_data, heldout_data = Corpus(tokenizer, "train"), Corpus(tokenizer, "heldout")
    heldout = heldout_data.heldout_windows(config.eval_windows, config.seq_len)
    heldout_fim = heldout_data.heldout_fim(config.eval_windows, config.seq_len) if config.fim_rate > 0 else None

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or max_threads())
    try:
        model.eval()
        before = _loss(model, *heldout)
        fim_before = None if heldout_fim is None else _loss(model, *heldout_fim)
        progress(f"held-out loss {before:.3f} before training; training for {_clock(config.seconds)}")
        decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings; not biases, norms
        rest = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=config.lr,
            betas=(0.9, 0.95),
        )
        generator = torch.Generator().manual_seed(config.seed)
        model.train()
        losses: list[float] = []
        history: list[tuple[int, float, float]] = []
        tokens, step, heldout_now, since_eval = 0, 0, before, 0
        start, cpu_start = time.perf_counter(), time.process_time()
        last_eval = last_line = start
        while True:
            now = time.perf_counter()
            fraction = (now - start) / config.seconds
            if config.steps is not None:
                fraction = max(fraction, step / config.steps)
            if fraction >= 1.0:
                break
            inputs, targets = train_data.batch(config.batch_size, config.seq_len, config.fim_rate, generator)
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step, fraction)
            logits, _ = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            tokens += int((targets != IGNORE).sum())
            step += 1
            since_eval += 1
            now = time.perf_counter()
            if now - last_eval >= config.eval_every:
                model.eval()
                heldout_now = _loss(model, *heldout)
                model.train()
                history.append((step, sum(losses[-since_eval:]) / since_eval, heldout_now))
                since_eval, last_eval = 0, time.perf_counter()
            if now - last_line >= PROGRESS_EVERY:
                recent = losses[-20:]
                progress(
                    f"step {step}  {_clock(now - start)}/{_clock(config.seconds)}  loss {sum(recent) / len(recent):.2f}"
                    f"  held-out {heldout_now:.2f}  {tokens / (now - start) / 1000:.1f}k tok/s"
                )
                last_line = now
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        model.eval()
        after = _loss(model, *heldout)
        fim_after = None if heldout_fim is None else _loss(model, *heldout_fim)
        if since_eval:
            history.append((step, sum(losses[-since_eval:]) / since_eval, after))
    finally:
        torch.set_num_threads(threads)
        model.eval()
    progress(f"held-out loss {before:.3f} -> {after:.3f} after {step} steps ({tokens:,} tokens) in {_clock(seconds)}")
    return TrainReport(
        config=config,
        steps=step,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        tokens=tokens,
        first_loss=losses[0] if losses else math.nan,
        last_loss=sum(losses[-20:]) / len(losses[-20:]) if losses else math.nan,
        heldout_before=before,
        heldout_after=after,
        heldout_fim_before=fim_before,
        heldout_fim_after=fim_after,
        history=tuple(history),
        data={
            "train": {"files": train_data.files, "tokens": train_data.tokens},
            "heldout": {"files": heldout_data.files, "tokens": heldout_data.tokens},
        },
    )


def checkpoint_train_config(seconds: float, fim: bool, seed: int) -> TrainConfig:
    """The training make_checkpoint(train_seconds=...) does: the defaults, with FIM_RATE fill-in-the-middle
    samples for a tokenizer with the tokens."""
    return TrainConfig(seconds=seconds, seed=seed, fim_rate=FIM_RATE if fim else 0.0)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where trained checkpoints are kept: `cache_dir`, else $CODEGEN_DEPLOY_CACHE, else
    ~/.cache/codegen-deploy/trained ($XDG_CACHE_HOME in place of ~/.cache where set)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("CODEGEN_DEPLOY_CACHE"):
        return Path(os.environ["CODEGEN_DEPLOY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "codegen-deploy" / "trained"


def trained_checkpoint(
    shape: str = "demo",
    seconds: float = 180.0,
    fim: bool | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    tokenizer: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The folder of a `shape` checkpoint trained for `seconds` on the standard library (make_checkpoint with
    train_seconds), from the cache (cache_root) if it is there, else trained now and written there atomically.

    fim: train for fill-in-the-middle too (default: for CodeGen2's layout). tokenizer: a checkpoint folder whose
    tokenizer to use (a draft model shares its main model's). A checkpoint is found again only for the same shape,
    seconds, fim, seed, Python version (its standard library is the data), tokenizer, and training settings.
    """
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    fim = SHAPES[shape].qkv_shards == 8 if fim is None else fim
    config = checkpoint_train_config(seconds, fim, seed)
    fingerprint = load_tokenizer(Path(tokenizer)).fingerprint if tokenizer is not None else None
    python = ".".join(map(str, sys.version_info[:3]))
    settings = {"shape": asdict(SHAPES[shape]), "train": asdict(config), "python": python, "tokenizer": fingerprint}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{shape}{'-fim' if fim else ''}-{seconds:g}s-seed{seed}-py{python}-{digest}"
    folder = cache_root(cache_dir) / name
    if (folder / "training.json").is_file():
        return folder
    return make_checkpoint(
        folder, shape=shape, seed=seed, tokenizer=tokenizer, fim=fim, train_seconds=seconds, progress=progress
    )
