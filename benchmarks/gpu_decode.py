"""GPU decode speed and parity on a lent NVIDIA GPU: ONNX Runtime's CUDA provider (plain graph with IO binding,
fused graph with a device-resident cache, fused + CUDA graphs) and the torch backend on CUDA, with the same
random checkpoint, prompt and greedy decoding; plus the memory-bandwidth bound of a decode step.

    python benchmarks/gpu_decode.py --shape 350M --batches 1,8 --output $OUT/gpu_decode.json

Per shape it makes a random fp16 checkpoint (make_checkpoint), exports it (fp16; validation on the CPU
provider), adds the fused graph with the rotary outside GroupQueryAttention (the CUDA variant), checks parity
on CUDA (fp32 plain with TF32 off against the torch reference; fused against plain; CUDA graphs on against
off), then measures each backend in a child process (runtime.bench). The bound: weight bytes / the device copy
bandwidth measured with torch (a device-to-device copy of 1 GiB). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, bench backend, open_session options)
VARIANTS = (
    ("ort-plain (IO binding)", "onnxruntime-plain", {"providers": "cuda"}),
    ("ort-fused (device cache)", "onnxruntime-fused", {"providers": "cuda"}),
    ("ort-fused + CUDA graphs", "onnxruntime-fused", {"providers": "cuda", "cuda_graph": True}),
    ("torch on CUDA", "torch", {"device": "cuda"}),
)


def copy_bandwidth_bytes_per_s() -> float:
    """Device-to-device copy bandwidth (read + write counted once each), median of 5 copies of 1 GiB."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * a.numel() / sorted(times[1:])[2]


def prepare(work: Path, shape: str) -> tuple[Path, Path, int]:
    """(checkpoint, fp16 export with the CUDA fused graph, weight bytes) for a random checkpoint of `shape`."""
    import torch

    from codegen_deploy.model.make_checkpoint import make_checkpoint
    from codegen_deploy.model.weights import load_checkpoint
    from codegen_deploy.pipeline import add_fused_graph, export_model

    checkpoint = work / f"ckpt-{shape}"
    if not checkpoint.is_dir():
        make_checkpoint(checkpoint, shape=shape, seed=0, dtype=torch.float16)
    export = work / f"export-{shape}-fp16"
    if not export.is_dir():
        export_model(checkpoint, export, dtype="float16", fused=False)
        model = load_checkpoint(checkpoint, dtype=torch.float16)
        add_fused_graph(export, model, rotary="graph")
        del model
    weight_bytes = sum(f.stat().st_size for f in export.glob("decoder.onnx*"))
    return checkpoint, export, weight_bytes


def parity(checkpoint: Path, export: Path) -> list[dict]:
    """The parity checks of the GPU path, as dicts (report summaries)."""
    from codegen_deploy.runtime.backends import open_session
    from codegen_deploy.verify.parity import compare_sessions
    from codegen_deploy.verify.tolerance import tolerance_for

    prompts = [list(range(100, 228)), [5, 17, 99, 3, 250, 8, 41]]
    out = []
    pairs = (
        (
            "torch fp16 cuda vs ort plain fp16 cuda",
            ("torch", checkpoint, {"device": "cuda", "dtype": torch_fp16()}),
            ("onnxruntime", export, {"providers": "cuda", "graph": "plain"}),
        ),
        (
            "ort plain vs ort fused (cuda)",
            ("onnxruntime", export, {"providers": "cuda", "graph": "plain"}),
            ("onnxruntime", export, {"providers": "cuda", "graph": "fused"}),
        ),
        (
            "ort fused vs fused + CUDA graphs",
            ("onnxruntime", export, {"providers": "cuda", "graph": "fused"}),
            ("onnxruntime", export, {"providers": "cuda", "graph": "fused", "cuda_graph": True}),
        ),
    )
    for name, (ba, pa, oa), (bb, pb, ob) in pairs:
        with open_session(ba, pa, **oa) as a, open_session(bb, pb, **ob) as b:
            report = compare_sessions(a, b, prompts, new_tokens=32, tolerance=tolerance_for("float16"))
        print(report.table(), flush=True)
        out.append(
            {
                "check": name,
                "passed": report.passed,
                "max_abs": report.max_abs,
                "top1": report.top1,
                "greedy": report.greedy_agreement,
            }
        )
    return out


def torch_fp16():
    import torch

    return torch.float16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="350M", help="make_checkpoint shape (350M, 2B, 6B; default 350M)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-gpu"))
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "gpu_decode.json")
    args = p.parse_args(argv)

    from codegen_deploy.runtime.bench import BenchSpec, format_table, measure_in_subprocess

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, export, weight_bytes = prepare(args.work, args.shape)
    bandwidth = copy_bandwidth_bytes_per_s()
    bound = bandwidth / weight_bytes  # batch-1 steps per second if a step only read the weights once
    print(
        f"weights {weight_bytes / 1e9:.2f} GB, device copy {bandwidth / 1e12:.2f} TB/s: "
        f"bound {bound:.0f} tok/s at batch 1",
        flush=True,
    )
    checks = [] if args.skip_parity else parity(checkpoint, export)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for label, backend, options in VARIANTS:
            path = checkpoint if backend == "torch" else export
            options = {**options, "dtype": torch_fp16()} if backend == "torch" else options
            spec = BenchSpec(
                backend=backend,
                path=str(path),
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                batch=batch,
                repeats=args.repeats,
                threads=None,
                options={k: v for k, v in options.items() if k != "dtype"},
            )
            try:
                result = measure_in_subprocess(spec) if backend != "torch" else measure_torch(spec)
            except Exception as e:  # one failing variant must not hide the others' numbers
                print(f"{label} at batch {batch} failed: {e}", flush=True)
                continue
            result["label"] = f"{label} b{batch}"
            result["fraction_of_bound"] = result["decode_tok_s"] / (bound * batch) if batch == 1 else None
            results.append(result)
            print(format_table([result]), flush=True)
    print(format_table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "shape": args.shape,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "bound_tok_s_batch1": bound,
        "parity": checks,
        "results": results,
    }
    args.output.write_text(json.dumps(body, indent=2))
    print(f"wrote {args.output}")
    return 0


def measure_torch(spec) -> dict:
    """The torch backend in fp16 on CUDA (BenchSpec options are JSON: the dtype is passed here)."""
    import dataclasses

    import torch

    from codegen_deploy.memory import peak_rss_bytes
    from codegen_deploy.runtime import bench
    from codegen_deploy.runtime.backends.torch import TorchSession

    start = time.perf_counter()
    session = TorchSession(
        spec.path, dtype=torch.float16, device="cuda", max_context=spec.prompt_tokens + spec.new_tokens
    )
    load_s = time.perf_counter() - start
    with session:
        result = bench.measure_session(session, spec)
    return {**dataclasses.asdict(spec), "load_s": load_s, **result, "peak_rss_bytes": peak_rss_bytes()}


if __name__ == "__main__":
    raise SystemExit(main())
