"""Decode speed of the C++ program (examples/cpp: codegen_generate) against the Python runtime on the same
fused graph: decode tokens/s and the per-step time spent outside ONNX Runtime (a step's wall time minus the
time inside its Run call), batch 1, greedy, the same random prompt ids for both.

Round-robin in one run: at each export and prompt length, every repeat runs C++ then Python, each in a process
of its own (loading is not timed). Prints a table and writes JSON (default benchmarks/results/cpp_decode_speed.json).

    bash scripts/build_cpp.sh
    python benchmarks/cpp_decode_speed.py                      # 350M fp32 and int8 exports of decode_speed.py
    python benchmarks/cpp_decode_speed.py --prompt-tokens 128 --new-tokens 16 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/codegen-decode-speed")  # where benchmarks/decode_speed.py makes its exports
DEFAULT_EXPORTS = [WORK / "codegen-350M-random-onnx", WORK / "codegen-350M-random-onnx-fused-int8"]


def python_worker(args: dict) -> dict:
    """The Python runtime's engine (runtime/engine.py, as generate() drives it) over FusedOrtSession, its ONNX
    Runtime Run calls timed by a wrapper around the session's InferenceSession."""
    sys.path.insert(0, str(REPO))
    from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession
    from codegen_deploy.runtime.engine import BatchEngine, Row, RowSpec
    from codegen_deploy.runtime.generate import Timings, drive
    from codegen_deploy.runtime.text import NoText

    class TimedRuns:
        """The InferenceSession, with the seconds spent in run_with_iobinding added up."""

        def __init__(self, inner):
            self._inner, self.seconds = inner, 0.0

        def run_with_iobinding(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return self._inner.run_with_iobinding(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        def __getattr__(self, name):
            return getattr(self._inner, name)

    session = FusedOrtSession(args["export"], threads=args["threads"], verify="size")
    timed = session._session = TimedRuns(session._session)
    # No eos: never stop early, as the C++ side's --ignore-eos.
    row = Row(RowSpec(tuple(args["prompt_ids"]), args["new_tokens"]), NoText(), set())
    timings = Timings()
    run_before = None
    for _ in drive(BatchEngine(session, 1, 0), [row], timings):
        if run_before is None:
            run_before = timed.seconds  # the prompt's run is not a decode step's
    return {
        "prefill_s": timings.prefill_s,
        "decode_s": timings.decode_s,
        "decode_steps": timings.decode_steps,
        "decode_run_s": timed.seconds - run_before,
    }


def cpp_run(cpp_bin: Path, args: dict) -> dict:
    argv = [
        str(cpp_bin / "codegen_generate"),
        args["export"],
        "--ids",
        ",".join(map(str, args["prompt_ids"])),
        "--graph",
        "fused",
        "--max-new-tokens",
        str(args["new_tokens"]),
        "--threads",
        str(args["threads"]),
        "--ignore-eos",
        "--json",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    t = json.loads(out)["timings"]
    return {k: t[k] for k in ("prefill_s", "decode_s", "decode_steps", "decode_run_s")}


def python_run(args: dict) -> dict:
    argv = [sys.executable, __file__, "--worker", json.dumps(args)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="*", type=Path, default=DEFAULT_EXPORTS, help="export folders with a fused graph")
    p.add_argument("--prompt-tokens", default="128,1024", help="prompt lengths (default 128,1024)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpp-bin", type=Path, default=REPO / "build" / "cpp" / "bin")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "cpp_decode_speed.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # a measuring child: one JSON line on stdout
        print(json.dumps(python_worker(json.loads(args.worker))))
        return 0
    if not (args.cpp_bin / "codegen_generate").is_file():
        p.error(f"no {args.cpp_bin / 'codegen_generate'}: build it with bash scripts/build_cpp.sh")

    import random

    rows, loads = [], [load_average()]
    for export in args.exports:
        manifest = json.loads((export / "manifest.json").read_text())
        vocab = min(manifest["model_config"]["vocab_size"], 50000)
        name = f"{export.name} ({manifest.get('fused_weights', 'float')})"
        for prompt_tokens in [int(x) for x in args.prompt_tokens.split(",")]:
            prompt_ids = [random.Random(prompt_tokens).randrange(vocab) for _ in range(prompt_tokens)]
            job = {"export": str(export), "prompt_ids": prompt_ids, "new_tokens": args.new_tokens}
            job["threads"] = args.threads
            runs: dict[str, list[dict]] = {"C++": [], "Python": []}
            for repeat in range(args.repeats):
                runs["C++"].append(cpp_run(args.cpp_bin, job))
                runs["Python"].append(python_run(job))
                print(f"[{name} prompt {prompt_tokens} repeat {repeat + 1}] done, load {load_average()}", flush=True)
            loads.append(load_average())
            for runner, results in runs.items():
                tok_s = [r["decode_steps"] / r["decode_s"] for r in results]
                overhead_ms = [1e3 * (r["decode_s"] - r["decode_run_s"]) / r["decode_steps"] for r in results]
                step_ms = [1e3 * r["decode_s"] / r["decode_steps"] for r in results]
                rows.append(
                    {
                        "export": name,
                        "prompt": prompt_tokens,
                        "runner": runner,
                        "decode_tok_s": round(statistics.median(tok_s), 2),
                        "step_ms": round(statistics.median(step_ms), 3),
                        "overhead_ms": round(statistics.median(overhead_ms), 3),
                        "prefill_s": round(statistics.median(r["prefill_s"] for r in results), 3),
                        "runs": results,
                    }
                )
    sys.path.insert(0, str(REPO))
    from benchmarks.common import table

    print(table(rows, ["export", "prompt", "runner", "decode_tok_s", "step_ms", "overhead_ms", "prefill_s"]))
    print(f"load averages (start, after each length): {' | '.join(loads)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats, "load_averages": loads}
    meta["machine"] = platform.platform()
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
