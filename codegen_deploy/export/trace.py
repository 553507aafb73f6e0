"""The second construction of the plain decoder (`codegen-export --method trace`): the reference CodeGen
traced into one ONNX graph with past-key-value I/O (io_spec's contract). The default, plain.py, builds
the same graph from the weights; tests check that the two agree.

torch.onnx.export(dynamo=True) traces a flat wrapper (input_ids, attention_mask, position_ids, *past)
-> (logits, *present) at batch 2, seq 3, past 5: all different and seq >= 2, because equal or unit
example dims get specialised. The graph then runs at any batch, seq and past, past 0 included.
The model's own float32 islands (LayerNorm, rotary, attention scores and softmax) survive a half
precision trace as Cast nodes, so an fp16 trace is already the mixed-precision graph TensorRT needs.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..artifacts import io_spec
from ..config import ModelConfig
from ..dtypes import dtype_name, onnx_type_name
from ..errors import ArtifactError, ExportError
from ..model.reference import CodeGen
from .graph import IR_VERSION

# Example dims of the trace (see the module docstring for why these values).
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 5
MIN_OPSET = 18  # the oldest opset torch.onnx.export(dynamo=True) emits


class DecoderWrapper(nn.Module):
    """CodeGen with a flat signature: (input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    `past` and `present` are ordered as io_spec.past_names / present_names: layer 0 key, layer 0 value, ...
    """

    def __init__(self, model: CodeGen):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
        logits, present = self.model(input_ids, attention_mask, position_ids, cache)
        return (logits, *(t for key_value in present for t in key_value))


def example_inputs(
    config: ModelConfig, dtype: torch.dtype, batch: int = TRACE_BATCH, seq: int = TRACE_SEQ, past: int = TRACE_PAST
) -> tuple[torch.Tensor, ...]:
    """Trace inputs: ids, an all-ones mask, positions past..past+seq-1 and a random past cache."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)  # [B, T]
    mask = torch.ones(batch, past + seq, dtype=torch.int64)  # [B, total]
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()  # [B, T]
    kv_shape = (batch, config.n_head, past, config.head_dim)
    cache = [torch.randn(kv_shape, generator=generator).to(dtype) for _ in range(2 * config.n_layer)]
    return (ids, mask, positions, *cache)


def dynamic_shapes(config: ModelConfig) -> tuple:
    """Nested dynamic_shapes matching DecoderWrapper's signature, with io_spec's dim names."""
    kv = {0: io_spec.BATCH, 2: io_spec.PAST}
    return (
        {0: io_spec.BATCH, 1: io_spec.SEQ},
        {0: io_spec.BATCH, 1: io_spec.TOTAL},
        {0: io_spec.BATCH, 1: io_spec.SEQ},
        tuple(dict(kv) for _ in range(2 * config.n_layer)),
    )


def trace(model: CodeGen, opset: int | None = None):
    """Export `model` with torch.onnx.export(dynamo=True); return the onnx_ir Model (weights not copied).

    The returned graph's inputs and outputs carry io_spec's names, dtypes and dim names; this is
    checked here, so a torch or onnxscript upgrade that changes them fails loudly at export time.
    """
    config = model.config
    cache_dtype = dtype_name(model.dtype)
    inputs = io_spec.decoder_inputs(config.n_layer, config.n_head, config.head_dim, cache_dtype)
    outputs = io_spec.decoder_outputs(config.n_layer, config.n_head, config.head_dim, config.vocab_size, cache_dtype)
    # The exporter logs one warning per missing torchvision op; CodeGen uses none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns about dims that share constraints (expected: batch appears in every input).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            DecoderWrapper(model.eval()),
            example_inputs(config, model.dtype),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(config),
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    ir_model = program.model
    _apply_io_spec(ir_model, inputs, outputs)
    ir_model.producer_name = "codegen-deploy"
    return ir_model


def _apply_io_spec(ir_model, inputs: list[io_spec.TensorSpec], outputs: list[io_spec.TensorSpec]) -> None:
    """Check names and dtypes against io_spec and give every dim io_spec's name.

    The exporter names the present length "past + seq"; io_spec calls it "total" (the mask's length),
    which is the same number at run time and lets consumers match dims by name.
    """
    import onnx_ir as ir

    graph = ir_model.graph
    for kind, values, specs in (("input", graph.inputs, inputs), ("output", graph.outputs, outputs)):
        names = [v.name for v in values]
        if names != [s.name for s in specs]:
            raise ExportError(f"the traced graph's {kind}s {names[:4]}... differ from io_spec: report this bug")
        for value, spec in zip(values, specs, strict=True):
            dtype = onnx_type_name(value.dtype)
            if dtype != spec.dtype or len(value.shape) != len(spec.shape):
                raise ExportError(
                    f"graph {kind} {value.name} is {dtype} of rank {len(value.shape)}, io_spec says "
                    f"{spec.dtype} {list(spec.shape)}: report this bug"
                )
            value.shape = ir.Shape(list(spec.shape))


def save(ir_model, folder: Path) -> tuple[Path, Path]:
    """Write decoder.onnx and its weights, as one decoder.onnx.data beside it, into `folder`.

    onnx_ir streams each tensor from its torch storage to the data file: no second copy of the weights.
    The graph gets the package's IR version (graph.IR_VERSION), like the graphs built node by node.
    """
    import onnx_ir as ir

    ir_model.ir_version = IR_VERSION
    graph_path = folder / io_spec.GRAPH_FILE
    ir.save(ir_model, graph_path, external_data=io_spec.DATA_FILE)
    return graph_path, folder / io_spec.DATA_FILE


def release_weights(ir_model) -> None:
    """Drop the graph's references to the torch weights (call after saving).

    onnxscript's rewriter keeps every graph it optimised alive through module-level caches, so `del`
    alone would keep the weights in memory until the process ends.
    """
    for value in ir_model.graph.initializers.values():
        value.const_value = None
    ir_model.graph.initializers.clear()


def write_traced_graph(model: CodeGen, folder: Path, opset: int | None = None) -> tuple[Path, Path]:
    """Trace `model` and write decoder.onnx + decoder.onnx.data into `folder`; return both paths."""
    ir_model = trace(model, opset=opset)
    try:
        return save(ir_model, Path(folder))
    except OSError as e:
        raise ArtifactError(
            f"could not write the traced graph into {folder} ({e.strerror or e}): free some disk space"
        ) from e
    finally:
        release_weights(ir_model)  # the reference model holds the only copy again
