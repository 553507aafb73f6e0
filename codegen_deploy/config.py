"""Model configuration read from a Hugging Face config.json, and the registry of published CodeGen models."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

SIZES = ("350M", "2B", "6B", "16B")
EXPORTS_FOLDER = "exports"  # where codegen-export writes by default: exports/codegen-350M-mono
DATASETS = ("nl", "multi", "mono")
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu", "relu")
# The largest sizes a config may give: far above any CodeGen (16B: 34 layers, 6144 wide, 24576 inner, 2048
# positions, 51200 tokens), low enough that a mistyped or crafted number is refused before anything is allocated.
LIMITS = {
    "n_layer": 1024,
    "n_embd": 65536,
    "n_head": 1024,
    "rotary_dim": 65536,
    "n_positions": 262144,
    "n_inner": 262144,
    "vocab_size": 1048576,
}


def max_threads() -> int:
    """The most intra-op threads a session takes: the logical cores this process may run on. More threads than
    cores only wait for each other, and a mistyped number (100000) would start tens of thousands of threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> int | None:
    """`threads` if it is unset or between 1 and max_threads(), else a ConfigError that says the range."""
    if threads is None:
        return None
    high = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= high:
        raise ConfigError(
            f"threads must be a whole number from 1 to {high} (the cores this machine has), not {threads!r}"
        )
    return int(threads)


def hub_id(size: str, data: str = "mono") -> str:
    """Hub id of a published Salesforce CodeGen model, e.g. hub_id("6B", "mono") -> "Salesforce/codegen-6B-mono"."""
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if data not in DATASETS:
        raise ConfigError(f"unknown data {data!r}: choose one of {', '.join(DATASETS)}")
    return f"Salesforce/codegen-{size}-{data}"


QKV_SHARDS = (4, 8)


def qkv_shards_of(hf: dict) -> int:
    """The shard count of a config.json's fused qkv_proj layout: the one rule, CTranslate2's. CodeGen2 models
    (codegen2-1B, 3_7B, 7B, 16B and forks) split it for 8 model-parallel shards and their configs carry a
    head_dim of 128 or 256; CodeGen1 configs have no head_dim key (its 6B and 16B have 256-wide heads but no
    key) and 4 shards."""
    return 8 if hf.get("head_dim") in (128, 256) else 4


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a CodeGen model: everything the reference, the exporters and the runtimes need."""

    n_layer: int
    n_embd: int
    n_head: int
    rotary_dim: int
    n_positions: int
    n_inner: int
    vocab_size: int
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    qkv_shards: int = 4  # model-parallel shards of the fused qkv_proj's layout (qkv_shards_of)

    def __post_init__(self) -> None:
        for name, high in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} is {value!r}, not a whole number: the config is damaged")
            if not 1 <= value <= high:
                raise ConfigError(f"{name} {value} is out of range (1 to {high}): the config is damaged")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ConfigError(f"{name} is {value!r}, not a token id (a whole number >= 0): the config is damaged")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and 0 < eps < 1):
            raise ConfigError(f"layer_norm_epsilon is {eps!r}, not a number between 0 and 1: the config is damaged")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.qkv_shards not in QKV_SHARDS:
            raise ConfigError(f"qkv_shards is {self.qkv_shards!r}, not one of {QKV_SHARDS}: the config is damaged")
        if self.qkv_shards == 8 and self.head_dim not in (128, 256):
            raise ConfigError(
                f"an 8-shard qkv layout is CodeGen2's, whose heads are 128 or 256 wide, not {self.head_dim}: "
                "the config is damaged"
            )
        if self.n_embd % self.qkv_shards:
            # CodeGen's fused qkv_proj is laid out for model-parallel shards of n_embd / qkv_shards rows each.
            raise ConfigError(
                f"n_embd {self.n_embd} is not divisible by {self.qkv_shards} (CodeGen's qkv shard layout)"
            )
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and between 2 and head_dim {self.head_dim}")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"activation {self.activation!r} is not supported: use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf_config(cls, hf: dict) -> ModelConfig:
        """Build from the dict of a Hugging Face CodeGen config.json; refuse other model types."""
        model_type = hf.get("model_type")
        if model_type != "codegen":
            raise ConfigError(
                f"model_type is {model_type!r}, not 'codegen': this toolkit handles CodeGen checkpoints only"
            )
        n_embd, n_head = _whole(hf, "n_embd"), _whole(hf, "n_head")
        head_dim = _whole(hf, "head_dim", None)
        if head_dim is not None and n_head > 0 and head_dim * n_head != n_embd:
            # CodeGen's heads are n_embd / n_head wide; head_dim only tells CodeGen2's 8-shard qkv layout apart
            # (qkv_shards_of), so a disagreeing one would silently pick a layout for a shape it does not describe.
            raise ConfigError(
                f"config.json's head_dim {head_dim} disagrees with n_embd / n_head = {n_embd} / {n_head} = "
                f"{n_embd / n_head:g}: the config is damaged (fix head_dim or n_head, or use the model's own)"
            )
        rotary_dim = hf.get("rotary_dim") or (n_embd // n_head if n_head > 0 else 0)  # 0: refused as n_head's
        return cls(
            n_layer=_whole(hf, "n_layer"),
            n_embd=n_embd,
            n_head=n_head,
            rotary_dim=_whole({"rotary_dim": rotary_dim}, "rotary_dim"),
            n_positions=_whole(hf, "n_positions", 2048),
            n_inner=_whole(hf, "n_inner", 4 * n_embd),
            vocab_size=_whole(hf, "vocab_size"),
            layer_norm_epsilon=_number(hf, "layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            bos_token_id=_whole(hf, "bos_token_id", 50256),
            eos_token_id=_whole(hf, "eos_token_id", 50256),
            qkv_shards=qkv_shards_of(hf),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a config.json file, or the config.json inside a folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: point to a CodeGen checkpoint folder or hub id")
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not readable JSON ({e}): re-download the checkpoint") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} does not hold a JSON object: re-download the checkpoint")
        return cls.from_hf_config(hf)

    def to_hf_config(self) -> dict:
        """The Hugging Face config.json dict for this shape (what transformers' CodeGenConfig reads)."""
        return {
            "model_type": "codegen",
            "architectures": ["CodeGenForCausalLM"],
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "rotary_dim": self.rotary_dim,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_inner": self.n_inner,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            # CodeGen2's configs carry head_dim, which is how their 8-shard qkv layout is recognised.
            **({"head_dim": self.head_dim} if self.qkv_shards == 8 else {}),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        """Parameter count, from the shapes alone."""
        e, i, v = self.n_embd, self.n_inner, self.vocab_size
        block = 2 * e + 3 * e * e + e * e + (e * i + i) + (i * e + e)
        return v * e + self.n_layer * block + 2 * e + (e * v + v)

    def memory_bytes(self, itemsize: int) -> int:
        """Bytes the model takes in memory with `itemsize`-byte weights: its weights and the float32 rotary
        tables (sin and cos, n_positions x rotary_dim / 2 each)."""
        return self.num_parameters() * itemsize + self.n_positions * self.rotary_dim * 4


_REQUIRED = object()


def _whole(hf: dict, key: str, default=_REQUIRED) -> int:
    """config.json's `key` as an int (a JSON number without a fraction; null or absent: `default`), else one
    ConfigError."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"config.json lacks the field {key!r} that a CodeGen config must have")
        return default
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(f"config.json's {key} is {value!r}, not a whole number: the config is damaged")
    return int(value)


def _number(hf: dict, key: str, default: float) -> float:
    """config.json's `key` as a float (null or absent: `default`), else one ConfigError."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json's {key} is {value!r}, not a number: the config is damaged")
    return float(value)


# The published shapes (from the released checkpoints' config.json). Used for random checkpoints and estimates only:
# a real model's shape is always read from its config.json.
PUBLISHED_SHAPES = {
    "350M": ModelConfig(
        n_layer=20, n_embd=1024, n_head=16, rotary_dim=32, n_positions=2048, n_inner=4096, vocab_size=51200
    ),
    "2B": ModelConfig(
        n_layer=32, n_embd=2560, n_head=32, rotary_dim=64, n_positions=2048, n_inner=10240, vocab_size=51200
    ),
    "6B": ModelConfig(
        n_layer=33, n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048, n_inner=16384, vocab_size=51200
    ),
    "16B": ModelConfig(
        n_layer=34, n_embd=6144, n_head=24, rotary_dim=64, n_positions=2048, n_inner=24576, vocab_size=51200
    ),
}
