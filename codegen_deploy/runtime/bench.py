"""Speed and memory of a Session: prefill latency, time to first token, steady-state decode, peak RSS.

One measurement = open a session, then `repeats` times: prefill a random prompt, take the greedy
token, and step `new_tokens - 1` more greedy tokens. Decode speed leaves out the first step (warm-up
of buffers and kernels after the prompt) and takes the median over repeats. Each backend runs in a
child process of its own (`measure_in_subprocess`), so its peak RSS is its own and backends do not
share caches or thread pools.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import replaced
from ..errors import CodegenDeployError, InputError, MissingDependencyError
from ..memory import peak_rss_bytes
from .session import Session

# CLI names that pick a graph of the onnxruntime backend.
BACKEND_ALIASES = {
    "onnxruntime-plain": ("onnxruntime", {"graph": "plain"}),
    "onnxruntime-naive": ("onnxruntime", {"graph": "plain", "io_binding": False}),
    "onnxruntime-fused": ("onnxruntime", {"graph": "fused"}),
}


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: a backend of the registry (or an alias above) on a model path, and the workload."""

    backend: str
    path: str
    prompt_tokens: int = 128
    new_tokens: int = 128
    batch: int = 1
    repeats: int = 3
    threads: int | None = 2
    seed: int = 0
    options: dict = field(default_factory=dict)  # extra open_session options
    speculate: str = "off"  # speculative decoding: off, lookup, draft (with `draft`, an export), auto
    draft: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.batch < 1 or self.repeats < 1:
            raise InputError("prompt tokens, batch and repeats must be at least 1")
        if self.speculate != "off" and self.batch != 1:
            raise InputError("speculative decoding is measured at batch 1: drop --batch or use --speculate off")
        if self.new_tokens < 3:
            raise InputError("new tokens must be at least 3 (the first step is left out of the decode speed)")


def random_prompt(vocab_size: int, batch: int, tokens: int, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, tokens] (random weights make the text irrelevant; the shape is what counts)."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, tokens), dtype=np.int64)


def time_generation(session: Session, prompt: np.ndarray, new_tokens: int, drafter=None, stats=None) -> dict:
    """One greedy run of `new_tokens` tokens for each row of prompt [B, T], through the engine (speculatively,
    one row, with a drafter; stats then counts its drafts): seconds to the first token (prefill_s, ttft_s: the
    prompt's run and its argmax) and of each later token (step_s; tokens that one run checked come 0 s apart)."""
    from .engine import BatchEngine, Row, RowSpec, SlotEngine
    from .generate import drive
    from .text import NoText

    rows = [Row(RowSpec(tuple(r.tolist()), new_tokens), NoText(), set()) for r in prompt]
    engine = SlotEngine(session, 1, drafter=drafter) if drafter is not None else BatchEngine(session, len(rows), 0)
    start = last = time.perf_counter()
    ttft, steps, step = None, [], -1
    for p in drive(engine, rows, stats=stats):
        now = time.perf_counter()
        if engine.steps_taken != step:  # the first row's progress in each step
            step = engine.steps_taken
            if ttft is None:
                ttft = now - start
                steps.extend([0.0] * (p.chosen - 1))
            else:
                steps.extend([now - last] + [0.0] * (p.chosen - 1))
            last = now
    return {"prefill_s": ttft, "ttft_s": ttft, "step_s": steps}


def summarize(runs: list[dict], batch: int) -> dict:
    """Medians over repeats: prefill and first-token latency, steady-state decode tokens/s (first step left out)."""
    decode = [batch * (len(r["step_s"]) - 1) / sum(r["step_s"][1:]) for r in runs]
    return {
        "prefill_s": statistics.median(r["prefill_s"] for r in runs),
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "decode_tok_s": statistics.median(decode),
        "decode_tok_s_runs": decode,
        "first_step_s": statistics.median(r["step_s"][0] for r in runs),
    }


def measure_session(session: Session, spec: BenchSpec, progress: Callable[[str], None] | None = None) -> dict:
    """Run the workload `repeats` times on an open session; return the summary (no RSS: see measure()), with
    the drafts' counts when decoded speculatively (batch 1). progress: called with a line after each run (a
    long sweep is never silent)."""
    from .sampling import SamplingConfig
    from .speculate import SpeculationStats, make_drafter

    prompt = random_prompt(session.config.vocab_size, spec.batch, spec.prompt_tokens, spec.seed)
    drafter = stats = None
    if spec.speculate != "off":
        drafter = make_drafter(spec.speculate, session, SamplingConfig(), spec.draft, threads=spec.threads)
        if drafter is None:
            raise InputError(f"the {session.name} session cannot decode speculatively: use --speculate off")
        prompt, stats = prompt[:1], SpeculationStats()
    runs = []
    try:
        for i in range(spec.repeats):
            runs.append(time_generation(session, prompt, spec.new_tokens, drafter, stats))
            _report_run(progress, spec, i, runs[-1])
    finally:
        if drafter is not None:
            drafter.close()
    summary = summarize(runs, len(prompt))
    return summary if stats is None else {**summary, "speculation": stats.to_dict()}


def _report_run(progress: Callable[[str], None] | None, spec: BenchSpec, i: int, run: dict) -> None:
    """A line for run i of spec's repeats: its time to first token and decode speed."""
    if progress is not None:
        decode = spec.batch * (len(run["step_s"]) - 1) / sum(run["step_s"][1:])
        progress(
            f"  {spec.backend}: run {i + 1} of {spec.repeats}: time to first token {run['ttft_s'] * 1e3:.0f} ms, "
            f"decode {decode:.1f} tokens/s"
        )


def open_bench_session(spec: BenchSpec) -> Session:
    """The session a spec names, with its threads (where the backend takes them) and a context just long
    enough for the workload."""
    from .backends import backend_options, open_session

    backend, options = resolve_backend(spec.backend)
    options = {**options, "max_context": spec.prompt_tokens + spec.new_tokens, **spec.options}
    for key, value in backend_options(backend, threads=spec.threads).items():
        options.setdefault(key, value)
    return open_session(backend, spec.path, **options)


def bench_backends() -> list[str]:
    """Every name --backends takes: the registry's backends and the aliases above."""
    from .backends import BACKENDS

    return [*BACKENDS, *BACKEND_ALIASES]


def resolve_backend(name: str) -> tuple[str, dict]:
    """(registry backend, options) for a CLI backend name."""
    backend, options = BACKEND_ALIASES.get(name, (name, {}))
    return backend, dict(options)


def measure(spec: BenchSpec, progress: Callable[[str], None] | None = None) -> dict:
    """Open the session, measure, close; in this process (RSS is this process's peak). progress: called with
    a line when the session is open and after each run."""
    start = time.perf_counter()
    session = open_bench_session(spec)
    load_s = time.perf_counter() - start
    if progress is not None:
        progress(
            f"  {spec.backend}: opened {spec.path} in {load_s:.1f} s; {spec.repeats} runs of {spec.new_tokens} tokens"
        )
    with session:
        result = measure_session(session, spec, progress)
    return {**asdict(spec), "load_s": load_s, **result, "peak_rss_bytes": peak_rss_bytes()}


def run_child(argv: list[str]) -> dict:
    """Run `python argv...` and return the last JSON line it prints (the child reports its own peak RSS).

    Child output that is not the JSON result goes to stderr, so progress lines stay visible.
    """
    # run() kills the child when this process is interrupted (Ctrl-C, or SIGTERM turned into an
    # exception by the CLI); the child also ends itself if this process dies outright (SIGKILL).
    proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            print(line, file=sys.stderr)
    if proc.returncode != 0 or not lines:
        raise CodegenDeployError(
            f"the benchmark child {' '.join(argv[:3])} failed (exit code {proc.returncode}): see above"
        )
    result = json.loads(lines[-1])
    if "error" in result:
        raise CodegenDeployError(result["error"])
    return result


def measure_in_subprocess(spec: BenchSpec) -> dict:
    """measure(spec) in a fresh Python process; peak_rss_bytes is that process's own peak."""
    return run_child(["-m", "codegen_deploy.runtime.bench", json.dumps(asdict(spec))])


def format_table(results: list[dict], weight_bytes: int | None = None) -> str:
    """A plain text table: one row per result."""
    header = ["backend", "prompt", "new", "batch", "load s", "prefill ms", "TTFT ms", "decode tok/s", "peak RSS GB"]
    if weight_bytes:
        header.append("RSS/weights")
    rows = [header]
    for r in results:
        row = [
            r.get("label", r["backend"]),
            str(r["prompt_tokens"]),
            str(r["new_tokens"]),
            str(r["batch"]),
            f"{r.get('load_s', float('nan')):.1f}",
            f"{r['prefill_s'] * 1e3:.0f}",
            f"{r['ttft_s'] * 1e3:.0f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['peak_rss_bytes'] / 1e9:.2f}",
        ]
        if weight_bytes:
            row.append(f"{r['peak_rss_bytes'] / weight_bytes:.2f}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    lines += [_speculation_line(r) for r in results if r.get("speculation")]
    return "\n".join(lines)


def _speculation_line(result: dict) -> str:
    """What speculative decoding did in a result, in words (SpeculationStats.describe)."""
    from .speculate import SpeculationStats

    counts = {k: result["speculation"][k] for k in ("drafted", "accepted", "runs", "tokens")}
    where = f"{result.get('label', result['backend'])} at {result['prompt_tokens']} prompt tokens"
    return f"speculation ({result.get('speculate')}), {where}: {SpeculationStats(**counts).describe()}"


def check_plot_path(path: Path) -> None:
    """Refuse, before anything is measured, a plot that could not be written: not .png, no such folder, or
    no matplotlib."""
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot {path}: give a file name ending in .png")
    if not path.absolute().parent.is_dir():
        raise InputError(f"--plot {path}: the folder {path.absolute().parent} does not exist: create it first")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError('--plot needs matplotlib: pip install "codegen-deploy[bench]"') from None


def plot_results(results: list[dict], path: Path) -> None:
    """Draw time to first token and decode tokens/s against prompt length, a line per backend, to a PNG
    (written to a temporary name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    fig, (ttft, decode) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in dict.fromkeys(r.get("label", r["backend"]) for r in results):
        rows = sorted((r for r in results if r.get("label", r["backend"]) == backend), key=lambda r: r["prompt_tokens"])
        x = [r["prompt_tokens"] for r in rows]
        ttft.plot(x, [r["ttft_s"] * 1e3 for r in rows], "-o", label=backend)
        decode.plot(x, [r["decode_tok_s"] for r in rows], "-o", label=backend)
    first = results[0]
    setup = f"batch {first['batch']}, {first['new_tokens']} new tokens, threads {first.get('threads') or 'default'}"
    ttft.set(title="time to first token", xlabel="prompt tokens", ylabel="ms")
    decode.set(title="decode speed", xlabel="prompt tokens", ylabel="tokens/s")
    for ax in (ttft, decode):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.suptitle(f"codegen-bench: {Path(first['path']).name} ({setup})")
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _end_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so a
    measuring child never outlives a killed codegen-bench; a no-op elsewhere."""
    import ctypes
    import os
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        raise SystemExit(143)


def _child_main(spec_json: str) -> None:
    """Entry of a measuring child: one JSON line on stdout (the result, or {"error": ...})."""
    _end_with_parent()
    spec = BenchSpec(**json.loads(spec_json))
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # keep the backends' progress lines out of the JSON channel
    try:
        result = measure(spec, progress=lambda line: print(line, file=sys.stderr, flush=True))  # live, not piped
    except CodegenDeployError as e:
        result = {"error": str(e)}
    sys.stdout = real_stdout
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main(sys.argv[1])
