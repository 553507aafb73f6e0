"""export_model: checkpoint -> verified export folder (decoder.onnx [+ .data], decoder_fused.onnx + .data,
config.json, tokenizer files, genai_config.json, manifest.json).

resolve -> load -> build (the plain graph: built from the weights, or traced; the fused graph) ->
verify (each graph against the reference) -> write. Everything is written into a hidden temporary
sibling of the output and renamed at the end, so an error or an interrupt never leaves a folder that
looks like a finished export.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxscript
import torch

from . import __version__
from .artifacts import io_spec
from .artifacts.manifest import (
    FUSED_KEYS,
    FUSED_WEIGHTS,
    METHODS,
    ROTARY_VARIANTS,
    FusedGraph,
    export_dtype,
    fused_entries,
    lossy_kind,
    read_manifest,
    update_manifest,
    write_manifest,
)
from .atomic import check_output, staging_folder
from .config import EXPORTS_FOLDER, ModelConfig
from .dtypes import SUFFIX, check_dtype, dtype_name, torch_dtype
from .errors import ExportError
from .export.fused import cache_dtype_for, cache_support, fused_support, shared_data_file, write_fused_graph
from .export.genai import write_genai_files, write_tokenizer_config
from .export.graph import (
    EXTERNAL_DATA_THRESHOLD,
    OPSET,
    graph_summary,
    inline_external_data,
    inline_records,
    relocate_external_data,
)
from .export.plain import write_plain_graph
from .export.trace import MIN_OPSET as TRACE_MIN_OPSET
from .export.trace import TRACE_BATCH, TRACE_PAST, TRACE_SEQ, write_traced_graph
from .memory import memory_line
from .model.hub import TOKENIZER_FILES, local_sources, resolve_model, source_id
from .model.tokenizer import load_tokenizer
from .model.train import stdlib_files
from .model.weights import load_checkpoint
from .runtime.backends.onnxruntime import BFLOAT16_RUNS
from .runtime.ort import cuda_provider_available
from .verify.fused import check_fused, record_reference
from .verify.validate import cuda_bfloat16_missing, validate_export

FUSED_ROTARY = ("auto", *ROTARY_VARIANTS)  # where the fused graph applies the rotary (see fused_rotary_for)


def default_output(
    model: str | Path | None = None, *, size: str | None = None, data: str = "mono", dtype: str = "float32"
) -> Path:
    """exports/codegen-350M-mono-fp16 for a published size; exports/<folder or repo name>[-fp16] otherwise."""
    name = f"codegen-{size}-{data}" if size else Path(str(model).rstrip("/")).name
    return Path(EXPORTS_FOLDER) / f"{name}{SUFFIX[dtype]}"


log = logging.getLogger(__name__)


def log_progress(line: str) -> None:
    """Where a library caller's progress lines go when it gives no progress callback: this module's logger
    (warnings at WARNING, the rest at INFO), never stdout, which belongs to the caller."""
    log.log(logging.WARNING if line.startswith("warning:") else logging.INFO, line)


class _Stages:
    """Times each stage and prints one progress line per stage."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def done(self, name: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._start, 2)
        self._start = now
        self.progress(f"{name:<9} {self.seconds[name]:6.1f} s  {memory_line()}  {detail}".rstrip())


def versions() -> dict[str, str | None]:
    """Versions of the tools that made an export."""
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "codegen_deploy": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": ort_version,
        "python": sys.version.split()[0],
    }


def export_model(
    model: str | Path | None = None,
    output: str | Path | None = None,
    *,
    size: str | None = None,
    data: str = "mono",
    dtype: str = "float32",
    method: str = "built",
    opset: int | None = None,
    validate: bool = True,
    force: bool = False,
    external_data: bool | None = None,
    fused: bool = True,
    fused_weights: str = "float",
    fused_rotary: str = "auto",
    fused_cache: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export a CodeGen checkpoint to a verified ONNX export folder; return the folder.

    model: a checkpoint folder or hub id (or give `size` ("350M", "2B", "6B", "16B") and `data`
    ("mono", "multi", "nl") for a published model). output: the folder to create (default
    exports/codegen-<size>-<data>[-fp16]). dtype: "float32", "float16" or "bfloat16" weights and cache
    (logits are always float32). method: "built" (the plain graph written from the weights) or "trace"
    (torch.onnx.export(dynamo=True) of the reference). opset: ONNX opset (default: 17 built, the
    exporter's traced). validate: compare ONNX Runtime with the reference (raises ValidationError over
    tolerance). force: replace an existing output. external_data: None = only above 2 GB, True =
    always (one decoder.onnx.data file). fused: also write the fused ONNX Runtime graph
    (GroupQueryAttention, in-place KV cache), checked against the reference; skipped with a note for
    shapes GQA cannot run. fused_weights: "float", or "int8" / "int4" quantized
    weights in the fused graph. fused_rotary: where the fused graph applies the rotary: "gqa" (inside
    GroupQueryAttention), "graph" (plain ops before it, which ONNX Runtime's CUDA provider needs) or "auto"
    (see fused_rotary_for); either is checked on the CPU provider. fused_cache: the fused graph's KV cache
    dtype, "float32", "float16", "int8" or "auto" (float16 under quantized weights; see cache_dtype_for). A bfloat16
    export is validated on the CUDA provider, so it needs a CUDA GPU with bfloat16 support (or
    validate=False). progress: called with each stage's line and each check's table (default: log_progress;
    codegen-export prints them).
    """
    progress = progress or log_progress
    check_dtype(dtype)
    options = _Options(
        method,
        opset,
        validate,
        external_data,
        fused,
        fused_weights,
        fused_rotary_for(fused_rotary, dtype),
        cache_dtype_for(fused_cache, dtype, fused_weights),
    )
    _check_options(options, dtype)
    output = Path(output) if output is not None else default_output(model, size=size, data=data, dtype=dtype)
    check_output(output, force, protect=local_sources(model))
    stages = _Stages(progress)
    folder, config, tokenizer = _resolve(model, size, data, stages)
    with staging_folder(output, replace=force, protect=[folder]) as tmp:
        reference = _load(folder, config, dtype, stages)
        calibration = kv_calibration(tokenizer, config) if options.fused_cache == "int8" else None
        graphs = _build(reference, tmp, options, stages, progress, calibration)
        checks = _verify(reference, graphs, stages, progress) if validate else {}
        del reference  # validation freed its weights; without validation this is the last reference
        source = source_id(model, size=size, data=data)
        entries = {"source": source, "dtype": dtype, "method": method, "validation": None, **checks}
        _write(tmp, folder, config, tokenizer, graphs, entries, stages, progress)
    if dtype == "bfloat16":  # it runs on fewer machines than the other dtypes: say where
        progress(f"note: {output} is a bfloat16 export: {BFLOAT16_RUNS}")
    return output


@dataclass(frozen=True)
class _Options:
    """How export_model builds and checks the graphs (see its docstring)."""

    method: str
    opset: int | None
    validate: bool
    external_data: bool | None
    fused: bool
    fused_weights: str
    fused_rotary: str  # "gqa" or "graph", resolved from "auto"
    fused_cache: str  # "float32", "float16" or "int8", resolved from "auto"


def fused_rotary_for(choice: str, dtype: str) -> str:
    """The fused graph's rotary variant for `choice` ("auto", "gqa" or "graph") and the export's dtype.

    "auto": "graph" when this onnxruntime offers the CUDA provider and the dtype is one GroupQueryAttention's
    CUDA kernel takes (float16, bfloat16), since the CUDA session refuses a graph with the rotary inside GQA;
    "gqa" otherwise.
    """
    if choice not in FUSED_ROTARY:
        raise ExportError(f"unknown fused rotary {choice!r}: choose one of {', '.join(FUSED_ROTARY)}")
    if choice != "auto":
        return choice
    return "graph" if dtype in ("float16", "bfloat16") and cuda_provider_available() else "gqa"


@dataclass(frozen=True)
class _Graphs:
    """What the build step wrote: the plain graph, whether it keeps its data file, the fused graph's entries."""

    graph_path: Path
    summary: dict  # graph_summary of the plain graph
    keep_external: bool
    fused_entry: dict  # manifest entries: the fused graph's files and I/O, or why there is none

    @property
    def has_fused(self) -> bool:
        return "fused_graph_file" in self.fused_entry


def _check_options(options: _Options, dtype: str) -> None:
    if options.fused and (reason := cache_support(options.fused_cache, dtype, options.fused_rotary)):
        raise ExportError(reason)
    if options.fused_weights not in FUSED_WEIGHTS:
        raise ExportError(f"unknown weight format {options.fused_weights!r}: choose one of {', '.join(FUSED_WEIGHTS)}")
    if options.method not in METHODS:
        raise ExportError(f"unknown export method {options.method!r}: choose one of {', '.join(METHODS)}")
    oldest = TRACE_MIN_OPSET if options.method == "trace" else OPSET
    if options.opset is not None and options.opset < oldest:
        raise ExportError(f"opset {options.opset} is too old: --method {options.method} needs {oldest} or newer")
    if dtype == "bfloat16" and options.validate and (missing := cuda_bfloat16_missing()):
        raise ExportError(
            "ONNX Runtime's CPU provider has no bfloat16 MatMul, so a bfloat16 export is validated on its CUDA "
            f"provider, and {missing}: add --no-validate (TensorRT runs bfloat16 graphs) or export float16"
        )


def _resolve(model: str | Path | None, size: str | None, data: str, stages: _Stages):
    """The local checkpoint folder (downloaded if it is a hub id), its config and its tokenizer (None without
    tokenizer files)."""
    folder = resolve_model(model, size=size, data=data)
    config = ModelConfig.from_file(folder)
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "merges.txt")):
        tokenizer = load_tokenizer(folder)  # as every command will load the export's copy: a broken one is refused now
    stages.done("resolve", str(folder))
    return folder, config, tokenizer


def _load(folder: Path, config: ModelConfig, dtype: str, stages: _Stages):
    """The reference model with the checkpoint's weights in `dtype`."""
    reference = load_checkpoint(folder, dtype=torch_dtype(dtype))
    weight_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    parameters = f"{config.num_parameters() / 1e6:.1f}M parameters"
    stages.done("load", f"{parameters}, {dtype}, {weight_bytes / 1e9:.2f} GB of weights")
    return reference


def _build(reference, folder: Path, options: _Options, stages: _Stages, progress, calibration=None) -> _Graphs:
    """Write the plain graph (decoder.onnx + decoder.onnx.data) and, if asked, the fused graph into `folder`.

    The fused graph reads the weights both graphs hold from the plain graph's data file and writes only
    its own tensors (rotary tables, quantized weights): the weights are written once. The plain graph
    keeps that data file over 2 GB or when asked (external_data); otherwise _write inlines it.
    """
    if options.method == "trace":
        graph_path, data_path = write_traced_graph(reference, folder, options.opset)
    else:
        graph_path, data_path = write_plain_graph(reference, folder, options.opset)
    summary = graph_summary(graph_path)
    nodes = f"opset {summary['opset']}, IR {summary['ir_version']}, {summary['nodes']} nodes"
    stages.done("build" if options.method == "built" else "trace", f"{graph_path.name} ({options.method}), {nodes}")
    keep_external = options.external_data
    if keep_external is None:
        keep_external = data_path.stat().st_size > EXTERNAL_DATA_THRESHOLD
    fused_entry = {}
    if options.fused:
        fused_entry = _build_fused(reference, folder, options, graph_path, progress, calibration)
        if "fused_graph_file" in fused_entry:
            detail = f"{options.fused_weights} weights, {options.fused_cache} cache, rotary {options.fused_rotary}"
            stages.done("fused", f"{io_spec.FUSED_GRAPH_FILE} ({detail})")
    return _Graphs(graph_path, summary, keep_external, fused_entry)


def _build_fused(
    reference, folder: Path, options: _Options, share_with: Path | None, progress, calibration=None
) -> dict:
    """Write the fused graph into `folder`; its manifest entries, or why there is none (with a note) for
    shapes and dtypes the fused graph cannot serve: the plain graph then serves ONNX Runtime."""
    weights, rotary, cache = options.fused_weights, options.fused_rotary, options.fused_cache
    reason = fused_support(reference.config, rotary)
    if reason is None:
        try:
            write_fused_graph(
                reference,
                folder,
                weights=weights,
                rotary=rotary,
                share_with=share_with,
                cache=cache,
                calibration=calibration,
            )
        except ExportError as e:  # a dtype the fused graph does not take (bfloat16); a full disk is an ArtifactError
            reason = str(e)
    if reason is not None:
        progress(f"note: no fused graph ({reason}); ONNX Runtime will run the plain graph")
        return {"fused_skipped": reason}
    return fused_entries(reference.config, dtype_name(reference.dtype), weights, rotary, cache)


# An int8 cache's scales are measured on this many windows of this many tokens of code (kv_calibration).
KV_CALIBRATION = (4, 512)


def kv_calibration(tokenizer, config: ModelConfig) -> np.ndarray | None:
    """Token ids [windows, tokens] of this Python's standard library (the training split: evaluations read the
    held-out one), on which an int8 KV cache's scales are measured; None without a tokenizer (the export then
    measures them on random tokens)."""
    if tokenizer is None:
        return None
    windows, length = KV_CALIBRATION[0], min(KV_CALIBRATION[1], config.n_positions)
    ids: list[int] = []
    for path in stdlib_files("train"):
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= windows * length:
            break
    if len(ids) < windows * length:
        return None
    return np.array(ids[: windows * length], np.int64).reshape(windows, length)  # [windows, length]


def _verify(reference, graphs: _Graphs, stages: _Stages, progress) -> dict:
    """Check the plain graph, then the fused one, against the reference; their reports as manifest entries.

    The fused graph is checked against logits recorded first, so the reference's weights can be freed
    before ONNX Runtime loads a graph (only one copy of the weights is in memory at a time).
    """
    fused_expected = None
    if graphs.has_fused:  # as many prompts as the check of what makes this graph lossy reads
        fused_expected = record_reference(reference, weights=FusedGraph.of(graphs.fused_entry).lossy)
    config = reference.config
    try:
        report = validate_export(graphs.graph_path, reference, release_model=True)
    except Exception as e:
        if getattr(e, "report", None) is not None:
            progress(e.report.table())
        raise
    progress(report.table())
    stages.done("validate", "passed")
    entries = {"validation": report.to_dict()}
    if graphs.has_fused:
        folder = graphs.graph_path.parent
        entries["fused_validation"] = check_fused(folder, config, fused_expected, graphs.fused_entry, progress)
        stages.done("validate fused", "passed")
    return entries


def _write(
    tmp: Path, folder: Path, config: ModelConfig, tokenizer, graphs: _Graphs, entries: dict, stages: _Stages, progress
) -> None:
    """Finish the export folder: weights inline under 2 GB, config.json and tokenizer files, the genai and
    tokenizer configs, then the manifest."""
    if not graphs.keep_external:  # validated with external data (cheaper to check and to load); now inline it
        # A built graph's data file already holds its weights as protobuf records: inlining appends the graph.
        inline = inline_records if entries["method"] == "built" else inline_external_data
        inline(graphs.graph_path)
        if graphs.has_fused:  # same bytes at the same offsets, now in decoder.onnx: the fused graph follows them
            relocate_external_data(tmp / io_spec.FUSED_GRAPH_FILE, io_spec.DATA_FILE, io_spec.GRAPH_FILE)
    copied = [name for name in ("config.json", *TOKENIZER_FILES) if (folder / name).is_file()]
    for name in copied:
        shutil.copy(folder / name, tmp / name)
    if not any(name in copied for name in ("tokenizer.json", "vocab.json")):
        progress(f"warning: {folder} has no tokenizer files; the export will need one to generate text")
    write_tokenizer_config(tmp, config)
    write_genai_files(tmp, config, fused=graphs.has_fused)  # after the fused graph's data found its final file
    # CodeGen2's fill-in-the-middle tokens (their ids), or None: no tokenizer, one without them, or ids past the
    # embedding's rows.
    fim = tokenizer.fim_for(config.vocab_size) if tokenizer is not None else None

    summary = graphs.summary
    cache_dtype = summary["dtypes"][io_spec.present_name(0, "key")]
    spec_args = (config.n_layer, config.n_head, config.head_dim)
    body = {
        "model_config": config.to_dict(),
        "hf_config": json.loads((folder / "config.json").read_text()),
        "cache_dtype": cache_dtype,
        "logits_dtype": summary["dtypes"][io_spec.LOGITS],
        "opset": summary["opset"],
        "ir_version": summary["ir_version"],
        "graph_file": io_spec.GRAPH_FILE,
        "data_file": io_spec.DATA_FILE if graphs.keep_external else None,
        "inputs": [s.to_dict() for s in io_spec.decoder_inputs(*spec_args, cache_dtype)],
        "outputs": [s.to_dict() for s in io_spec.decoder_outputs(*spec_args, config.vocab_size, cache_dtype)],
        "fill_in_the_middle": None if fim is None else fim.to_dict(),
        **({"trace_dims": _trace_dims()} if entries["method"] == "trace" else {}),
        "versions": versions(),
        **entries,
        **graphs.fused_entry,
        **({"fused_shared_data_file": shared_data_file(tmp)} if graphs.has_fused else {}),
    }
    write_manifest(tmp, {**body, "timings_s": stages.seconds})
    stages.done("write", f"tokenizer, config.json, {io_spec.GENAI_CONFIG_FILE}, manifest.json")


def _trace_dims() -> dict:
    return {"batch": TRACE_BATCH, "seq": TRACE_SEQ, "past": TRACE_PAST}


def add_fused_graph(
    folder: str | Path,
    model=None,
    max_context: int | None = None,
    weights: str = "float",
    rotary: str = "gqa",
    validate: bool = True,
    progress: Callable[[str], None] | None = None,
    cache: str = "auto",
) -> list[str]:
    """Add (or replace) the fused graph of an existing export folder, checked against the reference like a
    new export's, and record it in the folder's manifest; return the files written.

    model: the loaded reference (default: the checkpoint the manifest records as its source, in the export's
    dtype). weights: "float", "int8" or "int4"; rotary: "gqa", or "graph" for ONNX Runtime's CUDA provider.
    cache: the KV cache's dtype ("auto", "float32", "float16", "int8"; see cache_dtype_for). validate: compare the
    fused graph with the reference; over tolerance it raises ValidationError and the export is left without a
    fused graph (the plain graph still serves it). progress: called with the check's table (default:
    log_progress).
    """
    progress = progress or log_progress
    folder = Path(folder)
    manifest = read_manifest(folder, verify="size")
    if weights not in FUSED_WEIGHTS:
        raise ExportError(f"unknown weight format {weights!r}: choose one of {', '.join(FUSED_WEIGHTS)}")
    if model is None:
        source = manifest.get("source")
        if not source:
            raise ExportError(f"{folder / io_spec.MANIFEST_FILE} records no source checkpoint: pass the model")
        model = load_checkpoint(source, dtype=torch_dtype(export_dtype(manifest)))
    reason = fused_support(model.config, rotary)
    if reason is not None:
        raise ExportError(f"no fused graph for this shape ({reason}): ONNX Runtime runs the plain graph")
    cache = cache_dtype_for(cache, dtype_name(model.dtype), weights)
    recorded = record_reference(model, weights=lossy_kind(weights, cache)) if validate else None
    calibration = kv_calibration(load_tokenizer(folder), model.config) if cache == "int8" else None
    files = write_fused_graph(
        model, folder, max_context=max_context, weights=weights, rotary=rotary, cache=cache, calibration=calibration
    )
    entries = fused_entries(model.config, dtype_name(model.dtype), weights, rotary, cache)
    if validate:
        try:
            entries["fused_validation"] = check_fused(folder, model.config, recorded, entries, progress)
        except BaseException:
            for name in files:
                (folder / name).unlink(missing_ok=True)
            write_genai_files(folder, model.config, fused=False)  # genai runs the plain graph again
            update_manifest(folder, {}, drop=FUSED_KEYS)
            raise
    write_genai_files(folder, model.config, fused=True)
    update_manifest(folder, entries, drop=FUSED_KEYS)
    return [*files, io_spec.GENAI_GRAPH_FILE]
