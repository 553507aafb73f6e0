"""codegen-generate: generate code from a prompt on an export folder or a checkpoint, streamed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time

from ..config import LIMITS
from ..dtypes import DTYPES, torch_dtype
from ..errors import InputError
from ..runtime.backends import BACKENDS, GRAPHS
from ..runtime.speculate import SPECULATE_MODES
from .common import (
    VERIFY_CHOICES,
    VERIFY_HELP,
    ArgumentParser,
    add_device_options,
    check_paths,
    int_at_least,
    run,
    session_options,
    threads_type,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="codegen-generate",
        description="Generate a completion of a prompt with an export folder (ONNX Runtime), a TensorRT "
        "engine or a checkpoint (PyTorch), streamed to the terminal.",
    )
    p.add_argument("path", help="export folder, engine folder, checkpoint folder or hub id")
    p.add_argument("prompt", nargs="?", help="the prompt (default: --file, else standard input)")
    p.add_argument("--file", help="read the prompt from this file")
    p.add_argument(
        "--suffix",
        help="the code after the gap: fill in the middle between the prompt and it (a model with CodeGen2's "
        "fill-in-the-middle tokens); the middle ends at <eom>",
    )
    p.add_argument("--suffix-file", metavar="FILE", help="read the suffix from this file")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="default: onnxruntime for an export folder, tensorrt for an engine, torch for a checkpoint",
    )
    p.add_argument(
        "--reference",
        help="checkpoint for --backend torch when PATH is an export folder "
        "(default: the checkpoint its manifest records)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: PATH)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128, help="default: 128")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int_at_least(0), help="random seed: the same seed gives the same tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's: -2..2, > 0 discourages repeats")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's: -2..2, by how often a token came")
    p.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit before sampling (repeatable)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        type=unescape,
        help=r"stop at this string (repeatable), cut from the text; \n, \t and \\ in it are a newline, a tab and a "
        r'backslash, so --stop "\ndef " stops at the next top-level def',
    )
    p.add_argument(
        "--speculate",
        choices=SPECULATE_MODES,
        default="auto",
        help="speculative decoding, exact for greedy decoding: lookup (drafts from n-grams of the prompt and "
        "output), draft (a draft model, --draft), off; auto (default): draft with --draft, else lookup, where "
        "it runs exactly (greedy, the fused graph on the CPU or torch), else off. It drafts only as much as its "
        "measured costs and acceptance say pays",
    )
    p.add_argument("--draft", metavar="EXPORT", help="a smaller export with the same tokenizer to draft tokens")
    p.add_argument(
        "--threads", type=threads_type, help="intra-op threads (torch, onnxruntime; at most the cores this machine has)"
    )
    p.add_argument("--providers", help="onnxruntime execution providers, e.g. cuda,cpu (default: what is installed)")
    p.add_argument("--graph", choices=GRAPHS, help="onnxruntime graph (default: auto)")
    add_device_options(p)
    p.add_argument("--dtype", choices=DTYPES, help="torch weight dtype (default: float32)")
    p.add_argument("--verify", choices=VERIFY_CHOICES, default="sha256", help=VERIFY_HELP)
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("--json", action="store_true", help="print ids, text and timings as JSON instead of streaming")
    return p.parse_args(argv)


# Bytes of text one token stands for at most: CodeGen's longest token is 128 bytes of UTF-8 ("ÃÂ" x 32), the next
# are runs of 64 "=" or "-". A prompt longer than its context times this cannot fit, so no more than that is read
# (a prompt file of /dev/zero is refused at once, not read until memory runs out).
PROMPT_BYTES_PER_TOKEN = 128


def read_prompt(args: argparse.Namespace, context: int | None = None) -> str:
    """The prompt: the argument, --file, or standard input, at most `context` tokens' worth of bytes read
    (default: the largest context a config may give)."""
    if args.prompt is not None and args.file is not None:
        raise InputError("give the prompt as an argument or with --file, not both")
    if args.prompt is not None:
        return _argument_text(args.prompt)
    limit = (context or LIMITS["n_positions"]) * PROMPT_BYTES_PER_TOKEN
    if args.file is not None:
        return _read_text_file(args.file, limit, "prompt")
    if sys.stdin.isatty():
        raise InputError("no prompt: give it as an argument, with --file, or on standard input")
    stdin = getattr(sys.stdin, "buffer", sys.stdin)  # bytes, so a bad byte is an error of ours, not a traceback
    return _decode(stdin.read(limit + 1), limit, "standard input")


def read_suffix(args: argparse.Namespace, context: int | None = None) -> str | None:
    """The suffix: --suffix or --suffix-file (read bounded as the prompt is), or None."""
    if args.suffix is not None and args.suffix_file is not None:
        raise InputError("give the suffix with --suffix or --suffix-file, not both")
    if args.suffix is not None:
        return _argument_text(args.suffix, "the suffix argument", "--suffix-file")
    if args.suffix_file is None:
        return None
    return _read_text_file(args.suffix_file, (context or LIMITS["n_positions"]) * PROMPT_BYTES_PER_TOKEN, "suffix")


def _read_text_file(path: str, limit: int, what: str) -> str:
    """The text of the `what` file at `path`, at most `limit` bytes read; one line when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return _decode(f.read(limit + 1), limit, f"the {what} file {path}")
    except OSError as e:
        raise InputError(f"cannot read the {what} file {path} ({e.strerror}): check the path") from e


def _decode(data: bytes | str, limit: int, source: str) -> str:
    """`data` read from `source` as text; one line when it is longer than `limit` bytes or not UTF-8."""
    if len(data) > limit:
        tokens = limit // PROMPT_BYTES_PER_TOKEN
        raise InputError(f"{source} has more than {limit} bytes, more than a {tokens}-token context holds: shorten it")
    try:
        return data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise InputError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _argument_text(text: str, what: str = "the prompt argument", instead: str = "--file") -> str:
    """A text argument (the prompt's, by default), refused in one line when it is not UTF-8 (bytes the shell
    passed that are not, or a lone surrogate: the tokenizer takes neither)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        detail = f"a lone surrogate at character {e.start}"
        try:
            os.fsencode(text).decode("utf-8")  # the bytes of the command line, as the shell passed them
        except UnicodeEncodeError:
            pass
        except UnicodeDecodeError as d:
            detail = f"{d.reason} at byte {d.start}"
        raise InputError(f"{what} is not UTF-8 text ({detail}): pass UTF-8, or use {instead}") from None


def unescape(text: str) -> str:
    """--stop's text with \\n, \\t and \\\\ turned into a newline, a tab and a backslash (a shell passes "\\n"
    as a backslash and an n); any other backslash stays as it is."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def parse_logit_bias(items: list[str]) -> tuple[tuple[int, float], ...]:
    """--logit-bias ID=BIAS values as (token id, bias) pairs; one line for a malformed one."""
    pairs = []
    for item in items:
        token, _, bias = item.partition("=")
        try:
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise InputError(f"--logit-bias {item!r} is not ID=BIAS (e.g. 50256=-100)") from None
    return tuple(pairs)


def command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    # Every argument is checked before a model is loaded or torch imported (these imports are light): a mistake
    # is one line at once.
    from ..model.tokenizer import load_tokenizer
    from ..runtime.backends import context_of, default_backend, open_session
    from ..runtime.generate import GenerationConfig, Timings, check_prompt_fits, generate, stream
    from ..runtime.sampling import SamplingConfig
    from ..runtime.speculate import (
        SpeculationStats,
        check_draft,
        check_draft_tokenizer,
        check_speculation,
        make_drafter,
        speculation_note,
    )

    check_paths(args)
    check_draft(args.speculate, args.draft)  # unused or missing
    context = context_of(args.path)
    prompt, suffix = read_prompt(args, context), read_suffix(args, context)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            logit_bias=parse_logit_bias(args.logit_bias),
            seed=args.seed,
        ),
        stop=tuple(args.stop),
    )
    if args.speculate in ("lookup", "draft") or args.draft is not None:
        check_speculation(None, config.sampling)  # before the model is loaded
    tokenizer = load_tokenizer(args.tokenizer or args.path)
    if args.draft is not None:
        check_draft_tokenizer(args.draft, tokenizer)
    backend = args.backend or default_backend(args.path)
    target = args.reference if backend == "torch" and args.reference else args.path
    options = session_options(args, backend, dtype=torch_dtype(args.dtype) if args.dtype else None)
    start = time.perf_counter()
    ids = tokenizer.encode(prompt) if suffix is None else tokenizer.infill(prompt, suffix)  # refused on CodeGen1
    check_prompt_fits(ids, config.max_new_tokens, context if target == args.path else context_of(target))
    session = open_session(backend, target, **options)
    print(f"[{session.name}] opened {target} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if tokenizer.vocab_size < session.config.vocab_size // 2:  # CodeGen's own: 50295 of 51200
        print(
            f"warning: the model has {session.config.vocab_size} token ids, the tokenizer {tokenizer.vocab_size}: "
            "ids past the tokenizer's print nothing (is the tokenizer made for this model?)",
            file=sys.stderr,
        )
    draft_options = {"threads": args.threads, "verify": args.verify}
    drafter = make_drafter(args.speculate, session, config.sampling, args.draft, **draft_options)
    if drafter is not None and speculation_note(session) is not None:
        print(speculation_note(session), file=sys.stderr)
    stats = SpeculationStats() if drafter is not None else None
    # The prompt goes in as `ids`, tokenized once above (with a suffix: the fill-in-the-middle layout).
    with session, contextlib.closing(drafter) if drafter is not None else contextlib.nullcontext():
        if args.json:
            result = generate(session, tokenizer, ids, config, drafter=drafter)
            c = result.completions[0]
            body = {
                "backend": session.name,
                "path": str(target),
                "prompt": prompt,
                **({"suffix": suffix} if suffix is not None else {}),
                **c.to_dict(),
                "sampling": config.sampling.to_dict(),
                "timings": result.timings.to_dict(),
                "speculation": result.speculation.to_dict() if result.speculation else None,
            }
            print(json.dumps(body, indent=2))
            return 0
        timings = Timings()
        wrote = False
        try:
            if args.echo:
                sys.stdout.write(prompt)
                wrote = bool(prompt)
            pieces = stream(session, tokenizer, ids, config, timings, drafter, stats)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
                wrote = wrote or bool(piece)
            if args.echo and suffix:  # the whole file: before the gap, the middle, after it
                sys.stdout.write(suffix)
        except BaseException:
            if wrote:  # interrupted mid-line: end it, so the error line and the shell's prompt start their own
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
        sys.stdout.write("\n")
    print(
        f"[{session.name}] {timings.decode_steps + 1} tokens; first token {timings.time_to_first_token_s:.3f} s; "
        f"decode {timings.decode_tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    if stats is not None:
        print(f"[{session.name}] speculation ({drafter.name}): {stats.describe()}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
