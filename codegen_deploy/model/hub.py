"""Resolve a model given as a local folder, a hub id or a published size to a local snapshot folder."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from ..config import EXPORTS_FOLDER, hub_id
from ..errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: one slash, starts with a letter or digit

# Weight layouts in order of preference, each (single file, shard index, shard suffix): safetensors first
# (no pickle, read one tensor at a time), then PyTorch's .bin.
CHECKPOINT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json", ".safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", ".bin"),
)


def choose_weight_files(files: list[str]) -> list[str]:
    """The weight files worth downloading from a repo's file list: safetensors if any, else PyTorch .bin."""
    for single, index, suffix in CHECKPOINT_LAYOUTS:
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
    if model is None and size is None:
        raise CheckpointError(
            "no model given: pass --model (a checkpoint folder or hub id) or --size (350M, 2B, 6B, 16B)"
        )
    if model is not None and size is not None:
        raise CheckpointError(f"give a model ({model}) or a size ({size}), not both: drop one of them")
    if size is not None:
        model = hub_id(size, data)
    local = Path(model)
    if local.is_dir():
        return local
    text = str(model)
    if local.exists():
        raise CheckpointError(
            f"{text} is neither a checkpoint folder nor a hub id like Salesforce/codegen-350M-mono: check the path"
        )
    check_model_path(text)
    return _download(text, revision)


def is_hub_id(text: str) -> bool:
    """Whether a model argument that is no local file or folder names a hub model rather than a local path.

    The rule: a hub id is owner/name, one slash between two names of letters, digits, '_', '.' and '-' (the
    owner starting with a letter or digit), whose owner is neither a local file or folder nor EXPORTS_FOLDER
    (where codegen-export writes). Anything else is a local path: more than one slash, a leading ./ ../ / or
    ~, a trailing slash, a single name ("codegen-350M"), or a first component that exists here
    ("exports/codegen-350M-mono" once anything was exported, "models/x" next to a models folder).
    """
    if not _HUB_ID.match(text):
        return False
    owner, name = text.split("/")
    return name not in (".", "..") and owner != EXPORTS_FOLDER and not os.path.lexists(owner)


def no_such_folder(path: str | Path, option: str | None = None) -> CheckpointError:
    """The one error for a local path that does not exist, in the same words for every command and option."""
    given = f" (given to {option})" if option else ""
    return CheckpointError(
        f"no such folder: {path}{given}: check the path (codegen-export makes export folders; a hub id is "
        "owner/name, e.g. Salesforce/codegen-350M-mono)"
    )


def check_model_path(model: str | Path | None, option: str | None = None) -> None:
    """Refuse, without touching the network or loading anything, a model argument that names a local path
    (is_hub_id's rule) that does not exist; an existing path, a hub id and None pass."""
    if model is None or os.path.exists(model) or is_hub_id(str(model)):
        return
    raise no_such_folder(model, option)


def local_sources(model: str | Path | None) -> list[Path]:
    """[model] when it names an existing local path (what an output must not replace), else []."""
    return [Path(model)] if model is not None and Path(model).exists() else []


def source_id(model: str | Path | None, *, size: str | None = None, data: str = "mono") -> str:
    """What a manifest records as its source: the absolute path of a local folder (so it means the same
    from any working folder), else the hub id."""
    if model is None:
        return hub_id(size, data)
    if Path(model).exists():
        return os.path.abspath(model)
    return str(model)


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but read now, not at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> str:
    """The Hugging Face cache folder, from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of `repo_id` if it holds config.json and a complete set of weights
    (every shard an index names); None otherwise. Never touches the network."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=_hub_cache(), local_files_only=True, allow_patterns=["config.json"]
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    folder = Path(path)
    files = [p.name for p in folder.iterdir() if p.is_file()]
    weights = choose_weight_files(files)
    if "config.json" not in files or not weights:
        return None
    if weights[0].endswith(".index.json"):
        try:
            shards = set(json.loads((folder / weights[0]).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not all((folder / shard).is_file() for shard in shards):
            return None
    return folder


def _download(repo_id: str, revision: str | None) -> Path:
    """A hub model's local folder: the cached snapshot when it is complete (no network, works offline),
    else a download of config, tokenizer and one weight format."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    cached = cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    if _offline():
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache ({_hub_cache()}) and HF_HUB_OFFLINE is set: "
            "download it once with network access, or pass a checkpoint folder"
        )
    print(f"downloading {repo_id} from the Hugging Face hub ...", file=sys.stderr, flush=True)
    try:
        # One request for the file list, which fails at once without a network: list_repo_files retries five
        # times over ~25 s, logging each retry.
        info = huggingface_hub.model_info(repo_id, revision=revision)  # network
        files = [sibling.rfilename for sibling in info.siblings or []]
        weights = choose_weight_files(files)
        if not weights:
            raise CheckpointError(f"{repo_id} has no model.safetensors or pytorch_model.bin: is it a model repo?")
        wanted = ["config.json", *TOKENIZER_FILES, *weights]
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=_hub_cache(), allow_patterns=[f for f in wanted if f in files]
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
