"""Hugging Face CodeGen checkpoints <-> our model: a strict key map, the qkv un-shard, and dtype casts.

Loading builds the model on the meta device and assigns one tensor at a time, already cast, so
a model never exists twice in memory (the 6B model in fp16 loads on a 24 GiB machine).
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import ModelConfig
from ..dtypes import dtype_name
from ..errors import CheckpointError
from ..memory import check_fits_in_memory
from .hub import CHECKPOINT_LAYOUTS, resolve_model
from .reference import CodeGen

# Buffers that published checkpoints carry but that hold no weights (vLLM's strict loader failed on them).
_KNOWN_BUFFERS = re.compile(r"^transformer\.h\.\d+\.attn\.(causal_mask|masked_bias|bias|scale_attn)$")
_LAYER_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "mlp.fc_in.weight": "mlp.fc_in.weight",
    "mlp.fc_in.bias": "mlp.fc_in.bias",
    "mlp.fc_out.weight": "mlp.fc_out.weight",
    "mlp.fc_out.bias": "mlp.fc_out.bias",
}
_TOP_MAP = {
    "transformer.wte.weight": "wte.weight",
    "transformer.ln_f.weight": "ln_f.weight",
    "transformer.ln_f.bias": "ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}


def unshard_qkv(qkv: torch.Tensor, shards: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split CodeGen's fused qkv_proj weight [3E, E], laid out for `shards` model-parallel shards (4: CodeGen1,
    8: CodeGen2; config.qkv_shards), each [query | value | key], into plain q, k, v weights, each [E, E]."""
    three_e, e = qkv.shape
    parts = qkv.view(shards, 3, three_e // (3 * shards), e)  # [shard, (q|v|k), E/shards, E]
    q, v, k = (parts[:, i].reshape(e, e) for i in range(3))
    return q, k, v


def shard_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: int = 4) -> torch.Tensor:
    """Inverse of unshard_qkv: plain q, k, v [E, E] -> CodeGen's fused [3E, E] laid out for `shards` shards."""
    e = q.shape[0]
    parts = [w.view(shards, e // shards, e) for w in (q, v, k)]  # each [shard, E/shards, E]
    return torch.stack(parts, dim=1).reshape(3 * e, e)  # [3E, E]


def map_key(hf_key: str) -> str | None:
    """Our parameter name for a checkpoint key (None for a known non-weight buffer); raise on unknown keys."""
    if hf_key in _TOP_MAP:
        return _TOP_MAP[hf_key]
    if _KNOWN_BUFFERS.match(hf_key):
        return None
    m = _LAYER_KEY.match(hf_key)
    if m and m.group(2) == "attn.qkv_proj.weight":
        return f"blocks.{m.group(1)}.attn.qkv_proj.weight"  # split in convert_tensor
    if m and m.group(2) in _LAYER_MAP:
        return f"blocks.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise CheckpointError(f"unknown tensor {hf_key!r} in the checkpoint: is this a CodeGen model?")


def convert_tensor(hf_key: str, tensor: torch.Tensor, dtype: torch.dtype, shards: int = 4) -> dict[str, torch.Tensor]:
    """One checkpoint tensor -> our parameters (one, or three for qkv, un-sharded from `shards` shards), cast
    to dtype."""
    name = map_key(hf_key)
    if name is None:
        return {}
    if name.endswith("qkv_proj.weight"):
        prefix = name.removesuffix("qkv_proj.weight")
        q, k, v = unshard_qkv(tensor, shards)
        return {
            prefix + "q_proj.weight": q.to(dtype),
            prefix + "k_proj.weight": k.to(dtype),
            prefix + "v_proj.weight": v.to(dtype),
        }
    return {name: tensor.to(dtype)}


def to_hf_state_dict(model: CodeGen) -> dict[str, torch.Tensor]:
    """Our model's weights in the Hugging Face CodeGen layout (fused qkv_proj, sharded as its config says)."""
    sd = model.state_dict()
    out = {hf: sd[ours].contiguous() for hf, ours in _TOP_MAP.items()}
    for i in range(model.config.n_layer):
        for hf, ours in _LAYER_MAP.items():
            out[f"transformer.h.{i}.{hf}"] = sd[f"blocks.{i}.{ours}"].contiguous()
        a = f"blocks.{i}.attn."
        out[f"transformer.h.{i}.attn.qkv_proj.weight"] = shard_qkv(
            sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], model.config.qkv_shards
        )
    return out


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder in load order: the first layout of CHECKPOINT_LAYOUTS present
    (safetensors preferred), sharded or not."""
    for single, index, _ in CHECKPOINT_LAYOUTS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{folder / index} is not a valid shard index ({e}): re-download it") from e
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"shard {missing[0]} listed in {index} is missing from {folder}")
            return files
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded index")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one weight file, one tensor at a time where the format allows."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, f.get_tensor(key)
        else:
            try:
                # mmap keeps the file's pages out of anonymous memory: only the cast copy is resident.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a state dict: is it a model checkpoint?")
            for key in list(state):
                yield key, state.pop(key)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch raise many types for corrupted or truncated files
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            # torch.load(weights_only=True) met objects other than tensors and plain containers, and ran nothing.
            raise CheckpointError(
                f"{path} holds objects that safe loading (torch.load with weights_only) refuses, so it was not "
                "loaded: it may be unsafe; use a safetensors checkpoint, or one from a source you trust"
            ) from e
        raise CheckpointError(
            f"cannot read {path} ({_first_line(e)}): the file is corrupted or truncated, re-download it"
        ) from e


def _first_line(error: BaseException) -> str:
    """ "Type: the first line of its message" (at most 200 characters)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def load_checkpoint(path_or_id: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None) -> CodeGen:
    """Load a CodeGen checkpoint (folder or hub id) into our model, straight into `dtype`."""
    folder = resolve_model(path_or_id, revision=revision)
    config = ModelConfig.from_file(folder)
    check_fits_in_memory(
        config.memory_bytes(dtype.itemsize),
        f"the model in {folder} ({config.num_parameters() / 1e6:,.1f}M parameters in {dtype_name(dtype)})",
        "check the sizes in its config.json (n_layer, n_embd, n_inner, vocab_size), or use a machine with more memory",
    )
    with torch.device("meta"):
        model = CodeGen(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for path in weight_files(folder):
        for hf_key, tensor in iter_tensors(path):
            converted = convert_tensor(hf_key, tensor, dtype, config.qkv_shards)
            for name, value in converted.items():
                if name not in expected:
                    raise CheckpointError(
                        f"tensor {hf_key} in {path.name} is beyond the {config.n_layer} layers of config.json: "
                        "the weights and config.json do not match"
                    )
                if value.shape != expected[name]:
                    raise CheckpointError(
                        f"tensor {hf_key} in {path.name} has shape {tuple(tensor.shape)}, but config.json "
                        f"implies {tuple(expected[name])}: the weights and config.json do not match"
                    )
            model.load_state_dict(converted, strict=False, assign=True)
            loaded.update(converted)
            del tensor, converted
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"the checkpoint in {folder} lacks {len(missing)} tensors, first {missing[0]!r}")
    model.reset_rotary()
    return model.eval()


def save_checkpoint(
    model: CodeGen, folder: str | Path, layout: str = "safetensors", max_shard_bytes: int | None = None
) -> None:
    """Write model weights and config.json in a Hugging Face layout.

    layout: "safetensors" or "bin"; max_shard_bytes splits the weights into shards with an index file,
    as transformers' save_pretrained does.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2) + "\n")
    state = to_hf_state_dict(model)
    if layout not in ("safetensors", "bin"):
        raise ValueError(f"unknown layout {layout!r}")
    single = "model.safetensors" if layout == "safetensors" else "pytorch_model.bin"
    shards = _split(state, max_shard_bytes)
    names = (
        [single]
        if len(shards) == 1
        else [single.replace(".", f"-{i + 1:05d}-of-{len(shards):05d}.", 1) for i in range(len(shards))]
    )
    for shard, name in zip(shards, names, strict=True):
        if layout == "safetensors":
            from safetensors.torch import save_file

            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
    if len(shards) > 1:
        weight_map = {key: name for shard, name in zip(shards, names, strict=True) for key in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{single}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _split(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_bytes is None:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards
