"""Export time and peak memory of `codegen-export` on random checkpoints of the published shapes.

Each export runs in its own child process; its peak RSS is the child's own VmHWM, read by the child
itself at the end (getrusage's ru_maxrss would carry this parent's peak into the child across
fork + exec). A poller also records the child's highest anonymous RSS (RSS less file-backed pages,
such as mapped weight files, which the kernel can drop under memory pressure). Weight bytes are the
model's parameters in the export dtype. Prints the export's own stage lines, a table and, last, one
JSON line.

    python benchmarks/export_memory.py --shape 350M --dtype float32
    python benchmarks/export_memory.py --shape 2B --dtype float16
    python benchmarks/export_memory.py --shape 6B --dtype float16      # ~14 GB checkpoint, ~20 GB of RAM
    python benchmarks/export_memory.py --shape 350M --dtype float32 --method trace

Random checkpoints are made once (codegen-make-checkpoint DIR --shape S --dtype float16, with the real
tokenizer when ../shared/data has it) in --work (default /tmp/codegen-export-bench) and reused; making
one holds the whole model in memory once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "codegen-350M-mono-tokenizer"
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Runs codegen-export's main in the child, then prints the child's own peak RSS as the last line.
_CHILD = """
import json, sys
from codegen_deploy.cli.export import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"exit": code, "vmhwm_kib": int(hwm.split()[1])}), flush=True)
"""


def make_checkpoint(work: Path, shape: str) -> Path:
    ckpt = work / f"random-{shape}-fp16"
    if (ckpt / "config.json").is_file():
        return ckpt
    cmd = [sys.executable, "-m", "codegen_deploy.cli.make_checkpoint", str(ckpt), "--shape", shape]
    cmd += ["--dtype", "float16"]
    if TOKENIZER.is_dir():
        cmd += ["--tokenizer", str(TOKENIZER)]
    subprocess.run(cmd, check=True)
    return ckpt


def poll_anon_rss(proc: psutil.Process, peak: list[int], stop: threading.Event) -> None:
    """peak[0]: the highest anonymous RSS seen (RSS less file-backed shared pages)."""
    while not stop.is_set():
        try:
            info = proc.memory_info()
        except psutil.Error:
            return
        peak[0] = max(peak[0], info.rss - info.shared)
        time.sleep(0.05)


def run_export(ckpt: Path, out: Path, dtype: str, validate: bool, method: str, fused: bool) -> dict:
    args = ["--model", str(ckpt), "--output", str(out), "--dtype", dtype, "--method", method, "--force"]
    args += [] if validate else ["--no-validate"]
    args += [] if fused else ["--no-fused"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    peak, stop = [0], threading.Event()
    poller = threading.Thread(target=poll_anon_rss, args=(psutil.Process(child.pid), peak, stop), daemon=True)
    poller.start()
    log = child.stdout.read()
    child.wait()
    wall = time.perf_counter() - start
    stop.set()
    poller.join()
    lines = log.splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if child.returncode or result is None or result["exit"]:
        raise SystemExit(f"export failed (exit {child.returncode}):\n{log}")
    manifest = json.loads((out / "manifest.json").read_text())
    from codegen_deploy.config import ModelConfig

    params = ModelConfig(**manifest["model_config"]).num_parameters()
    weight_bytes = params * BYTES[dtype]
    peak_rss = result["vmhwm_kib"] * 1024
    validation = manifest.get("validation") or {}
    logits = next((row for row in validation.get("rows", []) if row["name"] == "logits"), {})
    return {
        "checkpoint": ckpt.name,
        "dtype": dtype,
        "method": manifest["method"],
        "validate": validate,
        "fused": "fused_graph_file" in manifest,
        "parameters": params,
        "weight_bytes": weight_bytes,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": peak_rss,
        "peak_over_weights": round(peak_rss / weight_bytes, 2),
        "peak_anon_rss_bytes": peak[0],
        "peak_anon_over_weights": round(peak[0] / weight_bytes, 2),
        "output_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "external_data": manifest["data_file"] is not None,
        "stages_s": manifest["timings_s"],
        "logits_max_abs": logits.get("max_abs"),
        "top1": f"{logits.get('top1_agree')}/{logits.get('top1_total')}" if logits else None,
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "log": [line for line in lines if " RSS " in line or "tolerance" in line or line.startswith("note")],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="350M", help="350M, 2B, 6B, 16B, demo or tiny (default 350M)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=list(BYTES))
    p.add_argument("--method", choices=("built", "trace"), default="built", help="how the plain graph is made")
    p.add_argument("--no-validate", action="store_true", help="measure the export without validation")
    p.add_argument("--no-fused", action="store_true", help="measure the export without the fused graph")
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-export-bench"))
    p.add_argument("--keep", action="store_true", help="keep the export folders")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.work, args.shape)
    rows = []
    for dtype in args.dtype:
        out = args.work / f"export-{args.shape}-{dtype}"
        rows.append(run_export(ckpt, out, dtype, not args.no_validate, args.method, not args.no_fused))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    for r in rows:  # the export's own stage lines: time and memory after each stage
        print(f"--- {args.shape} {r['dtype']} ({r['method']}):")
        print("\n".join(r["log"]))
    gb = 1e9
    header = [
        "shape",
        "dtype",
        "method",
        "valid.",
        "fused",
        "weights GB",
        "peak RSS GB",
        "ratio",
        "anon GB",
        "ratio",
        "wall s",
        "output GB",
        "load avg",
        "stages (s)",
    ]
    print(" | ".join(header))
    for r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        cells = [
            args.shape,
            r["dtype"],
            r["method"],
            "yes" if r["validate"] else "no",
            "yes" if r["fused"] else "no",
            f"{r['weight_bytes'] / gb:.2f}",
            f"{r['peak_rss_bytes'] / gb:.2f}",
            f"{r['peak_over_weights']:.2f}",
            f"{r['peak_anon_rss_bytes'] / gb:.2f}",
            f"{r['peak_anon_over_weights']:.2f}",
            f"{r['wall_s']:.1f}",
            f"{r['output_bytes'] / gb:.2f}",
            f"{r['load_average_before'][0]}",
            stages,
        ]
        print(" | ".join(cells))
    runs = [{k: v for k, v in r.items() if k != "log"} for r in rows]
    print(json.dumps({"shape": args.shape, "cpus": os.cpu_count(), "runs": runs}))


if __name__ == "__main__":
    main()
