"""Load time and peak RSS of the reference loader on a random checkpoint of a published shape.

    python benchmarks/load_memory.py --shape 2B --dtype float16 --layout bin
    python benchmarks/load_memory.py --shape 6B --dtype float16 --layout bin

Makes the checkpoint once under --workdir (random weights, the real tokenizer if ../shared/data has it),
then loads it in a fresh process and reports wall time, the weight bytes, peak RSS after loading
and after one forward pass (which touches every weight: a .bin is memory-mapped, so its pages become
resident only when used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child, table

LOAD = """
import json, sys, time, torch
from codegen_deploy.dtypes import torch_dtype
from codegen_deploy.model import CodeGen
def vmhwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
start = time.perf_counter()
model = load_checkpoint(sys.argv[1], dtype=torch_dtype(sys.argv[2]))
seconds = time.perf_counter() - start
after_load = vmhwm()
with torch.no_grad():  # touches every weight: mmapped pages of a .bin become resident here
    model(torch.zeros(1, 8, dtype=torch.int64))
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_s": round(seconds, 2), "weight_bytes": nbytes, "peak_after_load": after_load}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2B")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--layout", default="bin", choices=("bin", "safetensors"))
    p.add_argument("--workdir", default="/tmp/codegen-bench")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()

    from codegen_deploy.dtypes import torch_dtype
    from codegen_deploy.model.make_checkpoint import make_checkpoint

    folder = Path(args.workdir) / f"random-{args.shape}-{args.dtype}-{args.layout}"
    if not (folder / "config.json").is_file():
        shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "codegen-350M-mono-tokenizer"
        print(f"making {folder} ...", flush=True)
        make_checkpoint(
            folder,
            shape=args.shape,
            dtype=torch_dtype(args.dtype),
            tokenizer=shared if shared.is_dir() else None,
            layout=args.layout,
        )
    result, wall, peak = run_child(LOAD, str(folder), args.dtype)
    row = {
        "shape": args.shape,
        "dtype": args.dtype,
        "layout": args.layout,
        "load_s": result["load_s"],
        "process_s": round(wall, 1),
        "weights_GB": round(result["weight_bytes"] / 1e9, 2),
        "load_peak_GB": round(result["peak_after_load"] / 1e9, 2),
        "peak_with_forward_GB": round(peak / 1e9, 2),
        "peak/weights": round(peak / result["weight_bytes"], 2),
    }
    print(table([row], list(row)))
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
