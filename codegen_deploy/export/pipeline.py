"""export_model: checkpoint -> verified export folder (decoder.onnx [+ .data], config.json, tokenizer files,
genai_config.json, manifest.json).

Everything is written into a hidden temporary sibling of the output and renamed at the end, so an
error or an interrupt never leaves a folder that looks like a finished export.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import io_spec
from ..config import ModelConfig, hub_id
from ..errors import ExportError
from ..hub import TOKENIZER_FILES, resolve_model
from ..runtime.session import Session

MIN_OPSET = 18  # the oldest opset torch.onnx.export(dynamo=True) emits (LayerNormalization is opset 17)
DTYPE_SUFFIX = {"float32": "", "float16": "-fp16", "bfloat16": "-bf16"}


def default_output(
    model: str | Path | None = None, *, size: str | None = None, data: str = "mono", dtype: str = "float32"
) -> Path:
    """exports/codegen-350M-mono-fp16 for a published size; exports/<folder or repo name>[-fp16] otherwise."""
    name = f"codegen-{size}-{data}" if size else Path(str(model).rstrip("/")).name
    return Path("exports") / f"{name}{DTYPE_SUFFIX[dtype]}"


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
        self.progress(f"{name:<9} {self.seconds[name]:6.1f} s  {_memory()}  {detail}".rstrip())


def _memory() -> str:
    """This process's resident memory now and at its peak so far, e.g. "RSS 1.2 GB (peak 1.9 GB)"."""
    import psutil

    rss = psutil.Process().memory_info().rss
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except ImportError:  # Windows
        peak = psutil.Process().memory_info().peak_wset
    return f"RSS {rss / 1e9:.2f} GB (peak {max(peak, rss) / 1e9:.2f} GB)"


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} exists and is not a folder: choose another --output")
    if output.exists() and not force:
        raise ExportError(f"{output} already exists: pass --force to replace it, or choose another --output")


def _make_temp(output: Path) -> Path:
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"cannot write to {output.parent} ({e.strerror}): choose another --output") from e
    return tmp


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished export into place; an existing output (--force) is removed only afterwards."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def versions() -> dict[str, str | None]:
    """Versions of the tools that made an export."""
    import onnx
    import onnxscript
    import torch

    from .. import __version__

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
    import torch

    from ..reference.model import CodeGen
    from . import onnx as onnx_export
    from .genai import write_genai_config, write_tokenizer_config

    if dtype not in DTYPE_SUFFIX:
        raise ExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_SUFFIX)}")
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: torch's ONNX exporter needs {MIN_OPSET} or newer")
    if dtype == "bfloat16" and validate:
        raise ExportError(
            "ONNX Runtime's CPU provider has no bfloat16 MatMul, so a bfloat16 export cannot be validated here: "
            "add --no-validate (TensorRT runs bfloat16 graphs) or export float16"
        )
    output = Path(output) if output is not None else default_output(model, size=size, data=data, dtype=dtype)
    _check_output(output, force)
    stages = _Stages(progress)
    folder = resolve_model(model, size=size, data=data)
    stages.done("resolve", str(folder))
    config = ModelConfig.from_file(folder)
    hf_config = json.loads((folder / "config.json").read_text())

    tmp = _make_temp(output)
    try:
        reference = CodeGen.from_pretrained(folder, dtype=getattr(torch, dtype))
        weight_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        stages.done("load", f"{config.num_parameters() / 1e6:.1f}M parameters, {dtype}, "
                            f"{weight_bytes / 1e9:.2f} GB of weights")  # fmt: skip

        ir_model = onnx_export.trace(reference, opset=opset)
        dtypes = onnx_export.graph_dtypes(ir_model)
        opset_used = ir_model.opset_imports[""]
        stages.done("trace", f"opset {opset_used}, {sum(1 for _ in ir_model.graph)} nodes")

        keep_external = onnx_export.keep_external(ir_model, external_data)
        graph_path, data_path = onnx_export.save(ir_model, tmp)
        onnx_export.release_weights(ir_model)  # the reference model now holds the only copy
        size_bytes = graph_path.stat().st_size + data_path.stat().st_size
        stages.done("save", f"{graph_path.name} + {data_path.name}, {size_bytes / 1e9:.2f} GB")

        fused_entry = _write_fused(tmp, reference, fused_weights, progress) if fused else None
        # The fused graph is checked against logits recorded now, so the reference can be freed before
        # ONNX Runtime loads a second copy of the weights.
        fused_expected = _record_reference(reference) if fused_entry and validate else None

        report = None
        if validate:
            from .validate import validate_export

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
            fused_entry["fused_validation"] = _check_fused(tmp, config, fused_expected, fused_entry, progress)
            stages.done("validate fused", "passed")
        if not keep_external:  # validated with external data (cheaper to check and to load); now inline it
            onnx_export.inline_external_data(graph_path)
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
            "source": str(model) if model is not None else hub_id(size, data),
            "dtype": dtype,
            "cache_dtype": cache_dtype,
            "logits_dtype": dtypes[io_spec.LOGITS],
            "opset": opset_used,
            "graph_file": io_spec.GRAPH_FILE,
            "data_file": io_spec.DATA_FILE if data_path else None,
            "inputs": [s.to_dict() for s in io_spec.decoder_inputs(*spec_args, cache_dtype)],
            "outputs": [s.to_dict() for s in io_spec.decoder_outputs(*spec_args, config.vocab_size, cache_dtype)],
            "trace_dims": {
                "batch": onnx_export.TRACE_BATCH,
                "seq": onnx_export.TRACE_SEQ,
                "past": onnx_export.TRACE_PAST,
            },
            "versions": versions(),
            "validation": report.to_dict() if report else None,
            **(fused_entry or {}),
            "timings_s": stages.seconds,
        }
        from ..manifest import write_manifest

        write_manifest(tmp, body)
        _replace(tmp, output)
        stages.done("write", f"{output} (tokenizer, config.json, {io_spec.GENAI_CONFIG_FILE}, manifest.json)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _write_fused(folder: Path, reference, weights: str, progress) -> dict | None:
    """Write the fused graph into `folder`; its manifest entries, or None (with a note) for shapes
    GroupQueryAttention cannot express: the plain graph then serves ONNX Runtime."""
    from .optimize import fused_manifest_entries, write_fused_graph

    try:
        write_fused_graph(reference, folder, weights=weights)
    except ExportError as e:
        progress(f"note: no fused graph ({e}); ONNX Runtime will run the plain graph")
        return None
    return fused_manifest_entries(reference.config, entries_dtype(reference), weights)


# Fused-graph check: two prompts (one shorter, so positions differ) and a few greedy steps.
_FUSED_CHECK_PROMPT_LENGTHS, _FUSED_CHECK_NEW_TOKENS = (9, 3), 4


def _fused_check_prompts(config: ModelConfig) -> list[list[int]]:
    return [[(7 * i + 3) % config.vocab_size for i in range(n)] for n in _FUSED_CHECK_PROMPT_LENGTHS]


def _record_reference(reference) -> list[list]:
    """The reference's logits for the fused check: per prompt, prefill then its own greedy steps."""
    from ..runtime.backends.torch import TorchSession

    session, recorded = TorchSession(reference), []
    for ids in _fused_check_prompts(reference.config):
        steps = [session.prefill(np.array([ids]))]
        for _ in range(_FUSED_CHECK_NEW_TOKENS - 1):
            steps.append(session.step(steps[-1].argmax(-1)))
        recorded.append(steps)
    return recorded


class _Replay(Session):
    """Replays recorded reference logits, so parity can compare them with a live session."""

    name = "torch"

    def __init__(self, config: ModelConfig, recorded: list[list]):
        super().__init__(config)
        self._runs, self._steps = iter(recorded), iter(())

    def _prefill(self, input_ids, attention_mask, position_ids):
        self._steps = iter(next(self._runs))
        return next(self._steps)

    def _step(self, input_ids, attention_mask, position_ids):
        return next(self._steps)


def _check_fused(folder: Path, config: ModelConfig, recorded: list[list], entry: dict, progress) -> dict:
    """Compare the fused graph with the recorded reference; raise ValidationError over tolerance."""
    from ..runtime.backends.onnxruntime_fused import FusedOrtSession
    from ..runtime.parity import Tolerance, compare_sessions

    lossy = entry["fused_weights"] != "float"  # int8/int4 weights: only greedy agreement is meaningful
    tolerance = Tolerance(atol=1.0, rtol=1.0, min_top1=0.5) if lossy else Tolerance.for_dtype(entry["fused_dtype"])
    with FusedOrtSession(folder, config=config, max_context=64, low_memory=True) as fused:
        report = compare_sessions(_Replay(config, recorded), fused, _fused_check_prompts(config),
                                  new_tokens=_FUSED_CHECK_NEW_TOKENS, tolerance=tolerance)  # fmt: skip
    progress(report.table())
    report.check()
    return report.to_dict()


def entries_dtype(model) -> str:
    """ "float32", "float16" or "bfloat16": the dtype name of a model's weights."""
    return str(model.dtype).removeprefix("torch.")
