"""manifest.json of an export folder: what is in it, how it was made, and checksums of every file.

The runtime reads names, dtypes and the model config from here so it never guesses, and refuses a
folder whose files are missing or truncated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import ArtifactError
from .io_spec import MANIFEST_FILE

FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict]:
    """{relative name: {"bytes", "sha256"}} for every file under `folder` except `exclude`."""
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) not in exclude
    }


def write_manifest(folder: Path, body: dict, name: str = MANIFEST_FILE) -> dict:
    """Write `body` plus format version and checksums of the folder's files as `name`; return it."""
    manifest = {"format_version": FORMAT_VERSION, **body, "files": file_entries(folder, exclude=(name,))}
    (folder / name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path, name: str = MANIFEST_FILE, verify: str = "size") -> dict:
    """Read and check an export's manifest. verify: "none", "size" (fast, catches truncation) or "sha256"."""
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {name}: it is not a finished export (run codegen-export again)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}): export again") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {manifest.get('format_version')}, this tool reads {FORMAT_VERSION}: "
            "export again with this version"
        )
    if verify != "none":
        for rel, entry in manifest.get("files", {}).items():
            f = folder / rel
            if not f.is_file():
                raise ArtifactError(f"{f} is missing from the export: copy the whole folder or export again")
            if f.stat().st_size != entry["bytes"]:
                raise ArtifactError(
                    f"{f} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                    "the file is truncated or changed, copy it again or export again"
                )
            if verify == "sha256" and sha256_file(f) != entry["sha256"]:
                raise ArtifactError(f"{f} does not match its sha256 in the manifest: the file is corrupted")
    return manifest


def manifest_config(manifest: dict) -> ModelConfig:
    """The ModelConfig recorded in a manifest."""
    return ModelConfig(**manifest["model_config"])
