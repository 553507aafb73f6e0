"""Speculative decoding on this CPU: what a run with k new tokens costs, the ceiling a perfect drafter reaches,
and what prompt lookup and a draft model do on code, against plain greedy decoding in the same run.

  cost model   one run with k = 1, 2, 4, 8 new tokens per row after 128 and 1,024 tokens of context, batch 1
               and 4 (Session.extend_slots): the most a perfect draft can gain is k x t(1) / t(k).
  oracle       drafts = the tokens a previous greedy run of the same prompt produced (an upper bound, never a
               default), with at most K = 4 and 8 drafted tokens per run.
  lookup       prompt lookup (n-grams 3..1) on HumanEval prompts and on a file re-sent after a small edit.
  draft        a draft model: --draft EXPORT (a smaller model on the same tokenizer, e.g. the trained draft of
               benchmarks/quality.py), else the target's first --draft-layers blocks with its embedding and head.

Every speculative run's tokens are checked equal to plain greedy decoding. Speedups are decode tokens/s over
plain decoding's, round-robin per prompt (the machine drifts); acceptance = accepted / drafted tokens. With
random weights the acceptance a workload has is unlike a trained model's, so the table also gives the speedup
the cost model predicts at the published code-editing acceptance (0.7).

    python benchmarks/speculate.py EXPORT [EXPORT_INT8] [--draft DRAFT_EXPORT] [--prompts 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from codegen_deploy.runtime import generate, open_session
from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession
from codegen_deploy.runtime.generate import GenerationConfig
from codegen_deploy.runtime.speculate import Drafter, DraftModel, PromptLookup

REPO = Path(__file__).resolve().parents[1]


class Oracle(Drafter):
    """Drafts the tokens a previous greedy run produced after the same context (an upper bound)."""

    name = "oracle"

    def __init__(self, tokens: list[int], prompt_length: int, max_draft: int):
        super().__init__()
        self.tokens, self.offset, self.max_draft = tokens, prompt_length, max_draft

    def propose(self, ids, k, row=0):
        at = len(ids) - self.offset
        return list(self.tokens[at : at + min(k, self.max_draft)])


def cost_model(session, contexts=(128, 1024), ks=(1, 2, 4, 8), batches=(1, 4), repeats=5) -> list[dict]:
    """Median seconds of one extend_slots run with k new tokens per row, after `context` tokens, `batch` rows."""
    rng = np.random.default_rng(0)
    if session.slot_count == 0:
        session.open_slots(max(batches))
    rows = []
    # A context that leaves no room for k new tokens is measured as long as it can be (the small models' 1,024).
    for context in sorted({min(c, session.max_context - max(ks)) for c in contexts}):
        for slot in range(max(batches)):
            session.prefill_slot(slot, rng.integers(0, session.config.vocab_size, context))
        for batch in batches:
            for k in ks:
                times = []
                for r in range(repeats + 1):  # the first run warms up this shape's buffers and bindings
                    ids = rng.integers(0, session.config.vocab_size, (batch, k))
                    t = time.perf_counter()
                    session.extend_slots(list(range(batch)), ids)
                    if r:
                        times.append(time.perf_counter() - t)
                    for slot in range(batch):
                        session.truncate_slot(slot, context)
                rows.append({"context": context, "batch": batch, "k": k, "seconds": statistics.median(times)})
    for r in rows:
        one = next(
            x["seconds"] for x in rows if x["context"] == r["context"] and x["batch"] == r["batch"] and x["k"] == 1
        )
        r["vs_k1"] = r["seconds"] / one
        r["perfect_draft_gain"] = r["k"] / r["vs_k1"]
    return rows


def predicted_speedup(costs: list[dict], acceptance: float, context: int = 128, batch: int = 1) -> tuple[int, float]:
    """The best k and its speedup under the geometric model at `acceptance` (drafting free, as prompt lookup)."""
    best = (0, 1.0)
    for r in costs:
        if r["context"] == context and r["batch"] == batch and r["k"] > 1:
            drafted = r["k"] - 1
            tokens = (1 - acceptance ** (drafted + 1)) / (1 - acceptance)
            best = max(best, (drafted, tokens / r["vs_k1"]), key=lambda b: b[1])
    return best


def humaneval(count: int) -> list[str]:
    from codegen_deploy.verify.execution import load_problems

    return [p["prompt"] for p in load_problems().values()][:count]


def edited_file(tokenizer, tokens: int = 700) -> list[str]:
    """A real file (this repository's batcher) and the same file after a small edit, re-sent."""
    text = (REPO / "codegen_deploy" / "serve" / "batcher.py").read_text()
    ids = tokenizer.encode(text)[:tokens]
    file = tokenizer.decode(ids)
    edited = file.replace("rows", "lines", 3)
    return [file, edited]


def decode(session, tokenizer, prompt: str, new_tokens: int, drafter=None):
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=(-1,))  # every run the same length
    return generate(session, tokenizer, prompt, config, drafter=drafter)


def workload(session, tokenizer, prompts: list[str], new_tokens: int, drafters: dict) -> dict:
    """Plain and each drafter on every prompt, round-robin per prompt; tokens/s medians, acceptance, identity."""
    out = {name: {"tok_s": [], "drafted": 0, "accepted": 0, "runs": 0, "tokens": 0} for name in ["plain", *drafters]}
    identical = True
    for prompt in prompts:
        plain = decode(session, tokenizer, prompt, new_tokens)
        out["plain"]["tok_s"].append(plain.timings.decode_tokens_per_s)
        for name, make in drafters.items():
            result = decode(session, tokenizer, prompt, new_tokens, make(plain, prompt))
            identical &= result.ids == plain.ids
            stats = result.speculation
            entry = out[name]
            entry["tok_s"].append(result.timings.decode_tokens_per_s)
            for key in ("drafted", "accepted", "runs", "tokens"):
                entry[key] += getattr(stats, key)
    base = statistics.median(out["plain"]["tok_s"])
    summary = {"identical": identical, "plain_tok_s": base}
    for name in drafters:
        e = out[name]
        summary[name] = {
            "tok_s": statistics.median(e["tok_s"]),
            "speedup": statistics.median(e["tok_s"]) / base,
            "acceptance": e["accepted"] / e["drafted"] if e["drafted"] else 0.0,
            "drafted": e["drafted"],
            "tokens_per_run": e["tokens"] / e["runs"] if e["runs"] else 0.0,
        }
    return summary


def served(session, tokenizer, prompts: list[str], new_tokens: int, concurrency: int, drafter, alone: bool) -> dict:
    """The prompts through the server's scheduler, `concurrency` rows at once (greedy, every row new_tokens
    long), drafting with `drafter` (None: none); alone: each row decides as if it generated alone (it
    ignores that a plain step serves the other rows too). Returns generated tokens/s and the ids."""
    import threading

    from codegen_deploy.serve.batcher import Batcher, RowSpec
    from codegen_deploy.serve.metrics import Metrics

    metrics = Metrics()
    batcher = Batcher(
        session,
        tokenizer,
        max_batch=concurrency,
        max_queue=len(prompts),
        metrics=metrics,
        drafter=drafter,
        cache_memory=0,
    )
    if alone:
        batcher.engine.costs.share = lambda rows: 1.0  # a row decides as if it stepped alone
    tokenizer_eos = tokenizer.eos_token_id
    done = [threading.Event() for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]

    def sink(i):
        def take(update):
            ids[i].extend(update.tokens)
            if update.finish_reason or update.error:
                done[i].set()

        return take

    specs = [RowSpec(tuple(tokenizer.encode(p)), new_tokens, logit_bias_free(tokenizer_eos)) for p in prompts]
    start = time.perf_counter()
    batcher.start()
    batcher.submit(specs, [sink(i) for i in range(len(prompts))])
    for event in done:
        event.wait()
    seconds = time.perf_counter() - start
    batcher.stop()
    drafted = metrics.speculative_tokens.labels(kind="drafted")._value.get()
    accepted = metrics.speculative_tokens.labels(kind="accepted")._value.get()
    return {"tok_s": sum(map(len, ids)) / seconds, "ids": ids, "drafted": drafted, "accepted": accepted}


def logit_bias_free(eos: int):
    """Greedy sampling that never ends early: eos pushed out of reach, so every row runs its full length."""
    from codegen_deploy.runtime.sampling import SamplingConfig

    return SamplingConfig(logit_bias=((eos, -100.0),))


def crossover(
    session,
    tokenizer,
    prompts: list[str],
    new_tokens: int,
    draft_session,
    ratio: float,
    levels=(1, 2, 4, 8),
    rounds: int = 2,
) -> list[dict]:
    """Tokens/s through the scheduler at each concurrency: no drafting, prompt lookup with each row drafting as
    if alone (blind to the load), prompt lookup by the default rule (a row drafts only when it beats its share
    of a plain step over every row), and the draft model by the default rule (a server of its own: a new
    DraftModel); `rounds` rounds of the four in turn, medians of the speedups; outputs checked equal."""
    rows = []
    for c in levels:
        work = (prompts * c)[: max(c, len(prompts))]
        runs: dict[str, list[dict]] = {"plain": [], "forced": [], "default": [], "draft": []}
        for _ in range(rounds):
            runs["plain"].append(served(session, tokenizer, work, new_tokens, c, None, False))
            runs["forced"].append(served(session, tokenizer, work, new_tokens, c, PromptLookup(), True))
            runs["default"].append(served(session, tokenizer, work, new_tokens, c, PromptLookup(), False))
            draft = DraftModel(draft_session, c, ratio)
            runs["draft"].append(served(session, tokenizer, work, new_tokens, c, draft, False))

        ids = [r["ids"] for name in runs for r in runs[name]]
        rows.append(
            {
                "concurrency": c,
                "rounds": rounds,
                "plain_tok_s": statistics.median(r["tok_s"] for r in runs["plain"]),
                "always_x": _speedup(runs, "forced"),
                "default_x": _speedup(runs, "default"),
                "draft_x": _speedup(runs, "draft"),
                "acceptance": _acceptance(runs["forced"]),
                "draft_drafted": sum(r["drafted"] for r in runs["draft"]) / rounds,
                "draft_acceptance": _acceptance(runs["draft"]),
                "identical": all(i == ids[0] for i in ids),
            }
        )
        print(f"[crossover] concurrency {c} done", file=sys.stderr, flush=True)
    return rows


def _speedup(runs: dict[str, list[dict]], name: str) -> float:
    """The median over rounds of a drafter's tokens/s against plain decoding's in the same round."""
    return statistics.median(r["tok_s"] / p["tok_s"] for r, p in zip(runs[name], runs["plain"], strict=True))


def _acceptance(runs: list[dict]) -> float:
    drafted = sum(r["drafted"] for r in runs)
    return sum(r["accepted"] for r in runs) / drafted if drafted else 0.0


def truncated_draft(export: Path, layers: int, folder: Path) -> Path:
    """The target's first `layers` blocks, its embedding, final norm and head as a fused export (draft model)."""
    from codegen_deploy.artifacts.manifest import read_manifest
    from codegen_deploy.export.fused import write_fused_graph
    from codegen_deploy.model.weights import load_checkpoint

    source = read_manifest(export, verify="none")["source"]
    model = load_checkpoint(source)
    del model.blocks[layers:]
    model.config = dataclasses.replace(model.config, n_layer=layers)
    write_fused_graph(model, folder)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_config()))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="+", type=Path, help="fused exports (fp32 first; an int8 one for its cost model)")
    p.add_argument("--prompts", type=int, default=8, help="HumanEval prompts (default 8)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--draft", type=Path, help="a draft model's fused export (default: the target's first layers)")
    p.add_argument("--draft-layers", type=int, default=4, help="blocks of the target kept in the draft model")
    p.add_argument(
        "--parts",
        default="costs,workloads,crossover",
        help="what to run (default: all); the others keep their results from the last run in --json",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds of the scheduler runs at each concurrency")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "speculate.json")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the first export's)")
    args = p.parse_args()
    from codegen_deploy.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.exports[0])
    # A run of some parts keeps the other parts' results from the last run.
    results: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.setdefault("costs", {})
    results.setdefault("workloads", {})
    for export in args.exports if "costs" in args.parts else []:
        with open_session("onnxruntime", export, threads=args.threads) as session:
            results["costs"][export.name] = cost_model(session)
        print(f"[cost model] {export.name} done", file=sys.stderr, flush=True)
    target = args.exports[0]
    with tempfile.TemporaryDirectory() as tmp, open_session("onnxruntime", target, threads=args.threads) as session:
        draft_folder = args.draft or truncated_draft(target, args.draft_layers, Path(tmp))
        draft_session = FusedOrtSession(draft_folder, threads=args.threads)  # a bare graph and config.json
        ratio = draft_session.config.num_parameters() / session.config.num_parameters()
        draft = DraftModel(draft_session, relative_cost=ratio)
        drafters = {
            "oracle K=4": lambda plain, prompt: _oracle(plain, 4),
            "oracle K=8": lambda plain, prompt: _oracle(plain, 8),
            "lookup": lambda plain, prompt: PromptLookup(),
            "draft": lambda plain, prompt: draft,
        }
        for name, prompts in (("HumanEval", humaneval(args.prompts)), ("edited file", edited_file(tokenizer))):
            if "workloads" in args.parts:
                results["workloads"][name] = workload(session, tokenizer, prompts, args.new_tokens, drafters)
                print(f"[workload] {name} done", file=sys.stderr, flush=True)
        if "crossover" in args.parts:
            results["crossover"] = crossover(
                session,
                tokenizer,
                edited_file(tokenizer) * 4,
                args.new_tokens // 2,
                draft_session,
                ratio,
                rounds=args.rounds,
            )
        draft.close()
    costs = results["costs"][target.name]
    results["predicted_at_0.7"] = dict(zip(("k", "speedup"), predicted_speedup(costs, 0.7), strict=True))
    results["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print_tables(results)


def _oracle(plain, k: int) -> Oracle:
    return Oracle(plain.ids, len(plain.completions[0].prompt_ids), k)


def print_tables(results: dict) -> None:
    print("| export | context | batch | k=1 ms | k=2 | k=4 | k=8 | perfect-draft gain at k=8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for export, rows in results["costs"].items():
        for context in sorted({r["context"] for r in rows}):
            for batch in sorted({r["batch"] for r in rows}):
                sel = {r["k"]: r for r in rows if r["context"] == context and r["batch"] == batch}
                print(
                    f"| {export} | {context} | {batch} | {sel[1]['seconds'] * 1e3:.1f} | "
                    + " | ".join(f"{sel[k]['vs_k1']:.2f}x" for k in (2, 4, 8))
                    + f" | {sel[8]['perfect_draft_gain']:.2f}x |"
                )
    print("\n| workload | drafter | acceptance | tokens per run | decode tok/s | speedup | identical |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, w in results["workloads"].items():
        print(f"| {name} | plain | | 1.00 | {w['plain_tok_s']:.1f} | 1.00x | |")
        for drafter, s in w.items():
            if isinstance(s, dict):
                print(
                    f"| {name} | {drafter} | {s['acceptance']:.2f} | {s['tokens_per_run']:.2f} | {s['tok_s']:.1f} | "
                    f"{s['speedup']:.2f}x | {w['identical']} |"
                )
    print(
        "\n| concurrency | plain tok/s | lookup, each row as if alone | lookup, default (load-aware) | acceptance "
        "| draft model, default | its drafted tokens per run | its acceptance | identical |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["crossover"]:
        print(
            f"| {r['concurrency']} | {r['plain_tok_s']:.1f} | {r['always_x']:.2f}x | {r['default_x']:.2f}x | "
            f"{r['acceptance']:.2f} | {r['draft_x']:.2f}x | {r.get('draft_drafted', 0):.0f} | "
            f"{r['draft_acceptance']:.2f} | {r['identical']} |"
        )
    pred = results["predicted_at_0.7"]
    print(f"\ncost model at acceptance 0.7 (batch 1, 128 context): draft {pred['k']}, {pred['speedup']:.2f}x")
    print(f"uptime: {results['uptime']}")


if __name__ == "__main__":
    main()
