"""The TensorRT backend and the Polygraphy ONNX Runtime vs TensorRT check.

Without tensorrt / a CUDA GPU: the one-line errors, the feeds, and Polygraphy's ONNX Runtime runner on the
tiny export (checked against the reference model). With them (`gpu`): engine build, parity with the torch
backend, generation, and the Polygraphy comparison.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types

import numpy as np
import pytest

from codegen_deploy.artifacts import io_spec
from codegen_deploy.artifacts.engine import EngineOptions, profile_shapes
from codegen_deploy.cli import polygraphy as polygraphy_cli
from codegen_deploy.errors import ArtifactError, InputError, MissingDependencyError, ValidationError
from codegen_deploy.gpu import NO_CUDA_GPU, TENSORRT_MISSING
from codegen_deploy.runtime.backends import open_session
from codegen_deploy.verify import polygraphy as polygraphy_check
from codegen_deploy.verify.tolerance import tolerance_for
from tests.conftest import TEST_CONFIGS


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_session_without_tensorrt(no_tensorrt, tmp_path):
    from codegen_deploy.runtime.backends.tensorrt import TensorRTSession

    with pytest.raises(MissingDependencyError) as e:
        TensorRTSession(tmp_path)
    assert str(e.value) == TENSORRT_MISSING
    with pytest.raises(MissingDependencyError, match="tensorrt is not installed"):
        open_session("tensorrt", tmp_path, max_batch=1, max_context=16)


def test_session_without_gpu(monkeypatch, tmp_path):
    import torch

    from codegen_deploy.runtime.backends.tensorrt import TensorRTSession

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError) as e:
        TensorRTSession(tmp_path)
    assert str(e.value) == NO_CUDA_GPU


def test_polygraphy_check_without_tensorrt(no_tensorrt, capsys, tmp_path):
    assert polygraphy_cli.main([str(tmp_path)]) == MissingDependencyError.exit_code
    assert capsys.readouterr().err == f"error: {TENSORRT_MISSING}\n"


def test_step_feeds():
    config = TEST_CONFIGS["odd-head"]
    feeds = polygraphy_check.step_feeds(config, "float16", batch=2, seq=3, past=4, seed=1)
    names = [s.name for s in io_spec.decoder_inputs(config.n_layer, config.n_head, config.head_dim, "float16")]
    assert list(feeds) == names
    assert feeds[io_spec.INPUT_IDS].shape == (2, 3) and feeds[io_spec.INPUT_IDS].max() < config.vocab_size
    assert feeds[io_spec.ATTENTION_MASK].tolist() == [[1] * 7, [0] + [1] * 6], "the last row is left-padded"
    assert feeds[io_spec.POSITION_IDS].tolist() == [[4, 5, 6], [3, 4, 5]], "positions count real tokens only"
    kv = feeds[io_spec.past_name(2, "value")]
    assert kv.shape == (2, 3, 4, 20) and kv.dtype == np.float16
    again = polygraphy_check.step_feeds(config, "float16", batch=2, seq=3, past=4, seed=1)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds), "seeded"


@pytest.mark.parametrize("profile", ["prompt", "decode"])
def test_profile_feeds_sit_at_the_opt_point(profile):
    config = TEST_CONFIGS["tiny"]
    options = EngineOptions(max_batch=2, max_prompt=8, max_context=32)
    feeds = polygraphy_check.profile_feeds(config, options, profile, "float32")
    shapes = profile_shapes(config, options)[profile]
    for name, array in feeds.items():
        assert array.shape == shapes[name][1], name


@pytest.mark.parametrize("profile", ["prompt", "decode"])
def test_polygraphy_onnxruntime_runner_on_profile_feeds(tiny_export, tiny_model, profile):
    """The ONNX Runtime half of the comparison runs here, and its outputs match the reference model."""
    import torch

    config = tiny_model.config
    options = EngineOptions(max_batch=2, max_prompt=8, max_context=32)
    feeds = polygraphy_check.profile_feeds(config, options, profile, "float32", seed=3)
    runner = polygraphy_check.onnxruntime_runner(tiny_export / io_spec.GRAPH_FILE)
    _, [outputs] = polygraphy_check.run_step(runner, feeds)
    b, t = feeds[io_spec.INPUT_IDS].shape
    total = feeds[io_spec.ATTENTION_MASK].shape[1]
    assert outputs[io_spec.LOGITS].shape == (b, t, config.vocab_size)
    assert outputs[io_spec.present_name(1, "value")].shape == (b, config.n_head, total, config.head_dim)

    past = tuple(
        (torch.from_numpy(feeds[io_spec.past_name(i, "key")]), torch.from_numpy(feeds[io_spec.past_name(i, "value")]))
        for i in range(config.n_layer)
    )
    with torch.no_grad():
        logits, present = tiny_model(
            torch.from_numpy(feeds[io_spec.INPUT_IDS]),
            attention_mask=torch.from_numpy(feeds[io_spec.ATTENTION_MASK]),
            position_ids=torch.from_numpy(feeds[io_spec.POSITION_IDS]),
            past_key_values=past,
        )
    np.testing.assert_allclose(outputs[io_spec.LOGITS], logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outputs[io_spec.present_name(0, "key")], present[0][0].numpy(), atol=1e-5)


def test_tensorrt_feeds_give_empty_inputs_a_buffer():
    feeds = polygraphy_check.step_feeds(TEST_CONFIGS["tiny"], "float16", batch=2, seq=3, past=0)
    trt_feeds = polygraphy_check.tensorrt_feeds(feeds)
    empty = trt_feeds[io_spec.past_name(0, "key")]
    assert empty.shape == (2, 4, 0, 16) and empty.array.nbytes == 256 and empty.array.dtype == np.float16
    assert trt_feeds[io_spec.INPUT_IDS] is feeds[io_spec.INPUT_IDS]


def test_polygraphy_comparison_of_two_runs(tiny_export):
    """The comparison half: one report row per output, over two runs of Polygraphy's ONNX Runtime runner."""
    config = TEST_CONFIGS["tiny"]
    options = EngineOptions(max_batch=2, max_prompt=8, max_context=32)
    graph = tiny_export / io_spec.GRAPH_FILE

    def compare(seed_a: int, seed_b: int):
        outputs = []
        for seed in (seed_a, seed_b):
            feeds = polygraphy_check.profile_feeds(config, options, "decode", "float32", seed=seed)
            outputs.append(polygraphy_check.run_step(polygraphy_check.onnxruntime_runner(graph), feeds)[1][0])
        return polygraphy_check.compare_outputs(*outputs, config.n_layer, tolerance_for("float32"))

    same = compare(5, 5)
    assert same.passed and same.max_abs == 0 and same.top1 == 1.0
    assert [r.name for r in same.rows] == [io_spec.LOGITS, *io_spec.present_names(config.n_layer)]
    different = compare(5, 6)
    assert not different.passed, "different inputs must fail the comparison"
    with pytest.raises(ValidationError, match="^tensorrt differs from onnxruntime beyond tolerance"):
        different.check()


class _RecordingEngine:
    """Stands in for a deserialized ICudaEngine + IExecutionContext (the binding names TensorRT 10/11 use):
    execute_async_v3 reads every input from the bound addresses, runs the reference model, and writes
    logits and present into the bound output addresses. It checks what TensorRT would reject (shapes
    outside the active profile, present aliasing past) and records (profile, seq, past) per call."""

    def __init__(self, model, options: EngineOptions):
        self.model, self.config = model, model.config
        self.shapes = list(profile_shapes(self.config, options).values())
        self.names = [
            io_spec.INPUT_IDS,
            io_spec.ATTENTION_MASK,
            io_spec.POSITION_IDS,
            *io_spec.past_names(self.config.n_layer),
            io_spec.LOGITS,
            *io_spec.present_names(self.config.n_layer),
        ]
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), 2
        self.calls: list[tuple[int, int, int]] = []
        self.profile, self.input_shapes, self.addresses = 0, {}, {}

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name.startswith(("input", "attention", "position", "past")) else "OUTPUT"

    def create_execution_context(self):
        return self

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.shapes[self.profile][name]
        self.input_shapes[name] = shape
        return all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def _view(self, name, shape, dtype):
        import ctypes

        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = np.ctypeslib.as_array((ctypes.c_char * max(nbytes, 1)).from_address(self.addresses[name]))
        return raw[:nbytes].view(dtype).reshape(shape)

    def execute_async_v3(self, stream):
        import torch

        cfg, n = self.config, self.config.n_layer
        b, t = self.input_shapes[io_spec.INPUT_IDS]
        past = self.input_shapes[io_spec.past_name(0, "key")][2]
        self.calls.append((self.profile, t, past))
        kv = {
            name: torch.from_numpy(self._view(name, (b, cfg.n_head, past, cfg.head_dim), np.float32).copy())
            for name in io_spec.past_names(n)
        }
        for past_name, present_name in zip(io_spec.past_names(n), io_spec.present_names(n), strict=True):
            assert self.addresses[past_name] != self.addresses[present_name], "present must not alias past"
        with torch.no_grad():
            logits, present = self.model(
                torch.from_numpy(self._view(io_spec.INPUT_IDS, (b, t), np.int64).copy()),
                attention_mask=torch.from_numpy(self._view(io_spec.ATTENTION_MASK, (b, past + t), np.int64).copy()),
                position_ids=torch.from_numpy(self._view(io_spec.POSITION_IDS, (b, t), np.int64).copy()),
                past_key_values=tuple(
                    (kv[io_spec.past_name(i, "key")], kv[io_spec.past_name(i, "value")]) for i in range(n)
                ),
            )
        self._view(io_spec.LOGITS, (b, t, cfg.vocab_size), np.float32)[...] = logits.numpy()
        for i in range(n):
            for j, kind in enumerate(io_spec.KV_KINDS):
                shape = (b, cfg.n_head, past + t, cfg.head_dim)
                self._view(io_spec.present_name(i, kind), shape, np.float32)[...] = present[i][j].numpy()
        return True


def test_session_buffers_and_profiles_with_a_recording_engine(monkeypatch, tmp_path, tiny_model, tiny_checkpoint):
    """The Session's own logic on CPU: profile choice, shapes, addresses, ping-pong cache, long prompts."""
    import contextlib

    import torch

    from codegen_deploy.artifacts.engine import engine_manifest_body, write_engine_manifest
    from codegen_deploy.runtime.backends.tensorrt import TensorRTSession

    class CpuTensorRTSession(TensorRTSession):
        def _device_and_stream(self):
            return torch.device("cpu"), types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)

        def _on_stream(self):
            return contextlib.nullcontext()

    config = tiny_model.config
    options = EngineOptions(max_batch=2, max_prompt=5, max_context=24)
    engine = _RecordingEngine(tiny_model, options)
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.16.1.11"
    fake.Logger = lambda severity: None
    fake.Logger.WARNING = 2
    fake.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    fake.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "NVIDIA H100 80GB HBM3")
    (tmp_path / io_spec.ENGINE_FILE).write_bytes(b"plan")
    specs = io_spec.decoder_inputs(config.n_layer, config.n_head, config.head_dim, "float32")
    outs = io_spec.decoder_outputs(config.n_layer, config.n_head, config.head_dim, config.vocab_size, "float32")
    write_engine_manifest(
        tmp_path,
        engine_manifest_body(
            config=config,
            options=options,
            trt_version="10.16.1.11",
            gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)},
            inputs=[s.to_dict() for s in specs],
            outputs=[s.to_dict() for s in outs],
            export_manifest_sha256=None,
        ),
    )

    ids = np.array([[0, 5, 9, 2, 7, 1, 3], [0, 0, 0, 4, 8, 6, 2]], np.int64)  # 7 tokens > max_prompt 5
    mask = (ids != 0).astype(np.int64)
    with CpuTensorRTSession(tmp_path) as trt, open_session("torch", tiny_checkpoint, max_context=24) as ref:
        assert (trt.max_batch, trt.max_context, trt.max_prompt) == (2, 24, 5)
        a, b = trt.prefill(ids, mask).copy(), ref.prefill(ids, mask)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        for _ in range(8):
            nxt = b.argmax(-1)
            a, b = trt.step(nxt).copy(), ref.step(nxt)
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        with pytest.raises(InputError, match="the engine was built for batch <= 2"):
            CpuTensorRTSession(tmp_path, max_batch=3)
    assert engine.calls[:3] == [(0, 5, 0), (1, 1, 5), (1, 1, 6)], "prompt profile, then the tail token by token"
    assert engine.calls[3:] == [(1, 1, past) for past in range(7, 15)]


# --- GPU: engine build, parity, generation (skipped with a reason where tensorrt or a CUDA GPU is absent) ---

GPU_OPTIONS = EngineOptions(max_batch=2, max_prompt=8, max_context=64, tf32=False)  # full float32 for parity


@pytest.fixture(scope="module")
def tiny_engine(tiny_export, tmp_path_factory):
    from codegen_deploy.export.tensorrt import build_engine

    folder = tmp_path_factory.mktemp("engine")
    for f in tiny_export.iterdir():
        shutil.copy(f, folder / f.name)
    options = dataclasses.replace(GPU_OPTIONS, timing_cache=folder / "timing.cache")
    build_engine(folder, options, progress=lambda line: None)
    return folder


def _torch_session(tiny_checkpoint):
    return open_session("torch", tiny_checkpoint, max_context=GPU_OPTIONS.max_context)


@pytest.mark.gpu
def test_parity_with_torch_left_padded_batch(tiny_engine, tiny_checkpoint):
    ids = np.array([[5, 9, 2, 7, 1, 3], [0, 0, 4, 8, 6, 2]], np.int64)
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int64)
    with open_session("tensorrt", tiny_engine) as trt, _torch_session(tiny_checkpoint) as ref:
        a, b = trt.prefill(ids, mask), ref.prefill(ids, mask)
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)
        for _ in range(20):
            nxt = b.argmax(-1)
            assert np.array_equal(a.argmax(-1), nxt)
            a, b = trt.step(nxt), ref.step(nxt)
            np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_prompt_longer_than_the_prompt_profile(tiny_engine, tiny_checkpoint):
    ids = np.arange(1, 14, dtype=np.int64)[None, :]  # 13 tokens > max_prompt 8: the tail runs as decode steps
    with open_session("tensorrt", tiny_engine) as trt, _torch_session(tiny_checkpoint) as ref:
        np.testing.assert_allclose(trt.prefill(ids), ref.prefill(ids), atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(trt.step(np.array([4])), ref.step(np.array([4])), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_generation_matches_torch(tiny_engine, tiny_checkpoint, tiny_tokenizer):
    from codegen_deploy.runtime.generate import generate

    prompts = ["def add(a, b):", "x ="]
    with open_session("tensorrt", tiny_engine) as trt, _torch_session(tiny_checkpoint) as ref:
        got = generate(trt, tiny_tokenizer, prompts, max_new_tokens=16)
        want = generate(ref, tiny_tokenizer, prompts, max_new_tokens=16)
    assert [c.ids for c in got.completions] == [c.ids for c in want.completions]


@pytest.mark.gpu
def test_context_limit_and_engine_limits(tiny_engine):
    with pytest.raises(InputError, match="rebuild it with codegen-build-engine --max-batch 3"):
        open_session("tensorrt", tiny_engine, max_batch=3)
    with open_session("tensorrt", tiny_engine, max_context=10) as trt:
        trt.prefill(np.ones((1, 8), np.int64))
        trt.step(np.array([1]))
        trt.step(np.array([1]))
        with pytest.raises(InputError, match="the context is full"):
            trt.step(np.array([1]))


@pytest.mark.gpu
def test_engine_from_another_tensorrt_is_refused(tiny_engine, tmp_path):
    for name in (io_spec.ENGINE_FILE, io_spec.ENGINE_MANIFEST_FILE):
        shutil.copy(tiny_engine / name, tmp_path / name)
    manifest = json.loads((tmp_path / io_spec.ENGINE_MANIFEST_FILE).read_text())
    manifest["tensorrt_version"] = "9.0.0"
    (tmp_path / io_spec.ENGINE_MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="the engine was built with TensorRT 9.0.0"):
        open_session("tensorrt", tmp_path / io_spec.ENGINE_FILE)


@pytest.mark.gpu
@pytest.mark.parametrize("profile", ["decode", "prompt"])
def test_polygraphy_onnxruntime_vs_tensorrt(tiny_engine, profile):
    report = polygraphy_check.compare_onnxruntime_tensorrt(tiny_engine, profile=profile)
    assert report.passed, report.table()
