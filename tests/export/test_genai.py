"""onnxruntime-genai loads an export through its genai_config.json and generates the reference's greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codegen_deploy.artifacts import io_spec
from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.model.weights import load_checkpoint

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install '.[genai]')")

NEW_TOKENS = 8


def test_an_export_without_a_fused_graph_points_genai_at_the_plain_graph(tiny_export):
    config = json.loads((tiny_export / io_spec.GENAI_CONFIG_FILE).read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama" and decoder["filename"] == io_spec.GRAPH_FILE
    assert decoder["inputs"]["past_key_names"] % 1 == io_spec.past_name(1, "key")
    assert decoder["outputs"]["present_value_names"] % 1 == io_spec.present_name(1, "value")
    assert config["search"]["past_present_share_buffer"] is False
    assert not (tiny_export / io_spec.GENAI_GRAPH_FILE).exists()


def test_genai_plain_graph_greedy_tokens_equal_reference(tiny_export, tiny_checkpoint):
    assert _genai_greedy(tiny_export, [PROMPT]) == [_reference_greedy(tiny_checkpoint, PROMPT)]


def test_genai_tokenizer_matches_ours(fp32_export):
    """The export carries what onnxruntime-extensions' tokenizer needs (tokenizer.json + tokenizer_config.json)."""
    text = "def add(a, b):\n    return a + b\n"
    tokenizer = og.Tokenizer(og.Model(str(fp32_export)))
    ids = [int(t) for t in tokenizer.encode(text)]
    assert ids == load_tokenizer(fp32_export).encode(text)
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == text


# The genai-shaped fused graph (export/genai_graph.py), which every export with a fused graph points genai at:
# genai runs the fused graph, quantized weights and narrower caches included.


def _config(folder):
    from codegen_deploy.artifacts.manifest import manifest_config, read_manifest

    return manifest_config(read_manifest(folder, verify="none"))


@pytest.fixture(scope="module")
def fused_genai_exports(tiny_checkpoint, fp32_export, fp16_export, tmp_path_factory):
    """Exports as codegen-export writes them (decoder_genai.onnx, genai_config.json pointing at it), by fused
    graph: float32, float16, int8 and int4 (each over a float16 cache), int8 over a float32 cache, float32 over
    an int8 cache."""
    from codegen_deploy.pipeline import export_model

    root = tmp_path_factory.mktemp("genai-fused")
    folders = {"float32": fp32_export, "float16": fp16_export}
    kinds = (("int8", "int8", "auto"), ("int4", "int4", "auto"), ("kv32", "int8", "float32"), ("kv8", "float", "int8"))
    for name, weights, cache in kinds:
        folders[name] = export_model(
            tiny_checkpoint,
            root / name,
            fused_weights=weights,
            fused_cache=cache,
            validate=False,
            progress=lambda line: None,
        )
    return folders


def _genai_greedy(folder, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """genai's greedy rows for prompts (right-padded with pad_token_id, as genai 0.18 expects a batch)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    width = max(map(len, prompts))
    params.set_search_options(max_length=width + new_tokens, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    pad = json.loads((folder / io_spec.GENAI_CONFIG_FILE).read_text())["model"]["pad_token_id"]
    generator.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    rows = []
    for i, p in enumerate(prompts):
        sequence = [int(t) for t in generator.get_sequence(i)]
        rows.append(p + sequence[width:])  # genai keeps the pads between prompt and new tokens
    return rows


def _fused_greedy(folder, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession

    ids = list(prompt)
    with FusedOrtSession(folder, config=_config(folder)) as session:
        logits = session.prefill(np.array([prompt]))
        for _ in range(new_tokens):
            ids.append(int(logits[0].argmax()))
            logits = session.step(np.array([[ids[-1]]]))
    return ids


def _reference_greedy(checkpoint, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    reference = load_checkpoint(checkpoint)
    ids = torch.tensor([prompt])  # [1, T]
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = reference(ids)
            ids = torch.cat((ids, logits[:, -1].argmax(-1, keepdim=True)), dim=1)  # [1, T + 1]
    return ids[0].tolist()


PROMPT = [5, 17, 99, 300, 42, 7]


def test_genai_graph_config_declares_the_shared_fused_buffer(fused_genai_exports):
    import onnx

    folder = fused_genai_exports["int8"]
    config = json.loads((folder / io_spec.GENAI_CONFIG_FILE).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == io_spec.GENAI_GRAPH_FILE
    assert config["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in decoder["inputs"]  # positions come from the mask (GQA's seqlens_k)
    graph = onnx.load(str(folder / io_spec.GENAI_GRAPH_FILE), load_external_data=False).graph
    fused = onnx.load(str(folder / io_spec.FUSED_GRAPH_FILE), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[:2] == [io_spec.INPUT_IDS, io_spec.ATTENTION_MASK]
    assert not {io_spec.SEQLENS_K, io_spec.TOTAL_SEQUENCE_LENGTH, io_spec.LOGITS_TO_KEEP} & set(names)
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][1] == 1  # genai: pruned
    # No weight is duplicated: every external tensor is read from the fused graph's own file(s).
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations and locations == {
        e.value for t in fused.initializer for e in t.external_data if e.key == "location"
    }
    assert (folder / io_spec.GENAI_GRAPH_FILE).stat().st_size < 2 * (folder / io_spec.FUSED_GRAPH_FILE).stat().st_size
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_genai_graph_keeps_the_cache_dtype(fused_genai_exports):
    import onnx

    kinds = {"float32": "FLOAT", "float16": "FLOAT16", "int8": "FLOAT16", "kv32": "FLOAT", "kv8": "INT8"}
    for name, dtype in ((name, getattr(onnx.TensorProto, kind)) for name, kind in kinds.items()):
        graph = onnx.load(str(fused_genai_exports[name] / io_spec.GENAI_GRAPH_FILE), load_external_data=False).graph
        cache = next(i for i in graph.input if i.name == io_spec.past_name(0, "key"))
        assert cache.type.tensor_type.elem_type == dtype


def test_genai_fused_greedy_tokens_equal_reference(fused_genai_exports, tiny_checkpoint):
    assert _genai_greedy(fused_genai_exports["float32"], [PROMPT]) == [_reference_greedy(tiny_checkpoint, PROMPT)]


def test_genai_fused_logits_equal_reference_at_every_step(fused_genai_exports, tiny_checkpoint):
    """Logits, not only their argmax: a cache position or rotary offset off by one moves them."""
    model = og.Model(str(fused_genai_exports["float32"]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    got = []
    while not generator.is_done():
        got.append(np.array(generator.get_logits()).reshape(-1))  # [vocab]: the last token's
        generator.generate_next_token()
    sequence = [int(t) for t in generator.get_sequence(0)]
    reference = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        logits, _ = reference(torch.tensor([sequence[:-1]]))  # [1, T, vocab]
    expected = logits[0, len(PROMPT) - 1 :].numpy()
    assert len(got) == NEW_TOKENS
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("weights", ["int8", "int4", "float16", "kv32", "kv8"])
def test_genai_fused_greedy_tokens_equal_our_fused_session(fused_genai_exports, weights):
    """Lossy weights or caches: genai must agree with our own session over the same graph."""
    folder = fused_genai_exports[weights]
    assert _genai_greedy(folder, [PROMPT], new_tokens=12) == [_fused_greedy(folder, PROMPT, new_tokens=12)]


def test_genai_fused_batch_of_unequal_prompts_is_exact(fused_genai_exports):
    """genai right-pads a batch, as the fused graph wants: each row gets what it gets alone."""
    folder = fused_genai_exports["int8"]
    prompts = [PROMPT, [8, 9, 10], [11, 300, 12, 13]]
    assert _genai_greedy(folder, prompts) == [_fused_greedy(folder, p) for p in prompts]


def test_genai_fused_config_needs_the_wrapper_graph(tiny_export, tiny_model):
    from codegen_deploy.errors import ExportError
    from codegen_deploy.export.genai import genai_config, write_genai_config
    from codegen_deploy.export.genai_graph import write_genai_graph

    with pytest.raises(ExportError, match=io_spec.GENAI_GRAPH_FILE):
        write_genai_config(tiny_export, tiny_model.config, graph="fused")
    with pytest.raises(ExportError, match=io_spec.FUSED_GRAPH_FILE):
        write_genai_graph(tiny_export)  # an export without the fused graph
    with pytest.raises(ExportError, match="unknown genai graph"):
        genai_config(tiny_model.config, graph="fast")
    fused = genai_config(tiny_model.config, graph="fused", max_context=16, threads=2)
    assert fused["search"]["max_length"] == fused["model"]["context_length"] == 16  # the rotary tables' end
    assert fused["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
