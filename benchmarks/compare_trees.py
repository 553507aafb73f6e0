"""Export and decode speed of this tree against another checkout of the project (e.g. the commit before a
restructure), in one run, round-robin, so both see the same machine load.

Each round runs, for each tree in turn: benchmarks/export_memory.py (a 350M-shape fp32 export, validated,
with its fused graph) and codegen-bench on one shared export's fused graph (greedy decode, batch 1, 2
threads) at each prompt length. The other tree's code is imported in place of this venv's editable install
(a sitecustomize drops the editable finder for those children). Prints a table and one JSON line.

    git worktree add /tmp/before HEAD~5
    python benchmarks/compare_trees.py /tmp/before --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
"""


def environment(tree: Path, site: Path) -> dict:
    """The environment of a child that imports codegen_deploy from `tree`."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if tree != REPO:
        env["PYTHONPATH"] = f"{site}:{tree}"
    return env


def last_json(text: str) -> dict:
    return json.loads(next(line for line in reversed(text.splitlines()) if line.startswith("{")))


def export_seconds(tree: Path, env: dict, work: Path) -> float:
    """Wall time of one 350M fp32 export by `tree`'s code (its own export_memory.py)."""
    script = tree / "benchmarks" / "export_memory.py"
    cmd = [sys.executable, str(script), "--shape", "350M", "--dtype", "float32", "--work", str(work)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return last_json(out)["runs"][0]["wall_s"]


def decode(tree: Path, env: dict, export: Path, prompt: int, new_tokens: int) -> dict:
    """codegen-bench of `tree`'s code on the export's fused graph: decode tokens/s and time to first token."""
    cmd = [sys.executable, "-m", "codegen_deploy.cli.bench", str(export), "--backends", "onnxruntime-fused"]
    cmd += ["--prompt-tokens", str(prompt), "--new-tokens", str(new_tokens), "--repeats", "2", "--threads", "2"]
    out = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, check=True).stdout
    row = json.loads(out)
    row = row[0] if isinstance(row, list) else row.get("results", [row])[0]
    return {"decode_tok_s": row["decode_tok_s"], "ttft_s": row["ttft_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", type=Path, help="the other checkout (a git worktree)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", default="128,1024", help="prompt lengths for the decode benchmark")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-compare-trees"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="site-", dir=args.work))
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    trees = {"other": args.other.resolve(), "this": REPO}
    envs = {name: environment(tree, site) for name, tree in trees.items()}
    # One export (this tree's) for the decode runs: both trees read the same manifest format.
    export = args.work / "export-350M-fp32"
    if not (export / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "export_memory.py"),
                "--shape",
                "350M",
                "--keep",
                "--work",
                str(args.work),
            ],
            env=envs["this"],
            check=True,
            capture_output=True,
        )
        (args.work / "export-350M-float32").rename(export)
    prompts = [int(x) for x in args.prompts.split(",")]
    results = {name: {"export_s": [], **{f"decode@{n}": [] for n in prompts}} for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            results[name]["export_s"].append(export_seconds(tree, envs[name], args.work))
            for n in prompts:
                results[name][f"decode@{n}"].append(decode(tree, envs[name], export, n, args.new_tokens))
            print(f"round {r + 1} {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print("| tree | export 350M fp32 (s) | " + " | ".join(f"decode tok/s @{n} | TTFT s @{n}" for n in prompts) + " |")
    for name in trees:
        cells = [name, f"{statistics.median(results[name]['export_s']):.1f}"]
        for n in prompts:
            runs = results[name][f"decode@{n}"]
            cells += [f"{statistics.median(x['decode_tok_s'] for x in runs):.1f}"]
            cells += [f"{statistics.median(x['ttft_s'] for x in runs):.3f}"]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "results": results}))


if __name__ == "__main__":
    main()
