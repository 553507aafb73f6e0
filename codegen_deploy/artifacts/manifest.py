"""manifest.json of an export folder: what is in it, how it was made, and checksums of every file.

The runtime reads names, dtypes and the model config from here so it never guesses, and refuses a
folder whose files are missing or truncated.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..atomic import write_text_atomic
from ..config import ModelConfig
from ..errors import ArtifactError, CodegenDeployError
from . import io_spec
from .io_spec import MANIFEST_FILE

FORMAT_VERSION = 1

# The values an export's entries take; the commands offer exactly these.
METHODS = ("built", "trace")  # "method": the plain graph written from the weights, or traced by torch.onnx
FUSED_WEIGHTS = ("float", "int8", "int4")  # "fused_weights": the model dtype, or quantized (export/quantize.py)
ROTARY_VARIANTS = ("gqa", "graph")  # "fused_rotary": inside GroupQueryAttention, or plain ops before it
CACHE_DTYPES = ("float32", "float16", "int8")  # the fused graph's KV cache (its inputs' dtype; export/fused.py)
# The entries that describe a fused graph (replaced together when one is added to an export).
FUSED_KEYS = (
    "fused_graph_file",
    "fused_data_file",
    "fused_weights",
    "fused_dtype",
    "fused_rotary",
    "fused_inputs",
    "fused_outputs",
    "fused_shared_data_file",
    "fused_validation",
    "fused_skipped",
)
# Manifest entries that name a file of the export (besides "files"); a runtime opens each by name.
FILE_KEYS = ("graph_file", "data_file", "fused_graph_file", "fused_data_file", "fused_shared_data_file")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks (memory stays flat for multi-GB weights)."""
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


def write_manifest(folder: Path, body: dict, name: str = MANIFEST_FILE, files: list[str] | None = None) -> dict:
    """The one way a manifest is written: `body` plus the format version and the sizes and sha256 of the
    folder's files (all but the manifest, or only `files`), written as `name` under a temporary name and
    renamed, so a reader never sees half a manifest. Returns what was written."""
    folder = Path(folder)
    if files is None:
        entries = file_entries(folder, exclude=(name,))
    else:
        entries = {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in files}
    manifest = {"format_version": FORMAT_VERSION, **body, "files": entries}
    write_text_atomic(folder / name, json.dumps(manifest, indent=2) + "\n")
    return manifest


def update_manifest(folder: Path, changes: dict, drop: tuple[str, ...] = ()) -> dict:
    """Rewrite an export's manifest with `changes` applied and the `drop` entries removed, checksums taken
    again (for a file added to a finished export); returns it."""
    manifest = read_manifest(folder, verify="none")
    body = {k: v for k, v in manifest.items() if k not in ("format_version", "files", *drop)}
    return write_manifest(folder, {**body, **changes})


def lossy_kind(weights: str, cache_dtype: str) -> str:
    """The tolerance a fused graph is checked with (verify/tolerance.py): its weights' format where quantized,
    "int8" for float weights over an int8 cache (rounded keys and values, as int8 weights round), else "float"."""
    if weights != "float":
        return weights
    return "int8" if cache_dtype == "int8" else "float"


@dataclass(frozen=True)
class FusedGraph:
    """The fused graph an export's manifest records: its file, the dtype of its activations, its weights
    ("float" or quantized), where it applies the rotary and its KV cache's dtype. Exports written before an
    entry existed read as its default. The cache's dtype is the one its recorded inputs declare."""

    graph_file: str
    dtype: str = "float32"
    weights: str = "float"
    rotary: str = "gqa"
    cache_dtype: str = "float32"

    @property
    def lossy(self) -> str:
        """What its outputs are checked as (lossy_kind): its quantized weights, an int8 cache, or "float"."""
        return lossy_kind(self.weights, self.cache_dtype)

    @property
    def check_dtype(self) -> str:
        """The dtype whose tolerance its outputs are checked with: float16 where the weights or the cache are."""
        return "float16" if "float16" in (self.dtype, self.cache_dtype) else self.dtype

    @classmethod
    def of(cls, manifest: dict) -> FusedGraph | None:
        """The fused graph of `manifest`, or None when the export has none."""
        name = manifest.get("fused_graph_file")
        if not isinstance(name, str):
            if io_spec.FUSED_GRAPH_FILE not in manifest.get("files", {}):
                return None
            name = io_spec.FUSED_GRAPH_FILE
        dtype = manifest.get("fused_dtype", "float32")
        return cls(
            name,
            dtype,
            manifest.get("fused_weights", "float"),
            manifest.get("fused_rotary", "gqa"),
            io_spec.cache_dtype(manifest["fused_inputs"], name) if "fused_inputs" in manifest else dtype,
        )


def export_dtype(manifest: dict) -> str:
    """The dtype of an export's weights (the plain graph's; a TensorRT engine's export's)."""
    return manifest.get("dtype") or "float32"


def fused_entries(config: ModelConfig, dtype: str, weights: str, rotary: str, cache_dtype: str) -> dict:
    """The manifest entries that describe a fused graph of a model in `dtype` ("float32" / "float16") whose KV
    cache is `cache_dtype` (export/fused.py: cache_dtype_for)."""
    spec_args = (config.n_layer, config.n_head, config.head_dim)
    return {
        "fused_graph_file": io_spec.FUSED_GRAPH_FILE,
        "fused_data_file": io_spec.FUSED_DATA_FILE,
        "fused_weights": weights,
        "fused_dtype": dtype,
        "fused_rotary": rotary,
        "fused_inputs": [s.to_dict() for s in io_spec.fused_decoder_inputs(*spec_args, cache_dtype)],
        "fused_outputs": [
            s.to_dict() for s in io_spec.fused_decoder_outputs(*spec_args, config.vocab_size, cache_dtype)
        ],
    }


VERIFY_MODES = ("none", "size", "sha256")


def read_manifest(folder: str | Path, name: str = MANIFEST_FILE, verify: str = "size") -> dict:
    """Read and check an export's manifest. verify: "none", "size" (fast, catches truncation) or "sha256"
    (every byte). A manifest with missing or inconsistent entries, or a file that does not match it,
    raises one ArtifactError."""
    if verify not in VERIFY_MODES:
        raise ArtifactError(f"unknown verify mode {verify!r}: choose one of {', '.join(VERIFY_MODES)}")
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {name}: it is not a finished export (run codegen-export again)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path} is not readable JSON ({e}): export again") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"{path} has format version {version}, this tool reads {FORMAT_VERSION}: export again with this version"
        )
    check_manifest(manifest, path)
    if verify != "none":
        check_listed(folder, manifest, name)
    verify_files(folder, manifest, verify)
    return manifest


def check_manifest(manifest: dict, path: Path | str = MANIFEST_FILE) -> None:
    """Refuse a manifest that lacks what the runtimes read, or whose model config disagrees with its graph
    inputs (an edited n_layer would otherwise fail later as a binding error)."""
    for key, kind in (("model_config", dict), ("files", dict), ("inputs", list)):
        if key == "inputs" and key not in manifest:
            continue  # a runtime that reads inputs asks for them (require_entries)
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{path} has no valid {key!r} entry: the manifest is damaged, export again")
    for rel, entry in manifest["files"].items():
        check_file_name(rel, path)
        if not (
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise ArtifactError(f"{path}: the entry of {rel} lacks bytes or sha256: the manifest is damaged")
    for key in FILE_KEYS:
        if manifest.get(key) is not None:
            check_file_name(manifest[key], path, key)
    config = manifest_config(manifest, path)
    for inputs, outputs, fused in (("inputs", "outputs", False), ("fused_inputs", "fused_outputs", True)):
        if manifest.get(inputs) is None:
            continue
        try:
            names_in = [e["name"] for e in manifest[inputs]]
            names_out = [e["name"] for e in manifest.get(outputs) or []]
        except (TypeError, KeyError) as e:
            raise ArtifactError(f"{path}: {inputs!r} is not a list of named tensors: the manifest is damaged") from e
        fix = "the manifest or the graph was changed, export again"
        io_spec.check_decoder_io(names_in, names_out, config.n_layer, f"{path} ({inputs})", fix=fix, fused=fused)


def require_entries(manifest: dict, keys, path: Path | str = MANIFEST_FILE) -> None:
    """Refuse a manifest without the entries a reader needs."""
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} has no {', '.join(missing)} entry: the manifest is damaged, export again")


def check_file_name(rel, path: Path | str = MANIFEST_FILE, key: str = "files") -> None:
    """Refuse a file name that is not a plain relative name inside the export folder (absolute, with '..', '.'
    or empty parts, a backslash or a drive): checked before any file is touched, so a crafted manifest cannot
    make a command read, hash or report on a file elsewhere."""
    plain = (
        isinstance(rel, str)
        and rel
        and "\\" not in rel
        and "\0" not in rel
        and not PurePosixPath(rel).is_absolute()
        and not PureWindowsPath(rel).drive
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )
    if not plain:
        entry = "a file entry" if key == "files" else f"its {key} entry"
        raise ArtifactError(
            f"{path}: {entry} names {rel!r}, not a plain file name inside the export folder (absolute, or with "
            "'..'): the manifest is damaged or made to read other files, export again"
        )


def required_files(folder: Path, manifest: dict, name: str = MANIFEST_FILE) -> dict[str, str]:
    """{file name: what reads it} for the files a runtime opens from this folder: those the manifest's entries
    name, and the weight files there of the graphs it describes (a graph reads its weight files by name, so
    each must be checked like the graph)."""
    if name == io_spec.ENGINE_MANIFEST_FILE:
        return {io_spec.ENGINE_FILE: "the TensorRT session"}
    needed = {}
    for key, default in (("graph_file", io_spec.GRAPH_FILE), ("data_file", io_spec.DATA_FILE)):
        if isinstance(manifest.get(key), str):
            needed[manifest[key]] = "the plain graph"
        if os.path.lexists(folder / default):
            needed.setdefault(default, "the plain graph")
    fused = FusedGraph.of(manifest)
    if fused is not None:
        needed.setdefault(fused.graph_file, "the fused graph")
        for key in ("fused_data_file", "fused_shared_data_file"):
            if isinstance(manifest.get(key), str):
                needed.setdefault(manifest[key], "the fused graph")
        if os.path.lexists(folder / io_spec.FUSED_DATA_FILE):
            needed.setdefault(io_spec.FUSED_DATA_FILE, "the fused graph")
    return needed


def check_listed(folder: Path, manifest: dict, name: str = MANIFEST_FILE) -> None:
    """Refuse a manifest that does not list a file a runtime reads (its check would be switched off)."""
    for rel, what in required_files(Path(folder), manifest, name).items():
        if rel not in manifest["files"]:
            raise ArtifactError(
                f"{Path(folder) / name} does not list {rel}, which {what} reads, so it cannot be checked: "
                "the manifest was edited or damaged, export again"
            )


def verify_files(folder: Path, manifest: dict, verify: str = "size") -> None:
    """Check every file the manifest lists: present and of its size ("size"), and of its sha256 ("sha256")."""
    if verify == "none":
        return
    folder = Path(folder)
    for rel in manifest["files"]:  # every name checked before any file is touched
        check_file_name(rel, folder / MANIFEST_FILE)
    root = folder.resolve()
    for rel, entry in manifest["files"].items():
        f = folder / rel
        try:
            real = f.resolve()
        except (OSError, RuntimeError) as e:  # a loop of symbolic links
            raise ArtifactError(f"cannot resolve {f} ({e}): copy the export folder again") from e
        if not real.is_relative_to(root):
            raise ArtifactError(
                f"{f} is a symbolic link to {real}, outside the export folder: a runtime reads only files inside it; "
                "copy the files themselves into it (cp -L, or hf download --local-dir), not links to them"
            )
        if not f.is_file():
            raise ArtifactError(f"{f} is missing from the export: copy the whole folder or export again")
        if f.stat().st_size != entry["bytes"]:
            raise ArtifactError(
                f"{f} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                "the file is truncated or changed, copy it again or export again"
            )
    if verify == "sha256":
        for rel, entry in manifest["files"].items():
            if sha256_file(folder / rel) != entry["sha256"]:
                raise ArtifactError(
                    f"{folder / rel} does not match its sha256 in the manifest: the file is corrupted or changed, "
                    "copy it again or export again"
                )


class BackgroundVerification:
    """verify_files(folder, manifest, "sha256") in a thread, so hashing overlaps a session's loading (hashlib
    and ONNX Runtime both release the GIL); `result()` waits and raises its ArtifactError, if any."""

    def __init__(self, folder: Path, manifest: dict):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(folder, manifest), daemon=True)
        self._thread.start()

    def _run(self, folder: Path, manifest: dict) -> None:
        try:
            verify_files(folder, manifest, "sha256")
        except BaseException as e:  # handed to the caller's thread by result()
            self._error = e

    def result(self) -> None:
        self._thread.join()
        if isinstance(self._error, OSError):
            raise ArtifactError(f"cannot read the export's files ({self._error}): check the folder") from self._error
        if self._error is not None:
            raise self._error


def manifest_config(manifest: dict, path: Path | str = MANIFEST_FILE) -> ModelConfig:
    """The ModelConfig recorded in a manifest."""
    try:
        return ModelConfig(**manifest["model_config"])
    except (KeyError, TypeError, CodegenDeployError) as e:
        raise ArtifactError(f"{path} has an invalid model_config ({e}): the manifest is damaged, export again") from e
