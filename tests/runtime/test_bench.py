"""codegen-bench's measuring module on a tiny export: the structure of the results, not the timings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from codegen_deploy.cli.bench import main as bench_main
from codegen_deploy.errors import InputError
from codegen_deploy.pipeline import add_fused_graph
from codegen_deploy.runtime.bench import BenchSpec, format_table, measure_session, time_generation

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def fused_export(tiny_export, tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny export with the fused graph added (the shared fixture stays plain)."""
    from codegen_deploy.model.weights import load_checkpoint

    folder = tmp_path_factory.mktemp("bench") / "tiny-fused"
    shutil.copytree(tiny_export, folder)
    add_fused_graph(folder, load_checkpoint(tiny_checkpoint))
    return folder


def test_time_generation_and_summary(fused_export):
    from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession

    spec = BenchSpec(backend="onnxruntime-fused", path=str(fused_export), prompt_tokens=5, new_tokens=6, repeats=2)
    with FusedOrtSession(fused_export, threads=1) as session:
        run = time_generation(session, np.zeros((1, 5), np.int64), new_tokens=6)
        assert len(run["step_s"]) == 5 and run["ttft_s"] >= run["prefill_s"] > 0
        result = measure_session(session, spec)
    assert len(result["decode_tok_s_runs"]) == 2
    assert all(v > 0 for v in result["decode_tok_s_runs"])
    assert result["decode_tok_s"] > 0 and result["ttft_s"] >= result["prefill_s"] > 0


def test_codegen_bench_json_runs_each_backend_in_its_own_process(fused_export, capsys):
    code = bench_main(
        [
            str(fused_export),
            "--backends",
            "onnxruntime-fused,onnxruntime-naive",
            "--prompt-tokens",
            "4",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
        ]
    )
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in results] == ["onnxruntime-fused", "onnxruntime-naive"]
    for r in results:
        assert r["prompt_tokens"] == 4 and r["new_tokens"] == 4 and r["batch"] == 1
        assert r["decode_tok_s"] > 0 and r["peak_rss_bytes"] > 10_000_000 and r["load_s"] > 0
    table = format_table(results, weight_bytes=1_000_000)
    assert "onnxruntime-naive" in table and "RSS/weights" in table


def test_bad_workloads_are_refused(capsys):
    with pytest.raises(InputError, match="at least 3"):
        BenchSpec(backend="torch", path="x", new_tokens=2)
    assert bench_main(["/nonexistent", "--backends", "nope", "--new-tokens", "4", "--repeats", "1"]) != 0
    assert "error:" in capsys.readouterr().err


def test_threads_go_only_to_backends_that_take_them(monkeypatch):
    from codegen_deploy.runtime import backends
    from codegen_deploy.runtime.bench import open_bench_session

    opened = []
    monkeypatch.setattr(backends, "open_session", lambda backend, path, **options: opened.append((backend, options)))
    open_bench_session(BenchSpec(backend="tensorrt", path="e", threads=2, prompt_tokens=4, new_tokens=4))
    open_bench_session(BenchSpec(backend="onnxruntime-fused", path="e", threads=2, prompt_tokens=4, new_tokens=4))
    assert opened[0] == ("tensorrt", {"max_context": 8})
    assert opened[1] == ("onnxruntime", {"graph": "fused", "max_context": 8, "threads": 2})


def test_unknown_backend_lists_the_aliases_too(capsys, tmp_path):
    assert bench_main([str(tmp_path), "--backends", "torch,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown backend nope" in err and "onnxruntime-naive" in err and "tensorrt" in err
    assert "measuring" not in err  # refused before anything ran


def test_sigterm_ends_the_measuring_child_too(fused_export):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    workload = ["--prompt-tokens", "4", "--new-tokens", "100", "--repeats", "100000", "--verify", "size"]
    argv = [sys.executable, "-m", "codegen_deploy.cli.bench", str(fused_export), "--backends", "onnxruntime-fused"]
    argv += workload
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    end = time.monotonic() + 60
    while not (children.exists() and children.read_text().split()) and time.monotonic() < end:
        time.sleep(0.05)
    child = int(children.read_text().split()[0])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "error: terminated" in err
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_a_sweep_over_prompt_lengths_takes_turns_and_plots(fused_export, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    argv = [str(fused_export), "--backends", "onnxruntime-fused,onnxruntime-naive", "--prompt-tokens", "3,6"]
    argv += ["--new-tokens", "4", "--repeats", "1", "--threads", "1", "--json", "--plot", str(plot)]
    assert bench_main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    # Backends take turns at each length (a drifting machine affects them alike).
    assert [(r["prompt_tokens"], r["backend"]) for r in results] == [
        (3, "onnxruntime-fused"),
        (3, "onnxruntime-naive"),
        (6, "onnxruntime-fused"),
        (6, "onnxruntime-naive"),
    ]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]  # no temporary file left


@pytest.mark.parametrize(
    ("plot", "message"),
    [("out.svg", "ending in .png"), ("no/such/folder/out.png", "does not exist")],
)
def test_a_plot_that_cannot_be_written_is_refused_before_measuring(fused_export, tmp_path, capsys, plot, message):
    argv = [str(fused_export), "--backends", "onnxruntime-fused", "--prompt-tokens", "3"]
    assert bench_main([*argv, "--new-tokens", "4", "--plot", str(tmp_path / plot)]) == 2
    err = capsys.readouterr().err
    assert message in err and "measuring" not in err and len(err.strip().splitlines()) == 1


def test_bad_prompt_lengths_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["x", "--prompt-tokens", "128,zero"])
    assert e.value.code == 2 and "expected a whole number" in capsys.readouterr().err


def test_a_backend_that_cannot_run_keeps_the_others_results(fused_export, capsys):
    """tensorrt fails here (not installed, or no engine in this export folder): the onnxruntime rows measured
    before and after it are printed, then one line for it, tried once, not at every prompt length."""
    argv = [str(fused_export), "--backends", "onnxruntime-naive,tensorrt", "--prompt-tokens", "3,4"]
    assert bench_main([*argv, "--new-tokens", "3", "--repeats", "1", "--threads", "1", "--json"]) == 2
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert [(r["backend"], r["prompt_tokens"]) for r in results] == [("onnxruntime-naive", 3), ("onnxruntime-naive", 4)]
    failures = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(failures) == 1 and failures[0].startswith("error: tensorrt could not be measured: ")
    assert err.count("measuring tensorrt") == 1


def test_a_speculative_measurement_reports_its_drafts(fused_export, capsys):
    argv = [str(fused_export), "--backends", "onnxruntime-fused", "--prompt-tokens", "6", "--new-tokens", "12"]
    assert bench_main([*argv, "--repeats", "1", "--threads", "1", "--speculate", "lookup", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    spec = result["speculation"]
    assert spec["tokens"] == 12 and spec["runs"] <= 12 and result["decode_tok_s"] > 0
    with pytest.raises(InputError, match="batch 1"):
        BenchSpec(backend="onnxruntime-fused", path="x", batch=2, speculate="lookup")


def test_a_sweep_says_what_it_measures_as_it_goes(fused_export, capfd):
    argv = [str(fused_export), "--backends", "onnxruntime-fused,onnxruntime-naive", "--prompt-tokens", "3,4"]
    assert bench_main([*argv, "--new-tokens", "4", "--repeats", "2", "--threads", "1", "--json"]) == 0
    out, err = capfd.readouterr()
    assert len(json.loads(out)) == 4  # stdout holds the results only; progress goes to stderr
    order = [(b, n) for n in (3, 4) for b in ("onnxruntime-fused", "onnxruntime-naive")]
    for i, (backend, prompt) in enumerate(order, 1):
        assert f"[{i}/4] measuring {backend} at {prompt} prompt tokens ..." in err
        assert f"[{i}/4] {backend} at {prompt} prompt tokens: time to first token" in err
    for backend in ("onnxruntime-fused", "onnxruntime-naive"):  # from each measuring child, as it runs
        assert err.count(f"  {backend}: opened {fused_export} in ") == 2
        assert err.count(f"  {backend}: run 2 of 2: time to first token") == 2


def test_the_table_says_what_speculation_did():
    base = {"backend": "onnxruntime-fused", "new_tokens": 12, "batch": 1, "load_s": 0.1, "prefill_s": 0.01}
    base |= {"ttft_s": 0.01, "decode_tok_s": 50.0, "peak_rss_bytes": 1e8, "speculate": "lookup"}
    none = {**base, "prompt_tokens": 6, "speculation": {"drafted": 0, "accepted": 0, "runs": 12, "tokens": 12}}
    some = {**base, "prompt_tokens": 7, "speculation": {"drafted": 8, "accepted": 6, "runs": 6, "tokens": 12}}
    lines = format_table([none, some]).splitlines()
    assert lines[-2].startswith("speculation (lookup), onnxruntime-fused at 6 prompt tokens: no tokens drafted")
    assert lines[-1] == (
        "speculation (lookup), onnxruntime-fused at 7 prompt tokens: 6 of 8 drafted tokens accepted (75%): 2.00 "
        "tokens per run of the model (plain decoding makes 1.00)"
    )
