"""TensorRT engine building: what needs no GPU runs everywhere; engine builds are marked `gpu`."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from codegen_deploy.artifacts import io_spec
from codegen_deploy.artifacts.engine import (
    EngineOptions,
    check_engine_compatible,
    engine_manifest_body,
    profile_shapes,
    read_engine_manifest,
    write_engine_manifest,
)
from codegen_deploy.artifacts.manifest import sha256_file
from codegen_deploy.cli import build_engine as cli
from codegen_deploy.config import PUBLISHED_SHAPES
from codegen_deploy.errors import ArtifactError, ConfigError, MissingDependencyError
from codegen_deploy.export import tensorrt as trt_export
from codegen_deploy.export.tensorrt import network_flags
from codegen_deploy.gpu import NO_CUDA_GPU, TENSORRT_MISSING, require_tensorrt
from tests.conftest import TEST_CONFIGS

ALL_CONFIGS = {**TEST_CONFIGS, **{f"published-{k}": v for k, v in PUBLISHED_SHAPES.items()}}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
@pytest.mark.parametrize("options", [EngineOptions(), EngineOptions(max_batch=4, max_prompt=7, max_context=33)])
def test_profile_shapes(name, options):
    config = ALL_CONFIGS[name]
    o = options.resolved(config)
    shapes = profile_shapes(config, options)
    assert list(shapes) == ["prompt", "decode"]
    names = [s.name for s in io_spec.decoder_inputs(config.n_layer, config.n_head, config.head_dim, "float32")]
    h, d = config.n_head, config.head_dim
    for profile, inputs in shapes.items():
        assert list(inputs) == names, "every graph input, in graph order"
        for lo, opt, hi in inputs.values():
            assert np.all(np.array(lo) <= np.array(opt)) and np.all(np.array(opt) <= np.array(hi)), profile
        ids, mask, pos = inputs[io_spec.INPUT_IDS], inputs[io_spec.ATTENTION_MASK], inputs[io_spec.POSITION_IDS]
        assert [s[0] for s in ids] == [1, o.max_batch, o.max_batch]
        assert pos == ids
        for i in range(3):  # mask total = past + seq at min, opt and max
            past = inputs[io_spec.past_name(0, "key")][i]
            assert past[1] == h and past[3] == d and past[0] == ids[i][0]
            assert mask[i] == (ids[i][0], past[2] + ids[i][1])
            for kv in io_spec.past_names(config.n_layer):
                assert inputs[kv][i] == past
    prompt, decode = shapes["prompt"], shapes["decode"]
    assert [s[2] for s in prompt[io_spec.past_name(0, "value")]] == [0, 0, 0], "the prompt profile has past 0 exactly"
    assert [s[1] for s in prompt[io_spec.INPUT_IDS]] == [1, (o.max_prompt + 1) // 2, o.max_prompt]
    assert [s[1] for s in decode[io_spec.INPUT_IDS]] == [1, 1, 1]
    assert [s[2] for s in decode[io_spec.past_name(0, "key")]] == [1, o.max_context // 2, o.max_context - 1]


def test_default_options_follow_the_model():
    o = EngineOptions().resolved(PUBLISHED_SHAPES["6B"])
    assert (o.max_batch, o.max_prompt, o.max_context) == (1, 512, 2048)
    small = TEST_CONFIGS["odd-head"]  # n_positions 64
    assert EngineOptions().resolved(small).max_prompt == 64
    decode = profile_shapes(PUBLISHED_SHAPES["6B"])["decode"]
    assert decode[io_spec.past_name(32, "value")] == ((1, 16, 1, 256), (1, 16, 1024, 256), (1, 16, 2047, 256))
    assert decode[io_spec.ATTENTION_MASK] == ((1, 2), (1, 1025), (1, 2048))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(max_batch=0), "--max-batch is 0"),
        (EngineOptions(max_context=1), "--max-context is 1: give at least 2"),
        (EngineOptions(max_context=129), "--max-context 129 exceeds the model's 128 positions"),
        (EngineOptions(max_prompt=0), "--max-prompt is 0"),
        (EngineOptions(max_prompt=65, max_context=64), "--max-prompt 65 exceeds --max-context 64"),
        (EngineOptions(max_prompt=200), "--max-prompt 200 exceeds --max-context 128"),
        (EngineOptions(workspace_mb=0), "--workspace-mb is 0"),
        (EngineOptions(builder_optimization_level=6), "--opt-level is 6: give 0 to 5"),
    ],
)
def test_option_validation(options, message):
    with pytest.raises(ConfigError) as e:
        options.resolved(TEST_CONFIGS["tiny"])  # n_positions 128
    assert message in str(e.value) and "\n" not in str(e.value)


def _fake_trt(version: str):
    flags = types.SimpleNamespace(STRONGLY_TYPED=1)  # TensorRT 10's enum value (EXPLICIT_BATCH is 0)
    return types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags)


def test_network_flags_strongly_typed_on_10_and_nothing_on_11():
    assert network_flags(_fake_trt("10.16.1.11")) == 1 << 1
    assert network_flags(_fake_trt("10.0.0")) == 1 << 1
    assert network_flags(_fake_trt("11.1.0")) == 0, "TensorRT 11 is always strongly typed; the flag is deprecated"


MANIFEST = {"tensorrt_version": "10.16.1.11", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}


def test_engine_compatible():
    check_engine_compatible(MANIFEST, "10.16.1.11", "NVIDIA H100 80GB HBM3", (9, 0))
    check_engine_compatible(MANIFEST, "10.16.1.11", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.mark.parametrize(
    ("runtime", "gpu", "cc", "message"),
    [
        (
            "11.1.0",
            "NVIDIA H100 80GB HBM3",
            (9, 0),
            "the engine was built with TensorRT 10.16.1.11, this machine runs TensorRT 11.1.0: rebuild it on this "
            "machine with: codegen-build-engine EXPORT_DIR",
        ),
        (
            "10.16.1.11",
            "NVIDIA A100-SXM4-80GB",
            (8, 0),
            "the engine was built for a NVIDIA H100 80GB HBM3 (compute capability 9.0), this GPU is a "
            "NVIDIA A100-SXM4-80GB (compute capability 8.0): rebuild it",
        ),
        (
            "10.16.1.11",
            "NVIDIA H100 PCIe",
            "9.0",
            "the engine was built for a NVIDIA H100 80GB HBM3, this GPU is a NVIDIA H100 PCIe: rebuild it",
        ),
    ],
)
def test_engine_mismatch_messages(runtime, gpu, cc, message):
    with pytest.raises(ArtifactError) as e:
        check_engine_compatible(MANIFEST, runtime, gpu, cc)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _engine_folder(tmp_path: Path, payload: bytes = b"\x00engine bytes") -> Path:
    config = TEST_CONFIGS["tiny"]
    (tmp_path / io_spec.ENGINE_FILE).write_bytes(payload)
    inputs = [s.to_dict() for s in io_spec.decoder_inputs(config.n_layer, config.n_head, config.head_dim, "float16")]
    outputs = [
        s.to_dict()
        for s in io_spec.decoder_outputs(config.n_layer, config.n_head, config.head_dim, config.vocab_size, "float16")
    ]
    body = engine_manifest_body(
        config=config,
        options=EngineOptions(max_batch=2, max_context=64),
        trt_version="11.1.0",
        gpu={"name": "GPU", "compute_capability": (8, 9)},
        inputs=inputs,
        outputs=outputs,
        export_manifest_sha256="ab" * 32,
    )
    write_engine_manifest(tmp_path, body)
    return tmp_path


def test_engine_manifest_round_trip(tmp_path):
    folder = _engine_folder(tmp_path)
    engine, manifest = read_engine_manifest(folder, verify="sha256")
    assert engine == folder / io_spec.ENGINE_FILE
    assert read_engine_manifest(engine)[1] == manifest, "the engine file's path works too"
    assert manifest["tensorrt_version"] == "11.1.0" and manifest["gpu"]["compute_capability"] == "8.9"
    assert manifest["options"]["max_prompt"] == 64 and manifest["options"]["max_batch"] == 2
    assert manifest["profile_order"] == ["prompt", "decode"]
    assert manifest["profiles"]["decode"][io_spec.ATTENTION_MASK] == {"min": [1, 2], "opt": [2, 33], "max": [2, 64]}
    assert list(manifest["files"]) == [io_spec.ENGINE_FILE]
    assert json.loads((folder / io_spec.ENGINE_MANIFEST_FILE).read_text()) == manifest


def test_truncated_engine_is_refused(tmp_path):
    folder = _engine_folder(tmp_path)
    (folder / io_spec.ENGINE_FILE).write_bytes(b"\x00engine")
    with pytest.raises(ArtifactError, match="truncated or changed"):
        read_engine_manifest(folder)


def test_folder_without_engine(tmp_path):
    with pytest.raises(ArtifactError, match=f"has no {io_spec.ENGINE_FILE}: build one with codegen-build-engine"):
        read_engine_manifest(tmp_path)


def test_default_timing_cache_is_per_gpu_and_version(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = trt_export.default_timing_cache({"name": "x", "compute_capability": "9.0"}, "10.16.1.11")
    assert path == tmp_path / "codegen-deploy" / "tensorrt" / "timing-sm90-trt10.16.cache"


def test_engine_arguments():
    parser = argparse.ArgumentParser()
    cli.add_engine_arguments(parser)
    argv = "--max-batch 4 --max-prompt 64 --max-context 256 --workspace-mb 2048 --timing-cache t.cache --opt-level 5"
    args = parser.parse_args([*argv.split(), "--no-tf32"])
    assert cli.engine_options_from_args(args) == EngineOptions(4, 64, 256, 2048, Path("t.cache"), 5, tf32=False)
    assert cli.engine_options_from_args(parser.parse_args([])) == EngineOptions()


def test_missing_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(MissingDependencyError) as e:
        require_tensorrt()
    assert str(e.value) == TENSORRT_MISSING


def test_cli_without_tensorrt_prints_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert cli.main([str(tmp_path)]) == MissingDependencyError.exit_code
    err = capsys.readouterr().err
    assert err == (
        'error: tensorrt is not installed: pip install "codegen-deploy[gpu]" on a machine with an NVIDIA GPU\n'
    )


def test_cli_without_gpu_prints_one_line(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([str(tmp_path), "--max-batch", "2"]) == MissingDependencyError.exit_code
    assert capsys.readouterr().err == f"error: {NO_CUDA_GPU}\n"


def test_cli_help_lists_the_engine_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for option in ("--max-batch", "--max-prompt", "--max-context", "--workspace-mb", "--timing-cache", "--output"):
        assert option in out


# --- GPU: real engine builds (skipped with a reason where tensorrt or a CUDA GPU is absent) ---


@pytest.mark.gpu
def test_build_engine_on_tiny_export(tiny_export, tmp_path):
    import tensorrt as trt

    lines: list[str] = []
    options = EngineOptions(
        max_batch=2,
        max_prompt=16,
        max_context=64,
        workspace_mb=1024,
        timing_cache=tmp_path / "timing.cache",
        tf32=False,
    )
    engine = trt_export.build_engine(tiny_export, options, progress=lines.append, output_dir=tmp_path / "engine")
    assert engine == tmp_path / "engine" / io_spec.ENGINE_FILE and engine.stat().st_size > 0
    assert (tmp_path / "timing.cache").stat().st_size > 0, "the timing cache is saved for the next build"
    assert any("tensorrt:" in line for line in lines), "the progress monitor reported phases"
    _, manifest = read_engine_manifest(engine.parent, verify="sha256")
    assert manifest["tensorrt_version"] == trt.__version__
    assert {t["name"]: t["dtype"] for t in manifest["outputs"]}[io_spec.LOGITS] == "float32"

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    loaded = runtime.deserialize_cuda_engine(engine.read_bytes())
    assert loaded.num_optimization_profiles == 2
    lo, opt, hi = loaded.get_tensor_profile_shape(io_spec.past_name(0, "key"), 0)
    assert (lo[2], opt[2], hi[2]) == (0, 0, 0), "TensorRT kept the prompt profile's empty past"
    lo, opt, hi = loaded.get_tensor_profile_shape(io_spec.ATTENTION_MASK, 1)
    assert tuple(hi) == (2, 64)

    again: list[str] = []
    trt_export.build_engine(tiny_export, options, progress=again.append, output_dir=tmp_path / "engine")
    assert any("timing cache" in line and "(0 bytes)" not in line for line in again)


class _FakeTensorRT(types.ModuleType):
    """A recording stand-in for the `tensorrt` module: exactly the calls build_engine makes, with the names
    and signatures of the TensorRT 10/11 Python bindings. Checks the builder's orchestration on CPU."""

    def __init__(self, version: str, config, cache_dtype: str = "float16"):
        super().__init__("tensorrt")
        fake = self
        self.__version__ = version
        self.calls: list = []
        self.profiles: list[dict] = []
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32")
        self.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT64="INT64")
        np_types = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64}
        self.nptype = lambda dt: np_types[dt]
        kv = "HALF" if cache_dtype == "float16" else "FLOAT"
        tensor = types.SimpleNamespace
        n, kv_shape = config.n_layer, (-1, config.n_head, -1, config.head_dim)
        ins = [
            tensor(name=io_spec.INPUT_IDS, dtype="INT64", shape=(-1, -1)),
            tensor(name=io_spec.ATTENTION_MASK, dtype="INT64", shape=(-1, -1)),
            tensor(name=io_spec.POSITION_IDS, dtype="INT64", shape=(-1, -1)),
            *(tensor(name=p, dtype=kv, shape=kv_shape) for p in io_spec.past_names(n)),
        ]
        outs = [
            tensor(name=io_spec.LOGITS, dtype="FLOAT", shape=(-1, -1, config.vocab_size)),
            *(tensor(name=p, dtype=kv, shape=kv_shape) for p in io_spec.present_names(n)),
        ]

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity):
                pass

        class IProgressMonitor:
            def __init__(self):
                pass

        class Network:
            num_inputs, num_outputs, num_layers = len(ins), len(outs), 42

            def get_input(self, i):
                return ins[i]

            def get_output(self, i):
                return outs[i]

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                return True

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+tuned"

        class BuilderConfig:
            builder_optimization_level = 3
            progress_monitor = None

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def add_optimization_profile(self, profile):
                fake.profiles.append(profile.shapes)

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                return True

            def get_timing_cache(self):
                return self.cache

        class Plan(bytes):
            @property
            def nbytes(self):
                return len(self)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                fake.config = BuilderConfig()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                monitor = config.progress_monitor
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactic search", "Building engine", 5)
                monitor.phase_start("Kernel 7", "Tactic search", 1)  # too deep to report
                assert monitor.step_complete("Tactic search", 0) is True
                for phase in ("Kernel 7", "Tactic search", "Building engine"):
                    monitor.phase_finish(phase)
                return Plan(b"serialized engine")

        self.Logger, self.IProgressMonitor, self.Builder, self.OnnxParser = Logger, IProgressMonitor, Builder, Parser


@pytest.mark.parametrize("version", ["10.16.1.11", "11.1.0"])
def test_build_engine_orchestration_with_a_recording_tensorrt(monkeypatch, tmp_path, version):
    import torch

    from codegen_deploy.artifacts.manifest import write_manifest

    config = TEST_CONFIGS["odd-head"]
    export = tmp_path / "export"
    export.mkdir()
    (export / io_spec.GRAPH_FILE).write_bytes(b"onnx")
    write_manifest(export, {"model_config": config.to_dict(), "graph_file": io_spec.GRAPH_FILE, "dtype": "float16"})
    fake = _FakeTensorRT(version, config)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "NVIDIA L4")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    lines: list[str] = []
    options = EngineOptions(
        max_batch=2,
        max_prompt=8,
        max_context=32,
        workspace_mb=512,
        timing_cache=cache,
        builder_optimization_level=4,
        tf32=False,
    )
    engine = trt_export.build_engine(export, options, progress=lines.append, output_dir=tmp_path / "out")

    assert ("create_network", 0 if version.startswith("11") else 2) in fake.calls
    assert ("parse_from_file", str(export / io_spec.GRAPH_FILE)) in fake.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in fake.calls
    assert ("set_timing_cache", b"old", False) in fake.calls
    assert ("clear_flag", "TF32") in fake.calls
    assert fake.config.builder_optimization_level == 4
    assert fake.profiles == list(profile_shapes(config, options).values())
    assert cache.read_bytes() == b"old+tuned", "the timing cache is saved back"
    assert engine.read_bytes() == b"serialized engine"
    reported = [line.strip() for line in lines if "tensorrt:" in line]
    assert (
        reported
        == ["tensorrt: Building engine (2 steps)", "tensorrt: Tactic search (5 steps)"]
        + [r for r in reported[2:] if r.endswith(" s")]
        and len(reported) == 4
    ), reported

    _, manifest = read_engine_manifest(engine, verify="sha256")
    assert manifest["tensorrt_version"] == version and manifest["dtype"] == "float16"
    assert manifest["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9"}
    dtypes = {t["name"]: t["dtype"] for t in manifest["inputs"] + manifest["outputs"]}
    assert dtypes[io_spec.LOGITS] == "float32" and dtypes[io_spec.past_name(2, "value")] == "float16"
    assert dtypes[io_spec.INPUT_IDS] == "int64"
    assert manifest["export_manifest_sha256"] == sha256_file(export / io_spec.MANIFEST_FILE)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "no temporary files left"


@pytest.mark.gpu
def test_build_fp16_engine_with_external_data(fp16_export, tmp_path):
    """parse_from_file finds decoder.onnx.data; the strongly typed engine keeps the graph's fp16 cache."""
    from codegen_deploy.verify import polygraphy as polygraphy_check

    assert (fp16_export / io_spec.DATA_FILE).is_file()
    options = EngineOptions(max_batch=2, max_prompt=16, max_context=64, timing_cache=tmp_path / "timing.cache")
    engine = trt_export.build_engine(fp16_export, options, progress=lambda line: None, output_dir=tmp_path)
    _, manifest = read_engine_manifest(engine)
    dtypes = {t["name"]: t["dtype"] for t in manifest["inputs"] + manifest["outputs"]}
    assert dtypes[io_spec.past_name(0, "key")] == "float16" and dtypes[io_spec.LOGITS] == "float32"
    report = polygraphy_check.compare_onnxruntime_tensorrt(fp16_export, tmp_path, profile="decode")
    assert report.passed, report.table()
