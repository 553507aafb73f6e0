"""What an export costs in quality, measured as the field measures it: perplexity over code, and against a
reference (the checkpoint, another export, or its saved log-probabilities) the KL divergence per token, its
99th percentile and maximum, and top-1 agreement (llama.cpp's `llama-perplexity --kl-divergence` reports).

Texts are read in windows of `context` tokens that move by `stride`: each token after a document's first is
scored once, by the first window that holds it after the overlap, so every score but the first window's sees
at least context - stride tokens before it. The plan is a value (plan_windows); a session then reads each
window into one row slot and returns the logits at every position (Session.score_slot).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import staging_folder
from ..errors import InputError
from ..runtime.sampling import log_softmax
from ..runtime.session import Session, piece_size

MAX_TEXT_BYTES = 4 * 2**20  # a larger file is not source code a user means to score
MAX_FILES = 100_000
MAX_TOKENS = 2**20  # every scored token's reference log-probabilities may be saved: bound what a run holds
TEXT_SUFFIXES = (".py", ".c", ".h", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".rb", ".sh", ".txt", ".md")
SAVED_META = "logprobs.json"
SAVED_ARRAY = "logprobs.npy"


@dataclass(frozen=True)
class Window:
    """Tokens start..end of a document read as one sequence; the targets first..end-1 are scored (each by
    the logits at the position before it)."""

    document: int
    start: int
    end: int
    first: int

    @property
    def scored(self) -> int:
        return self.end - self.first


def plan_windows(lengths: Sequence[int], context: int, stride: int) -> list[Window]:
    """Windows over documents of `lengths` tokens: at most `context` tokens each, starting every `stride`
    tokens (fewer than `context`, so that windows overlap), so that each token but a document's first is
    scored exactly once, after at least context - stride tokens of its document where it has them."""
    if context < 2:
        raise InputError(f"the context must hold at least 2 tokens, got {context}")
    if not 1 <= stride < context:
        raise InputError(f"the stride must be at least 1 and less than the context ({context}), got {stride}")
    windows = []
    for doc, n in enumerate(lengths):
        start, first = 0, 1  # a document's first token has nothing before it to be predicted from
        while first < n:
            end = min(start + context, n)
            windows.append(Window(doc, start, end, first))
            start, first = start + stride, end
    return windows


def read_texts(source: str | Path | None, pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, text) of the texts to score: a .jsonl file (a "text" field, or a string, per line), a folder
    (its source files, recursively; `pattern` a glob on their names, e.g. "*.py"), a glob, or one file;
    None: the held-out slice of this Python's standard library (model.train.stdlib_files), which every
    machine has and the small trained models never saw."""
    if source is None:
        from ..model.train import stdlib_files

        paths = stdlib_files("heldout")
    else:
        path = Path(source)
        if path.is_file() and path.name.endswith(".jsonl"):
            return _read_jsonl(path)
        if path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file())
            if pattern is None:
                paths = [p for p in paths if p.suffix in TEXT_SUFFIXES]
        elif path.is_file():
            paths = [path]
        else:
            paths = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
            if not paths:
                raise InputError(f"no text matches {source}: give a folder, a glob, a file or a .jsonl of texts")
        if pattern is not None:
            paths = [p for p in paths if fnmatch.fnmatch(p.name, pattern)]
    if len(paths) > MAX_FILES:
        raise InputError(f"{source} has {len(paths)} files, more than {MAX_FILES}: give a smaller folder or a glob")
    texts = []
    for p in paths:
        if p.stat().st_size > MAX_TEXT_BYTES:
            continue
        try:
            texts.append((str(p), p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue  # binary or unreadable: not a text to score
    if not texts:
        raise InputError(f"no UTF-8 text file in {source}: give source files, or --pattern to choose them")
    return texts


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    if path.stat().st_size > MAX_TEXT_BYTES * 64:
        raise InputError(f"{path} is larger than {MAX_TEXT_BYTES * 64 // 2**20} MiB: give a smaller file")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row if isinstance(row, str) else row["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path} line {n} is not a JSON string or an object with a 'text' field ({e})") from e
        if not isinstance(text, str):
            raise InputError(f"{path} line {n}: 'text' must be a string")
        texts.append((f"{path}:{n}", text))
    if not texts:
        raise InputError(f"{path} holds no texts: one JSON string or {{'text': ...}} per line")
    return texts


def tokenize_texts(tokenizer, texts: list[tuple[str, str]], max_tokens: int) -> list[list[int]]:
    """The texts' token ids, documents of fewer than 2 tokens left out, cut so that all hold at most
    `max_tokens` tokens together (the last one kept cut short)."""
    if not 2 <= max_tokens <= MAX_TOKENS:
        raise InputError(f"--max-tokens must be between 2 and {MAX_TOKENS}, got {max_tokens}")
    documents, total = [], 0
    for _, text in texts:
        ids = tokenizer.encode(text)[: max_tokens - total]
        if len(ids) >= 2:
            documents.append(ids)
            total += len(ids)
        if total >= max_tokens - 1:
            break
    if not documents:
        raise InputError("the texts hold no document of 2 tokens or more: give longer texts")
    return documents


def window_logits(session: Session, ids: Sequence[int], window: Window) -> np.ndarray:
    """Logits [scored, V] of the distributions that predict each scored token of the window, read through
    row slot 0 of `session` in the pieces it reads prompts in."""
    session.truncate_slot(0, 0)
    tokens = list(ids[window.start : window.end])
    size = session.prompt_chunk or len(tokens)
    rows, at = [], 0
    while at < len(tokens):
        n = piece_size(len(tokens) - at, size, session.min_piece)
        rows.append(session.score_slot(0, tokens[at : at + n]))
        at += n
    logits = np.concatenate(rows)  # [T, V]: row j predicts token j + 1
    return logits[window.first - window.start - 1 : window.end - window.start - 1]


class SavedLogProbs:
    """Log-probabilities saved by a run (save_logprobs): a reference that need not run again. A folder with
    logprobs.npy [scored tokens, V] float32 (memory-mapped) and logprobs.json (the model, the window plan and
    the token ids, which must match the run that reads it)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        try:
            self.meta = json.loads((folder / SAVED_META).read_text())
            self.array = np.load(folder / SAVED_ARRAY, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"{folder} holds no saved log-probabilities ({e}): write them with --save-logprobs") from e
        self.name = self.meta.get("model", str(folder))

    @staticmethod
    def is_saved(path: str | Path) -> bool:
        return (Path(path) / SAVED_META).is_file()

    def check(self, documents: list[list[int]], context: int, stride: int, vocab: int) -> None:
        """Refuse, in one line, log-probabilities saved over other tokens, windows or vocabulary."""
        saved = (self.meta.get("documents"), self.meta.get("context"), self.meta.get("stride"))
        if saved != (documents, context, stride):
            raise InputError(
                "the saved log-probabilities were computed over other tokens or windows: run with the same texts, "
                f"tokenizer, --max-tokens, --context ({self.meta.get('context')}) and --stride "
                f"({self.meta.get('stride')}) as the run that saved them"
            )
        if self.array.shape[1] != vocab:
            raise InputError(
                f"the saved log-probabilities have {self.array.shape[1]} tokens' columns, the model {vocab}"
            )


@dataclass(frozen=True)
class QualityReport:
    """Perplexity of a model over scored tokens and, with a reference, how far its distributions are from
    the reference's: KL(reference || model) per token (mean, median, 99th percentile, max), top-1 agreement,
    and the paired difference of their negative log-likelihoods (mean ± standard error)."""

    model: str
    tokens: int
    documents: int
    context: int
    stride: int
    seconds: float
    perplexity: float
    perplexity_se: float
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    nll_delta: float | None = None
    nll_delta_se: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The report for people: a few lines."""
        lines = [
            f"{self.model}: {self.tokens:,} tokens scored in {self.documents} documents "
            f"(windows of {self.context}, stride {self.stride}) in {self.seconds:.1f} s",
            f"  perplexity        {self.perplexity:.4f} ± {self.perplexity_se:.4f}",
        ]
        if self.reference is not None:
            lines += [
                f"  reference         {self.reference}",
                f"  its perplexity    {self.reference_perplexity:.4f}",
                f"  mean NLL change   {self.nll_delta:+.6f} ± {self.nll_delta_se:.6f} nats/token",
                f"  KL divergence     mean {self.kl_mean:.6f}  median {self.kl_median:.6f}  "
                f"p99 {self.kl_p99:.6f}  max {self.kl_max:.6f}",
                f"  top-1 agreement   {100 * self.top1_agreement:.2f} %",
            ]
        return "\n".join(lines)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    n = len(values)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


BLOCK = 256  # rows of [V] float64 log-probabilities compared at once: bounded memory on a 51,200-token vocabulary


def measure(
    session: Session,
    documents: list[list[int]],
    context: int,
    stride: int,
    reference: Session | SavedLogProbs | None = None,
    save_to: str | Path | None = None,
    names: tuple[str, str | None] = ("model", None),
    progress: Callable[[str], None] | None = None,
    every: float = 5.0,
) -> QualityReport:
    """Score `documents` with `session` (and `reference`, window by window); with `save_to`, save the
    session's log-probabilities of every scored position as a reference for later runs (atomically: a
    failed run leaves nothing). Progress lines every `every` seconds."""
    windows = plan_windows([len(d) for d in documents], context, stride)
    total = sum(w.scored for w in windows)
    vocab = session.config.vocab_size
    if isinstance(reference, SavedLogProbs):
        reference.check(documents, context, stride, vocab)
    for s in (session, reference):
        if isinstance(s, Session) and s.slot_count == 0:
            s.open_slots(1)
    nll, ref_nll, kl, agree = (np.zeros(total) for _ in range(4))
    start = last = time.perf_counter()
    meta = {"model": names[0], "context": context, "stride": stride, "documents": documents}
    with _saving(save_to, (total, vocab), meta) as saved:
        done = 0
        for window in windows:
            ids = documents[window.document]
            logits = window_logits(session, ids, window)
            ref_logits = window_logits(reference, ids, window) if isinstance(reference, Session) else None
            for at in range(0, window.scored, BLOCK):
                rows = slice(at, min(at + BLOCK, window.scored))
                span = slice(done + rows.start, done + rows.stop)
                targets = np.asarray(ids[window.first + rows.start : window.first + rows.stop])
                pick = (np.arange(len(targets)), targets)
                lp = log_softmax(logits[rows])
                nll[span] = -lp[pick]
                if saved is not None:
                    saved[span] = lp
                if reference is None:
                    continue
                ref = log_softmax(ref_logits[rows]) if ref_logits is not None else reference.array[span].astype(float)
                ref_nll[span] = -ref[pick]
                kl[span] = (np.exp(ref) * (ref - lp)).sum(axis=-1)
                agree[span] = ref.argmax(axis=-1) == lp.argmax(axis=-1)
            done += window.scored
            if progress and (time.perf_counter() - last >= every or done == total):
                last = time.perf_counter()
                progress(f"scored {done:,}/{total:,} tokens  perplexity {math.exp(nll[:done].mean()):.4f}")
    mean_nll, se_nll = _mean_se(nll)
    report = dict(
        model=names[0],
        tokens=total,
        documents=len(documents),
        context=context,
        stride=stride,
        seconds=time.perf_counter() - start,
        perplexity=math.exp(mean_nll),
        perplexity_se=math.exp(mean_nll) * se_nll,
    )
    if reference is not None:
        delta, delta_se = _mean_se(nll - ref_nll)
        kl = np.maximum(kl, 0.0)  # rounding below zero where the two distributions are equal
        report.update(
            reference=names[1] or getattr(reference, "name", "reference"),
            reference_perplexity=math.exp(ref_nll.mean()),
            kl_mean=float(kl.mean()),
            kl_median=float(np.median(kl)),
            kl_p99=float(np.percentile(kl, 99)),
            kl_max=float(kl.max()),
            top1_agreement=float(agree.mean()),
            nll_delta=delta,
            nll_delta_se=delta_se,
        )
    return QualityReport(**report)


@contextmanager
def _saving(folder: str | Path | None, shape: tuple[int, int], meta: dict) -> Iterator[np.ndarray | None]:
    """A memory-mapped float32 array of `shape` to fill (None without a folder); the folder appears only when
    the run completes."""
    if folder is None:
        yield None
        return
    with staging_folder(folder, hint="choose another folder or delete it") as tmp:
        array = np.lib.format.open_memmap(tmp / SAVED_ARRAY, "w+", np.float32, shape)
        yield array
        array.flush()
        del array
        (tmp / SAVED_META).write_text(json.dumps(meta) + "\n")
