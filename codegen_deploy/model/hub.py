"""Resolve a model given as a local folder, a hub id or a published size to a local snapshot folder."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import hub_id
from ..errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Weight layouts in order of preference, each (single file, shard index, shard suffix): safetensors first
# (no pickle, read one tensor at a time), then PyTorch's .bin.
WEIGHT_FORMATS = (
    ("model.safetensors", "model.safetensors.index.json", ".safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", ".bin"),
)


def choose_weight_files(files: list[str]) -> list[str]:
    """The weight files worth downloading from a repo's file list: safetensors if any, else PyTorch .bin."""
    for single, index, suffix in WEIGHT_FORMATS:
        if single in files:
            return [single]
        if index in files:
            return [index] + [f for f in files if f.endswith(suffix) and "/" not in f]
    return []


def resolve_model(
    model: str | Path | None = None, *, size: str | None = None, data: str = "mono", revision: str | None = None
) -> Path:
    """Return a local folder holding config.json, weights and tokenizer files.

    `model` is a local folder or a hub id ("Salesforce/codegen-350M-mono"); `size`/`data` name a
    published model instead. Hub downloads fetch only config, tokenizer and one weight format
    (safetensors preferred) and show huggingface_hub's progress bars.
    """
    if (model is None) == (size is None):
        raise CheckpointError("give either a model (folder or hub id) or a size (350M, 2B, 6B, 16B), not both")
    if size is not None:
        model = hub_id(size, data)
    local = Path(model)
    if local.is_dir():
        return local
    text = str(model)
    if local.exists() or not _HUB_ID.match(text):
        raise CheckpointError(
            f"{text} is neither a checkpoint folder nor a hub id like Salesforce/codegen-350M-mono: check the path"
        )
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    print(f"downloading {repo_id} from the Hugging Face hub ...", flush=True)
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        weights = choose_weight_files(files)
        if not weights:
            raise CheckpointError(f"{repo_id} has no model.safetensors or pytorch_model.bin: is it a model repo?")
        wanted = ["config.json", *TOKENIZER_FILES, *weights]
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=[f for f in wanted if f in files]
        )
    except CheckpointError:
        raise
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id} is not on the hub (or is private): check the id, or log in with `hf auth login`"
        ) from e
    except Exception as e:  # network failures surface as many types (httpx, requests, OSError)
        raise CheckpointError(
            f"could not download {repo_id} ({type(e).__name__}): check the network, "
            "or download the checkpoint elsewhere and pass its folder"
        ) from e
    return Path(path)
