"""What quantizing costs, on small CodeGen models trained here (codegen-make-checkpoint --train): perplexity and
KL divergence of fp16, int8 and int4 exports against the float32 checkpoint over the held-out standard library,
what a float16 or int8 KV cache changes against a float32 one on the same weights, HumanEval pass@1 of the
float32 and int4 exports (greedy, every problem, executed), and fill-in-the-middle exact match of a
CodeGen2-layout model's exports on held-out gaps, beside an untrained model of the same shape.

    python benchmarks/quality.py [--minutes 5] [--work /tmp/codegen-quality]

The trained checkpoints come from the cache (model/train.py: trained_checkpoint), so a second run trains nothing;
exports are made once into --work, with a draft model (the `tiny` shape on the main model's tokenizer) for
benchmarks/speculate.py. Results: benchmarks/results/quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# kind: (weights' dtype, weights, KV cache), each cache named (codegen-export's default under --quantize is the
# float16 cache: int8-kv16, int4-kv16).
KINDS = {
    "fp32": ("float32", "float", "float32"),
    "fp16": ("float16", "float", "float16"),
    "int8": ("float32", "int8", "float32"),
    "int4": ("float32", "int4", "float32"),
    "fp32-kv16": ("float32", "float", "float16"),
    "int8-kv16": ("float32", "int8", "float16"),
    "int4-kv16": ("float32", "int4", "float16"),
    "fp32-kv8": ("float32", "float", "int8"),
    "int4-kv8": ("float32", "int4", "int8"),
}
# What a narrower cache changes: each export against the same weights over a float32 cache.
CACHE_PAIRS = {
    "fp32, float16 cache": ("fp32-kv16", "fp32"),
    "int8, float16 cache": ("int8-kv16", "int8"),
    "int4, float16 cache": ("int4-kv16", "int4"),
    "fp32, int8 cache": ("fp32-kv8", "fp32"),
    "int4, int8 cache": ("int4-kv8", "int4"),
}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def exports_of(checkpoint: Path, work: Path, kinds) -> dict[str, Path]:
    """The checkpoint exported as each kind (made once into `work`)."""
    from codegen_deploy.pipeline import export_model

    out = {}
    for kind in kinds:
        dtype, weights, cache = KINDS[kind]
        folder = work / f"{checkpoint.name}-{kind}"
        if not (folder / "manifest.json").is_file():
            export_model(
                checkpoint, folder, dtype=dtype, fused_weights=weights, fused_cache=cache, progress=lambda line: None
            )
            log(f"exported {folder.name}")
        out[kind] = folder
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="training time of the main models (default 5)")
    p.add_argument("--shape", default="demo", help="the CodeGen1-layout model's shape (default demo)")
    p.add_argument("--fim-shape", default="codegen2-tiny", help="the CodeGen2-layout model's shape")
    p.add_argument("--draft-minutes", type=float, default=2.0, help="training time of the draft model (default 2)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens scored for perplexity (default 16384)")
    p.add_argument("--gaps", type=int, default=200, help="fill-in-the-middle gaps (default 200)")
    p.add_argument("--problems", type=int, default=164, help="HumanEval problems (default: all 164)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--parts",
        default="perplexity,cache,humaneval,infill",
        help="what to run (default: all); the others keep their results from the last run in --json",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-quality"))
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "quality.json")
    args = p.parse_args()

    from codegen_deploy.model.make_checkpoint import make_checkpoint
    from codegen_deploy.model.tokenizer import load_tokenizer
    from codegen_deploy.model.train import trained_checkpoint
    from codegen_deploy.runtime import open_session
    from codegen_deploy.runtime.sampling import SamplingConfig
    from codegen_deploy.verify.execution import load_problems
    from codegen_deploy.verify.humaneval import run_humaneval
    from codegen_deploy.verify.infilling import plan_gaps, run_infill
    from codegen_deploy.verify.quality import measure, read_texts, tokenize_texts

    args.work.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    main_ckpt = trained_checkpoint(args.shape, seconds, progress=log)
    fim_ckpt = trained_checkpoint(args.fim_shape, seconds, progress=log)
    results: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results["machine"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    draft_ckpt = trained_checkpoint("tiny", args.draft_minutes * 60, tokenizer=main_ckpt, progress=log)
    draft = exports_of(draft_ckpt, args.work, ("fp32",))["fp32"]
    log(f"the draft model's export (benchmarks/speculate.py --draft): {draft}")
    for name, ckpt in (("main", main_ckpt), ("fim", fim_ckpt), ("draft", draft_ckpt)):
        results[f"{name}_training"] = json.loads((ckpt / "training.json").read_text())
        results[f"{name}_checkpoint"] = ckpt.name

    # Perplexity and KL of each export against the float32 checkpoint.
    tokenizer = load_tokenizer(main_ckpt)
    documents = tokenize_texts(tokenizer, read_texts(None), args.max_tokens)
    exports = exports_of(main_ckpt, args.work, KINDS)
    if "perplexity" in args.parts:
        results["perplexity"] = {}
    with open_session("torch", main_ckpt, threads=args.threads) as reference:
        for kind, folder in exports.items() if "perplexity" in args.parts else ():
            with open_session("onnxruntime", folder, threads=args.threads) as session:
                report = measure(session, documents, 1024, 512, reference, names=(kind, "checkpoint"), progress=log)
            results["perplexity"][kind] = report.to_dict()
            log(report.table())

    # The float16 cache against the float32 cache, on the same weights.
    if "cache" in args.parts:
        results["cache"] = {}
    for kind, (narrow, wide) in CACHE_PAIRS.items() if "cache" in args.parts else ():
        with (
            open_session("onnxruntime", exports[narrow], threads=args.threads) as session,
            open_session("onnxruntime", exports[wide], threads=args.threads) as reference,
        ):
            report = measure(session, documents, 1024, 512, reference, names=(narrow, wide), progress=log)
        results["cache"][kind] = report.to_dict()
        log(report.table())

    # HumanEval pass@1, greedy, executed: float32 and int4, paired on the same problems.
    problems = dict(list(load_problems().items())[: args.problems])
    if "humaneval" in args.parts:
        results["humaneval"] = {}
    for kind in ("fp32", "int4") if "humaneval" in args.parts else ():
        with open_session("onnxruntime", exports[kind], threads=args.threads) as session:
            report, _ = run_humaneval(
                session, tokenizer, problems, 1, SamplingConfig(), kind, max_new_tokens=128, progress=log
            )
        results["humaneval"][kind] = report.to_dict()
        log(report.table())

    # Fill-in-the-middle exact match: the CodeGen2-layout model's exports, and an untrained model as the control.
    fim_tokenizer = load_tokenizer(fim_ckpt)
    gaps = plan_gaps(read_texts(None), args.gaps, seed=0)
    untrained = args.work / "untrained-fim"
    if not untrained.is_dir():
        make_checkpoint(untrained, shape=args.fim_shape, tokenizer=fim_ckpt, fim=True)
    models = {**exports_of(fim_ckpt, args.work, ("fp32", "int8", "int4")), "untrained": untrained}
    if "infill" in args.parts:
        results["infill"] = {}
    for kind, folder in models.items() if "infill" in args.parts else ():
        backend = "torch" if kind == "untrained" else "onnxruntime"
        with open_session(backend, folder, threads=args.threads) as session:
            report = run_infill(session, fim_tokenizer, gaps, kind, progress=log)
        results["infill"][kind] = report.to_dict()
        log(report.table())

    args.json.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.json.with_suffix(".png"))
    print_tables(results)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ppl = results["perplexity"]
    kinds = list(ppl)
    axes[0].bar(kinds, [ppl[k]["kl_mean"] for k in kinds], label="mean")
    axes[0].plot(kinds, [ppl[k]["kl_p99"] for k in kinds], "o", color="black", label="99th percentile")
    axes[0].set_yscale("log")
    axes[0].set_title("KL divergence from the float32 checkpoint (nats/token)")
    axes[0].legend()
    axes[1].bar(kinds, [ppl[k]["perplexity"] for k in kinds])
    axes[1].axhline(ppl["fp32"]["reference_perplexity"], color="black", linestyle="--", label="checkpoint")
    low = min(ppl[k]["perplexity"] for k in kinds)
    axes[1].set_ylim(low * 0.98, max(ppl[k]["perplexity"] for k in kinds) * 1.01)
    axes[1].set_title("perplexity, held-out standard library")
    axes[1].legend()
    fill = results["infill"]
    names = list(fill)
    width = 0.4
    for i, kind in enumerate(("single-line", "multi-line")):
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        axes[2].bar(xs, [fill[n]["similarity"].get(kind, 0) for n in names], width, label=kind)
    axes[2].set_xticks(range(len(names)), names)
    axes[2].set_title("fill-in-the-middle: edit similarity of the middle")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_tables(results: dict) -> None:
    print("| export | perplexity | mean NLL change vs checkpoint | KL mean | KL p99 | KL max | top-1 agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, r in results["perplexity"].items():
        print(
            f"| {kind} | {r['perplexity']:.4f} ± {r['perplexity_se']:.4f} | {r['nll_delta']:+.5f} ± "
            f"{r['nll_delta_se']:.5f} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['kl_max']:.2e} | "
            f"{100 * r['top1_agreement']:.2f} % |"
        )
    print("\n| weights, cache (vs a float32 cache) | KL mean | KL p99 | KL max | top-1 agreement | perplexity |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, r in results.get("cache", {}).items():
        print(
            f"| {kind} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['kl_max']:.2e} | "
            f"{100 * r['top1_agreement']:.2f} % | {r['perplexity']:.4f} vs {r['reference_perplexity']:.4f} |"
        )
    print("\n| export | HumanEval pass@1 (greedy) |")
    print("| --- | --- |")
    for kind, r in results["humaneval"].items():
        print(f"| {kind} | {r['pass_at_k']['pass@1']:.2f} % ({sum(v > 0 for v in r['passed'].values())} problems) |")
    print("\n| model | single-line: exact match, edit similarity | multi-line: exact match, edit similarity |")
    print("| --- | --- | --- |")
    for kind, r in results["infill"].items():
        e, sim = r["exact"], r["similarity"]
        print(
            f"| {kind} | {100 * e['single-line']:.1f} %, {sim['single-line']:.3f} | "
            f"{100 * e['multi-line']:.1f} %, {sim['multi-line']:.3f} |"
        )


if __name__ == "__main__":
    main()
