"""export_model: checkpoint -> verified export folder (decoder.onnx [+ .data], config.json, tokenizer files,
genai_config.json, manifest.json).

Everything is written into a hidden temporary sibling of the output and renamed at the end, so an
error or an interrupt never leaves a folder that looks like a finished export.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .artifacts import io_spec
from .artifacts.atomic import check_output, staging_folder, write_error
from .artifacts.manifest import write_manifest
from .config import ModelConfig
from .dtypes import SUFFIX, check_dtype, dtype_name, torch_dtype
from .errors import ArtifactError, ExportError
from .memory import memory_line
from .model.hub import TOKENIZER_FILES, local_sources, resolve_model, source_id
from .verify.fused import check_fused, record_reference

MIN_OPSET = 18  # the oldest opset torch.onnx.export(dynamo=True) emits (LayerNormalization is opset 17)


def default_output(
    model: str | Path | None = None, *, size: str | None = None, data: str = "mono", dtype: str = "float32"
) -> Path:
    """exports/codegen-350M-mono-fp16 for a published size; exports/<folder or repo name>[-fp16] otherwise."""
    name = f"codegen-{size}-{data}" if size else Path(str(model).rstrip("/")).name
    return Path("exports") / f"{name}{SUFFIX[dtype]}"


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
    import onnx
    import onnxscript
    import torch

    from . import __version__

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
    opset: int | None = None,
    validate: bool = True,
    force: bool = False,
    external_data: bool | None = None,
    fused: bool = True,
    fused_weights: str = "float",
    progress: Callable[[str], None] = print,
) -> Path:
    """Export a CodeGen checkpoint to a verified ONNX export folder; return the folder.

    model: a checkpoint folder or hub id (or give `size` ("350M", "2B", "6B", "16B") and `data`
    ("mono", "multi", "nl") for a published model). output: the folder to create (default
    exports/codegen-<size>-<data>[-fp16]). dtype: "float32", "float16" or "bfloat16" weights and cache
    (logits are always float32). opset: ONNX opset (default: the exporter's). validate: compare ONNX
    Runtime with the reference (raises ValidationError over tolerance). force: replace an existing
    output. external_data: None = only above 2 GB, True = always (one decoder.onnx.data file).
    fused: also write the fused ONNX Runtime graph (GroupQueryAttention, in-place KV cache), checked
    against the reference; skipped with a note for shapes GQA cannot express. fused_weights: "float",
    or "int8" / "int4" block-quantized MatMulNBits weights in the fused graph.
    """

    from .build import trace
    from .build.genai import write_genai_config, write_tokenizer_config
    from .model.reference import CodeGen

    check_dtype(dtype)
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: torch's ONNX exporter needs {MIN_OPSET} or newer")
    if dtype == "bfloat16" and validate:
        raise ExportError(
            "ONNX Runtime's CPU provider has no bfloat16 MatMul, so a bfloat16 export cannot be validated here: "
            "add --no-validate (TensorRT runs bfloat16 graphs) or export float16"
        )
    output = Path(output) if output is not None else default_output(model, size=size, data=data, dtype=dtype)
    check_output(output, force, protect=local_sources(model))
    stages = _Stages(progress)
    folder = resolve_model(model, size=size, data=data)
    stages.done("resolve", str(folder))
    config = ModelConfig.from_file(folder)
    hf_config = json.loads((folder / "config.json").read_text())

    with staging_folder(output, replace=force, protect=[folder]) as tmp:
        reference = CodeGen.from_pretrained(folder, dtype=torch_dtype(dtype))
        weight_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        stages.done("load", f"{config.num_parameters() / 1e6:.1f}M parameters, {dtype}, "
                            f"{weight_bytes / 1e9:.2f} GB of weights")  # fmt: skip

        ir_model = trace.trace(reference, opset=opset)
        dtypes = trace.graph_dtypes(ir_model)
        opset_used = ir_model.opset_imports[""]
        stages.done("trace", f"opset {opset_used}, {sum(1 for _ in ir_model.graph)} nodes")

        keep_external = trace.keep_external(ir_model, external_data)
        graph_path, data_path = trace.save(ir_model, tmp)
        trace.release_weights(ir_model)  # the reference model now holds the only copy
        size_bytes = graph_path.stat().st_size + data_path.stat().st_size
        stages.done("save", f"{graph_path.name} + {data_path.name}, {size_bytes / 1e9:.2f} GB")

        fused_entry = _write_fused(tmp, reference, fused_weights, progress) if fused else None
        # The fused graph is checked against logits recorded now, so the reference can be freed before
        # ONNX Runtime loads a second copy of the weights.
        fused_expected = record_reference(reference) if fused_entry and validate else None

        report = None
        if validate:
            from .verify.validate import validate_export

            try:
                report = validate_export(graph_path, reference, release_model=True)
            except Exception as e:
                if getattr(e, "report", None) is not None:
                    progress(e.report.table())
                raise
            progress(report.table())
            stages.done("validate", "passed")
        del reference
        if fused_expected is not None:
            fused_entry["fused_validation"] = check_fused(tmp, config, fused_expected, fused_entry, progress)
            stages.done("validate fused", "passed")
        if not keep_external:  # validated with external data (cheaper to check and to load); now inline it
            trace.inline_external_data(graph_path)
            data_path = None
            stages.done("inline", f"weights moved into {graph_path.name} (under 2 GB)")

        copied = [name for name in ("config.json", *TOKENIZER_FILES) if (folder / name).is_file()]
        for name in copied:
            shutil.copy(folder / name, tmp / name)
        if not any(name in copied for name in ("tokenizer.json", "vocab.json")):
            progress(f"warning: {folder} has no tokenizer files; the export will need one to generate text")
        write_tokenizer_config(tmp, config)
        write_genai_config(tmp, config)

        cache_dtype = dtypes[io_spec.present_name(0, "key")]
        spec_args = (config.n_layer, config.n_head, config.head_dim)
        body = {
            "model_config": config.to_dict(),
            "hf_config": hf_config,
            "source": source_id(model, size=size, data=data),
            "dtype": dtype,
            "cache_dtype": cache_dtype,
            "logits_dtype": dtypes[io_spec.LOGITS],
            "opset": opset_used,
            "graph_file": io_spec.GRAPH_FILE,
            "data_file": io_spec.DATA_FILE if data_path else None,
            "inputs": [s.to_dict() for s in io_spec.decoder_inputs(*spec_args, cache_dtype)],
            "outputs": [s.to_dict() for s in io_spec.decoder_outputs(*spec_args, config.vocab_size, cache_dtype)],
            "trace_dims": {
                "batch": trace.TRACE_BATCH,
                "seq": trace.TRACE_SEQ,
                "past": trace.TRACE_PAST,
            },
            "versions": versions(),
            "validation": report.to_dict() if report else None,
            **(fused_entry or {}),
            "timings_s": stages.seconds,
        }
        write_manifest(tmp, body)
        stages.done("write", f"{output} (tokenizer, config.json, {io_spec.GENAI_CONFIG_FILE}, manifest.json)")
    return output


def _write_fused(folder: Path, reference, weights: str, progress) -> dict | None:
    """Write the fused graph into `folder`; its manifest entries, or None (with a note) for shapes
    GroupQueryAttention cannot express: the plain graph then serves ONNX Runtime."""
    from .build.fused import fused_manifest_entries, write_fused_graph

    try:
        write_fused_graph(reference, folder, weights=weights)
    except ExportError as e:
        if write_error(e):  # a full disk is not a shape GQA cannot express
            raise ArtifactError(f"could not write the fused graph ({write_error(e)}): free some disk space") from e
        progress(f"note: no fused graph ({e}); ONNX Runtime will run the plain graph")
        return None
    return fused_manifest_entries(reference.config, dtype_name(reference.dtype), weights)
