"""The TensorRT backend: a Session over decoder.engine (built by codegen-build-engine) on a CUDA GPU.

Device memory comes from torch CUDA tensors: torch is a base dependency, its caching allocator returns
addresses aligned far beyond the 256 bytes setTensorAddress requires, and torch.cuda.Stream gives the
stream handle execute_async_v3 wants, so cuda-python would add a dependency and nothing else.

The KV cache never moves between steps. The graph has past_key_values.{i}.* inputs [B, H, past, D] and
separate present.{i}.* outputs [B, H, past + seq, D], and TensorRT does not document an input and an output
bound to overlapping memory (only outputs an engine itself declares aliased, see
ICudaEngine.get_aliased_input_tensor, may share an input's buffer), so past and present cannot be one
buffer. Instead each layer and kind owns two flat buffers of max_batch * H * max_context * D elements
(ping-pong): a step reads past from buffer `src` and writes present into buffer `dst`; the next step reads
that present as its past (a contiguous [B, H, total, D] tensor at the start of `dst` is exactly the past
tensor TensorRT expects) and writes into `src`. No copy, no reallocation; the price is twice the cache memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...artifacts import io_spec
from ...artifacts.engine import (
    DECODE_PROFILE,
    PROFILES,
    PROMPT_PROFILE,
    check_engine_compatible,
    read_engine_manifest,
)
from ...config import ModelConfig
from ...dtypes import torch_dtype
from ...errors import ArtifactError, InputError
from ...gpu import require_cuda_gpu, require_tensorrt
from ..session import Session


class TensorRTSession(Session):
    """A Session over a TensorRT engine: `path` is a folder with decoder.engine + engine.json, or the engine.

    max_batch / max_context: at most what the engine was built for (default: exactly that); they size the
    preallocated device buffers.
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, max_batch: int | None = None, max_context: int | None = None):
        trt = require_tensorrt()
        gpu = require_cuda_gpu()
        import torch

        self._torch = torch
        engine_path, manifest = read_engine_manifest(path)
        check_engine_compatible(manifest, trt.__version__, gpu["name"], gpu["compute_capability"])
        self.manifest = manifest  # engine.json: dtype, options, profiles, versions
        config = ModelConfig(**manifest["model_config"])
        built = manifest["options"]
        for what, asked, limit, option in (
            ("batch", max_batch, built["max_batch"], "--max-batch"),
            ("context", max_context, built["max_context"], "--max-context"),
        ):
            if asked is not None and asked > limit:
                raise InputError(
                    f"the engine was built for {what} <= {limit}, {asked} was asked: rebuild it with "
                    f"codegen-build-engine {option} {asked}"
                )
        super().__init__(
            config, max_context=max_context or built["max_context"], max_batch=max_batch or built["max_batch"]
        )
        self.max_prompt = min(built["max_prompt"], self.max_context)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not load {engine_path} (see its messages above): rebuild the engine")
        self._check_engine_io(trt, engine_path)
        self.context = self.engine.create_execution_context()
        self.device, self.stream = self._device_and_stream()

        cache_dtype = io_spec.cache_dtype(manifest["inputs"], str(engine_path))
        if {t["name"]: t["dtype"] for t in manifest["outputs"]}[io_spec.LOGITS] != "float32":
            raise ArtifactError(f"{engine_path}: unsupported non-float32 logits")
        b, h, c, d = self.max_batch, config.n_head, self.max_context, config.head_dim
        kv_dtype = torch_dtype(cache_dtype)

        def empty(n: int, dtype):
            return torch.empty(n, dtype=dtype, device=self.device)

        self._past_names = io_spec.past_names(config.n_layer)
        self._present_names = io_spec.present_names(config.n_layer)
        self._kv = {name: (empty(b * h * c * d, kv_dtype), empty(b * h * c * d, kv_dtype)) for name in self._past_names}
        self._ids = empty(b * self.max_prompt, torch.int64)
        self._pos = empty(b * self.max_prompt, torch.int64)
        self._mask = empty(b * c, torch.int64)
        self._logits = empty(b * self.max_prompt * config.vocab_size, torch.float32)  # the prompt's [B, T, V]
        self._src = 0  # which ping-pong buffer holds the past
        self._active_profile: int | None = None

    def _device_and_stream(self):
        """The current CUDA device and a stream of its own (TensorRT warns against the default stream)."""
        torch = self._torch
        device = torch.device("cuda", torch.cuda.current_device())
        return device, torch.cuda.Stream(device)

    def _on_stream(self):
        """Context manager that makes torch's copies run on this session's stream."""
        return self._torch.cuda.stream(self.stream)

    def _check_engine_io(self, trt, engine_path: Path) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        fix = "rebuild it with codegen-build-engine"
        io_spec.check_decoder_io(inputs, outputs, self.config.n_layer, str(engine_path), fix=fix)
        if self.engine.num_optimization_profiles != len(PROFILES):
            raise ArtifactError(
                f"{engine_path} has {self.engine.num_optimization_profiles} profiles, not {len(PROFILES)}: rebuild it"
            )

    def _run(self, profile: int, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int) -> np.ndarray:
        """One engine call: ids/pos [B, T], mask [B, past + T] -> last position's logits [B, V] float32."""
        torch, ctx, cfg = self._torch, self.context, self.config
        b, t = ids.shape
        handle = self.stream.cuda_stream
        src, dst = self._src, 1 - self._src
        with self._on_stream():
            if self._active_profile != profile:
                if not ctx.set_optimization_profile_async(profile, handle):
                    raise RuntimeError(f"TensorRT refused optimization profile {PROFILES[profile]}")
                self._active_profile = profile
            for name, host, buf in (
                (io_spec.INPUT_IDS, ids, self._ids),
                (io_spec.ATTENTION_MASK, mask, self._mask),
                (io_spec.POSITION_IDS, pos, self._pos),
            ):
                host = np.ascontiguousarray(host, dtype=np.int64)
                buf[: host.size].copy_(torch.from_numpy(host).view(-1))
                self._bind(name, buf, host.shape)
            for past_name, present_name in zip(self._past_names, self._present_names, strict=True):
                self._bind(past_name, self._kv[past_name][src], (b, cfg.n_head, past, cfg.head_dim))
                ctx.set_tensor_address(present_name, self._kv[past_name][dst].data_ptr())
            ctx.set_tensor_address(io_spec.LOGITS, self._logits.data_ptr())
            if not ctx.execute_async_v3(handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (see its messages above)")
            last = self._logits[: b * t * cfg.vocab_size].view(b, t, cfg.vocab_size)[:, -1, :]  # [B, V]
            host_logits = last.to("cpu", copy=True)
        self.stream.synchronize()
        self._src = dst
        return host_logits.numpy()

    def _bind(self, name: str, buf, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, tuple(int(s) for s in shape)):
            raise RuntimeError(f"TensorRT rejected shape {tuple(shape)} for {name}: outside the engine's profiles")
        self.context.set_tensor_address(name, buf.data_ptr())

    def _prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self._src = 0
        t = input_ids.shape[1]
        p = min(t, self.max_prompt)
        logits = self._run(PROMPT_PROFILE, input_ids[:, :p], attention_mask[:, :p], position_ids[:, :p], past=0)
        # A prompt longer than the prompt profile: its tail goes through the decode profile token by token.
        for i in range(p, t):
            sl = slice(i, i + 1)
            logits = self._run(
                DECODE_PROFILE, input_ids[:, sl], attention_mask[:, : i + 1], position_ids[:, sl], past=i
            )
        return logits

    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        past = attention_mask.shape[1] - 1
        return self._run(DECODE_PROFILE, input_ids, attention_mask, position_ids, past=past)

    def close(self) -> None:
        """Drop the context, engine and device buffers (torch's allocator keeps the memory for reuse)."""
        self.context = None
        self.engine = None
        self._kv = {}
        self._ids = self._pos = self._mask = self._logits = None
