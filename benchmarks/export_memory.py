"""Export time and peak memory of `codegen-export` on random checkpoints of the published shapes.

Each export runs in its own subprocess; peak RSS is the child's ru_maxrss (exact, from the kernel),
cross-checked by polling the child's RSS with psutil. Weight bytes are the model's parameters in the
export dtype. Prints a table and, last, one JSON line.

    python benchmarks/export_memory.py --shape 350M --dtype float32 float16
    python benchmarks/export_memory.py --shape 2B --dtype float16 --no-validate

Random checkpoints are made once (codegen-make-checkpoint --shape S --dtype float16 with the real
tokenizer when ../shared/data has it) in --work (default /tmp/codegen-export-bench) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def make_checkpoint(work: Path, shape: str) -> Path:
    ckpt = work / f"random-{shape}-fp16"
    if (ckpt / "config.json").is_file():
        return ckpt
    cmd = [
        sys.executable,
        "-m",
        "codegen_deploy.cli.make_checkpoint",
        str(ckpt),
        "--shape",
        shape,
        "--dtype",
        "float16",
    ]
    if TOKENIZER.is_dir():
        cmd += ["--tokenizer", str(TOKENIZER)]
    subprocess.run(cmd, check=True)
    return ckpt


def poll_rss(proc: psutil.Process, peak: list[int], stop: threading.Event) -> None:
    """peak[0]: highest RSS seen; peak[1]: highest anonymous RSS (RSS less file-backed pages, such as
    the safetensors checkpoint's mmap, which the kernel can drop under memory pressure)."""
    while not stop.is_set():
        try:
            info = proc.memory_info()
        except psutil.Error:
            return
        peak[0] = max(peak[0], info.rss)
        peak[1] = max(peak[1], info.rss - info.shared)
        time.sleep(0.05)


def run_export(ckpt: Path, out: Path, dtype: str, validate: bool) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "codegen_deploy.cli.export",
        "--model",
        str(ckpt),
        "--output",
        str(out),
        "--dtype",
        dtype,
        "--force",
    ]
    if not validate:
        cmd.append("--no-validate")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0, 0], threading.Event()
    poller = threading.Thread(target=poll_rss, args=(psutil.Process(child.pid), peak, stop), daemon=True)
    poller.start()
    log = child.stdout.read()
    child.wait()
    wall = time.perf_counter() - start
    stop.set()
    poller.join()
    if child.returncode:
        raise SystemExit(f"export failed (exit {child.returncode}):\n{log}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    if maxrss <= before * 1024:
        maxrss = peak[0]  # an earlier child had a higher peak: fall back to polling
    manifest = json.loads((out / "manifest.json").read_text())
    config = manifest["model_config"]
    from codegen_deploy.config import ModelConfig

    params = ModelConfig(**config).num_parameters()
    weight_bytes = params * BYTES[dtype]
    validation = manifest.get("validation") or {}
    return {
        "checkpoint": ckpt.name,
        "dtype": dtype,
        "validate": validate,
        "parameters": params,
        "weight_bytes": weight_bytes,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": maxrss,
        "peak_rss_polled_bytes": peak[0],
        "peak_anon_rss_bytes": peak[1],
        "peak_anon_over_weights": round(peak[1] / weight_bytes, 2),
        "peak_over_weights": round(maxrss / weight_bytes, 2),
        "output_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "external_data": manifest["data_file"] is not None,
        "stages_s": manifest["timings_s"],
        "logits_max_abs": validation.get("outputs", {}).get("logits", {}).get("max_abs"),
        "top1": f"{validation.get('top1_agree')}/{validation.get('top1_total')}" if validation else None,
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "log": [line for line in log.splitlines() if " RSS " in line or "tolerance" in line],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="350M", help="350M, 2B, 6B, 16B, demo or tiny (default 350M)")
    p.add_argument("--dtype", nargs="+", default=["float32", "float16"], choices=list(BYTES))
    p.add_argument("--no-validate", action="store_true", help="measure the export without validation")
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-export-bench"))
    p.add_argument("--keep", action="store_true", help="keep the export folders")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.work, args.shape)
    rows = []
    for dtype in args.dtype:
        out = args.work / f"export-{args.shape}-{dtype}"
        rows.append(run_export(ckpt, out, dtype, validate=not args.no_validate))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    for r in rows:  # the export's own stage lines: time and memory after each stage
        print(f"--- {args.shape} {r['dtype']}:")
        print("\n".join(r["log"]))
    gb = 1e9
    print(
        f"{'shape':<6} {'dtype':<8} {'valid.':<6} {'weights GB':>10} {'peak RSS GB':>11} {'ratio':>6} "
        f"{'anon GB':>8} {'ratio':>6} {'wall s':>7} {'output GB':>9}  stages (s)"
    )
    for r in rows:
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        print(
            f"{args.shape:<6} {r['dtype']:<8} {'yes' if r['validate'] else 'no':<6} {r['weight_bytes'] / gb:>10.2f} "
            f"{r['peak_rss_bytes'] / gb:>11.2f} {r['peak_over_weights']:>6.2f} {r['peak_anon_rss_bytes'] / gb:>8.2f} "
            f"{r['peak_anon_over_weights']:>6.2f} {r['wall_s']:>7.1f} "
            f"{r['output_bytes'] / gb:>9.2f}  {stages}"
        )
    print(
        json.dumps(
            {
                "shape": args.shape,
                "cpus": os.cpu_count(),
                "runs": [{k: v for k, v in r.items() if k != "log"} for r in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
