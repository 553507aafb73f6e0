"""Model configuration read from a Hugging Face config.json, and the registry of published CodeGen models."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

SIZES = ("350M", "2B", "6B", "16B")
DATASETS = ("nl", "multi", "mono")
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu", "relu")


def hub_id(size: str, data: str = "mono") -> str:
    """Hub id of a published Salesforce CodeGen model, e.g. hub_id("6B", "mono") -> "Salesforce/codegen-6B-mono"."""
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if data not in DATASETS:
        raise ConfigError(f"unknown data {data!r}: choose one of {', '.join(DATASETS)}")
    return f"Salesforce/codegen-{size}-{data}"


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

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_embd % 4:
            # CodeGen's fused qkv_proj is laid out for 4 model-parallel shards.
            raise ConfigError(f"n_embd {self.n_embd} is not divisible by 4 (CodeGen's qkv shard layout)")
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
        try:
            n_embd, n_head = int(hf["n_embd"]), int(hf["n_head"])
            rotary_dim = hf.get("rotary_dim") or n_embd // n_head
            return cls(
                n_layer=int(hf["n_layer"]),
                n_embd=n_embd,
                n_head=n_head,
                rotary_dim=int(rotary_dim),
                n_positions=int(hf.get("n_positions", 2048)),
                n_inner=int(hf.get("n_inner") or 4 * n_embd),
                vocab_size=int(hf["vocab_size"]),
                layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
                activation=hf.get("activation_function", "gelu_new"),
                bos_token_id=int(hf.get("bos_token_id", 50256)),
                eos_token_id=int(hf.get("eos_token_id", 50256)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r} that a CodeGen config must have") from e

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
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        """Parameter count, from the shapes alone."""
        e, i, v = self.n_embd, self.n_inner, self.vocab_size
        block = 2 * e + 3 * e * e + e * e + (e * i + i) + (i * e + e)
        return v * e + self.n_layer * block + 2 * e + (e * v + v)


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
