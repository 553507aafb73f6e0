"""CPU anchors: our ONNX Runtime decode against llama.cpp (on a stand-in GGUF of CodeGen's shape) and
onnxruntime-genai, round-robin, on the same CPU threads.

llama.cpp has no CodeGen architecture, so it runs a stand-in: a `gptneox` GGUF with CodeGen's dimensions
(n_embd, n_layer, n_head, n_inner, rotary_dim, 51,200-token padded vocab, layer-norm epsilon, parallel
residual), random float32 weights (fixed seed) and the checkpoint's GPT-2 BPE tokenizer; llama-quantize makes
q8_0, q4_0 and f16 from it (--pure: every matrix in the named type, the output head included). The stand-in
differs from CodeGen only in small things: GPT-NeoX keeps a second layer norm per block (CodeGen shares one)
and biases on the attention projections, and rotates NeoX-style halves instead of GPT-J's pairs.
Random weights make the text irrelevant; the shapes and bytes are what count.

Formats (ours <-> llama.cpp): fp32 <-> f32, int8 <-> q8_0, int4 <-> q4_0, and f16 (llama.cpp only).
Runners, each (runner, format) once per round in a fresh process, --rounds rounds, medians reported:
  ours       codegen-bench --backends onnxruntime-fused on a codegen-export folder (--quantize int8|int4)
  llama.cpp  llama-bench (prompt of --contexts' last length: TTFT; text generation at each context depth)
             and llama-batched-bench (-npp first context -ntg --new-tokens -npl --batches: S_TG total tok/s)
  genai      onnxruntime-genai on the same export folder (whatever graph its genai_config.json names), batch 1
llama.cpp is built once from the llama-cpp-python source distribution on PyPI (it vendors llama.cpp) into
~/.cache/codegen-deploy/llama.cpp/<version>/ (needs cmake and a C++ compiler; several minutes on 2 cores).
The JSON also records the machine (CPU model, AVX2 / AVX-512 / VNNI, cores), versions, the GGUF and export
sizes, and a memory read bandwidth (numpy max of a 2 GB int32 array, split over --threads threads), and the
roofline: per decode figure, the bytes a step reads (weights but the embedding, plus the KV cache of the
context), ms per token and the share of the bandwidth bound (bytes x tok/s / bandwidth).

    python benchmarks/cpu_anchors.py                      # makes the checkpoint, exports, GGUFs under --work
    python benchmarks/cpu_anchors.py --rounds 1 --contexts 128,256 --new-tokens 16 --batches 1,4   # quick check
    python benchmarks/cpu_anchors.py --skip-llama-cpp --formats fp32,int8

Writes benchmarks/results/cpu_anchors.json and cpu_anchors.png (matplotlib: pip install "codegen-deploy[bench]").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMATS = {  # ours -> (codegen-export --quantize, llama.cpp GGUF type, codegen-export --kv-cache)
    "fp32": (None, "f32", "float32"),
    "int8": ("int8", "q8_0", "float32"),  # each cache named: codegen-export's default under --quantize is float16
    "int4": ("int4", "q4_0", "float32"),
    "int8-kv16": ("int8", "q8_0", "float16"),  # ours only: the same weights over a narrower cache
    "int4-kv16": ("int4", "q4_0", "float16"),
    "int8-kv8": ("int8", "q8_0", "int8"),
    "int4-kv8": ("int4", "q4_0", "int8"),
    "f16": (None, "f16", None),  # llama.cpp only
}
LLAMA_ONLY = {"f16"}
OURS_ONLY = {f for f in FORMATS if "-kv" in f}  # llama.cpp runs each GGUF type once, under the plain name
LLAMA_TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
CACHE = Path.home() / ".cache" / "codegen-deploy" / "llama.cpp"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- llama.cpp: find or build ------------------------------------------------------------------------------


def _complete(bin_dir: Path) -> bool:
    return all((bin_dir / tool).is_file() for tool in LLAMA_TOOLS)


def find_or_build_llama_cpp(cache: Path = CACHE, version: str | None = None) -> tuple[Path | None, str]:
    """(the bin folder with llama-bench, llama-batched-bench and llama-quantize, its llama-cpp-python version), or
    (None, why not). A cached build is reused (the given version's, else the newest); otherwise the newest (or the
    given) llama-cpp-python sdist is downloaded from PyPI and its vendored llama.cpp built: CPU only, Release,
    native instructions, no curl / OpenSSL."""
    cached = sorted(
        (d for d in cache.glob("*") if _complete(d / "build" / "bin") and (version is None or d.name == version)),
        key=lambda d: [int(p) if p.isdigit() else 0 for p in d.name.split(".")],
    )
    if cached:
        return cached[-1] / "build" / "bin", cached[-1].name
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        return None, f"cannot build llama.cpp: {', '.join(missing)} not found"
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        log(f"[llama.cpp] downloading the {spec} source distribution from PyPI ...")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                spec,
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                tmp,
            ],
            capture_output=True,
            text=True,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            return None, f"cannot download llama-cpp-python: {(proc.stderr or proc.stdout).strip()[-300:]}"
        found = sdists[0].name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
        root = cache / found
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            # the "data" filter (no links out, no devices) where this Python has it (3.10.12+)
            tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    source = root / f"llama_cpp_python-{found}" / "vendor" / "llama.cpp"
    build = root / "build"
    configure = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    compile_ = ["cmake", "--build", str(build), "--target", *LLAMA_TOOLS, "-j", str(os.cpu_count() or 1)]
    start = time.perf_counter()
    for step in (configure, compile_):
        log(f"[llama.cpp] {' '.join(step[:3])} ... (log: {build}.log)")
        with open(f"{build}.log", "a") as out:
            if subprocess.run(["nice", "-n", "10", *step], stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                return None, f"building llama.cpp failed: see {build}.log"
    log(f"[llama.cpp] built {found} in {time.perf_counter() - start:.0f} s: {build / 'bin'}")
    return build / "bin", found


# --- the stand-in GGUF ---------------------------------------------------------------------------------------


def _tokenizer_vocab(checkpoint: Path, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the checkpoint's GPT-2 BPE tokenizer, padded to n_vocab as CodeGen's
    embedding is (51,200 rows for 50,295 tokens)."""
    path = checkpoint / "tokenizer.json"
    if path.is_file():
        body = json.loads(path.read_text())
        vocab = dict(body["model"]["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in body["model"]["merges"]]
        special = {a["content"] for a in body.get("added_tokens", []) if a.get("special")}
        for added in body.get("added_tokens", []):
            vocab.setdefault(added["content"], added["id"])
    else:
        vocab = json.loads((checkpoint / "vocab.json").read_text())
        lines = (checkpoint / "merges.txt").read_text().splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        special = {"<|endoftext|>"}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # unused
        else:
            tokens.append(token)
            types.append(3 if token in special else 1)  # control / normal
    return tokens, types, merges


def write_standin_gguf(checkpoint: Path, path: Path, seed: int = 0) -> dict:
    """A float32 `gptneox` GGUF with the CodeGen checkpoint's dimensions, random weights and its tokenizer;
    tensors are streamed (no copy of the whole model in memory). Returns the dimensions used."""
    import gguf
    import numpy as np

    cfg = json.loads((checkpoint / "config.json").read_text())
    n_embd, n_layer, n_head = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
    n_ff = cfg.get("n_inner") or 4 * n_embd
    n_vocab = cfg["vocab_size"]
    dims = {
        "arch": "gptneox",
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_ff": n_ff,
        "n_ctx": cfg.get("n_positions", cfg.get("n_ctx", 2048)),
        "rope_dims": cfg.get("rotary_dim") or n_embd // n_head,
        "n_vocab": n_vocab,
        "eps": cfg.get("layer_norm_epsilon", 1e-5),
        "parallel_residual": True,
        "seed": seed,
    }
    tensors: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", (n_embd,)),
            (b + "attn_norm.bias", (n_embd,)),
            (b + "attn_qkv.weight", (3 * n_embd, n_embd)),
            (b + "attn_qkv.bias", (3 * n_embd,)),
            (b + "attn_output.weight", (n_embd, n_embd)),
            (b + "attn_output.bias", (n_embd,)),
            (b + "ffn_norm.weight", (n_embd,)),
            (b + "ffn_norm.bias", (n_embd,)),
            (b + "ffn_up.weight", (n_ff, n_embd)),
            (b + "ffn_up.bias", (n_ff,)),
            (b + "ffn_down.weight", (n_embd, n_ff)),
            (b + "ffn_down.bias", (n_embd,)),
        ]
    tensors += [
        ("output_norm.weight", (n_embd,)),
        ("output_norm.bias", (n_embd,)),
        ("output.weight", (n_vocab, n_embd)),
    ]

    tokens, types, merges = _tokenizer_vocab(checkpoint, n_vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "gptneox")
    w.add_name(f"codegen stand-in {checkpoint.name}")
    w.add_context_length(dims["n_ctx"])
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_rope_dimension_count(dims["rope_dims"])
    w.add_head_count(n_head)
    w.add_parallel_residual(True)
    w.add_layer_norm_eps(dims["eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = cfg.get("eos_token_id", 50256)
    w.add_bos_token_id(cfg.get("bos_token_id", eos))
    w.add_eos_token_id(eos)
    for name, shape in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in tensors:
        if name.endswith("norm.weight"):
            data = np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            data = np.zeros(shape, np.float32)
        else:
            data = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        w.write_tensor_data(data)
    w.close()
    tmp.replace(path)
    return dims


def prepare_ggufs(bin_dir: Path, checkpoint: Path, work: Path, types: list[str], threads: int) -> dict[str, Path]:
    """GGUF type -> file: the f32 stand-in, and llama-quantize's --pure copies in the other types (made if missing)."""
    folder = work / f"{checkpoint.name}-gguf"
    f32 = folder / "standin-f32.gguf"
    if not f32.is_file():
        t = time.perf_counter()
        dims = write_standin_gguf(checkpoint, f32)
        log(f"[prepare] stand-in {f32} ({f32.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s: {dims}")
    out = {"f32": f32}
    for kind in types:
        if kind == "f32":
            continue
        path = folder / f"standin-{kind}.gguf"
        if not path.is_file():
            t = time.perf_counter()
            cmd = [
                str(bin_dir / "llama-quantize"),
                "--pure",
                str(f32),
                str(path.with_suffix(".tmp")),
                kind.upper(),
                str(threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            path.with_suffix(".tmp").replace(path)
            log(f"[prepare] {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
        out[kind] = path
    return out


# --- our exports ---------------------------------------------------------------------------------------------


def prepare_exports(checkpoint: Path | None, work: Path, formats: list[str], tokenizer: Path) -> tuple[Path, dict]:
    """(checkpoint, format -> export folder). fp32 is decode_speed.py's export (plain + fused graph); int8 and
    int4 are `codegen-export --quantize` folders (the fused graph quantized, genai_config.json included)."""
    from decode_speed import prepare

    checkpoint, fp32 = prepare(work, checkpoint, tokenizer)
    exports = {"fp32": fp32}
    for fmt in formats:
        quantize, _, cache = FORMATS[fmt]
        if quantize is None:
            continue
        folder = work / f"{checkpoint.name}-onnx-{fmt}"
        if not (folder / "manifest.json").is_file():
            t = time.perf_counter()
            cmd = [
                sys.executable,
                "-m",
                "codegen_deploy.cli.export",
                "--model",
                str(checkpoint),
                "--output",
                str(folder),
                "--quantize",
                quantize,
                "--kv-cache",
                cache,
                "--no-validate",
                "--force",
            ]
            if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed")
            log(f"[prepare] {folder} in {time.perf_counter() - t:.0f} s")
        exports[fmt] = folder
    return checkpoint, exports


def graph_weight_bytes(graph: Path) -> dict:
    """Bytes of the initializers of an ONNX graph (external data counted by its recorded length): in all, and
    where each lives (a fused graph of a codegen-export folder shares the fp32 embedding with decoder.onnx)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    where: dict[str, int] = {}
    embedding = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in init.external_data}
            place, size = ext["location"], int(ext.get("length", 0))
        else:
            place, size = graph.name, len(init.raw_data) or int(onnx.numpy_helper.to_array(init).nbytes)
        where[place] = where.get(place, 0) + size
        embedding += size if init.name == "wte.weight" else 0
    total = sum(where.values())
    return {"total": total, "by_file": where, "without_embedding": total - embedding}


def kv_bytes_per_token(export: Path) -> int:
    """Bytes one token's keys and values take in an export's fused-graph cache (every layer)."""
    from codegen_deploy.artifacts.io_spec import cache_dtype
    from codegen_deploy.artifacts.manifest import manifest_config, read_manifest
    from codegen_deploy.dtypes import numpy_dtype

    manifest = read_manifest(export, verify="none")
    c = manifest_config(manifest)
    itemsize = numpy_dtype(cache_dtype(manifest["fused_inputs"], str(export))).itemsize
    return 2 * c.n_layer * c.n_embd * itemsize


def roofline(rows: list[dict], sizes: dict, bandwidth: float, llama_kv: int) -> list[dict]:
    """Per batch-1 decode figure of ours and llama.cpp: the bytes a step reads (the weights but the embedding's
    one row, and the KV cache of `context` tokens), seconds per token, and that rate's share of the measured
    read bandwidth (bytes x tok/s / bandwidth: 1.0 is the memory bound)."""
    out = []
    for r in rows:
        if r["batch"] != 1 or "decode_tok_s" not in r or r["runner"] not in ("ours", "llama.cpp"):
            continue
        if r["runner"] == "ours":
            size = sizes["ours"].get(r["format"])
            weights, kv = (
                (size["fused_graph_weight_bytes"]["without_embedding"], size["kv_bytes_per_token"])
                if size
                else (None, None)
            )
        else:
            size = sizes["llama.cpp"].get(r["format"])
            weights, kv = (size["tensors_without_token_embd"], llama_kv) if size else (None, None)
        if weights is None:
            continue
        step = weights + kv * r["context"]
        out.append(
            {
                "runner": r["runner"],
                "format": r["format"],
                "context": r["context"],
                "bytes_per_token": step,
                "kv_bytes": kv * r["context"],
                "ms_per_token": 1e3 / r["decode_tok_s"],
                "share_of_bound": step * r["decode_tok_s"] / (bandwidth * 1e9),
            }
        )
    return out


def gguf_bytes(path: Path) -> dict:
    """A GGUF's file size and its tensor bytes without token_embd (a row lookup, not read per token)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    return {
        "file": path.stat().st_size,
        "tensors": sum(tensors.values()),
        "tensors_without_token_embd": sum(tensors.values()) - tensors.get("token_embd.weight", 0),
    }


def genai_graph(export: Path) -> str | None:
    """The graph file the export's genai_config.json names (what onnxruntime-genai runs)."""
    try:
        return json.loads((export / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    except (OSError, KeyError, ValueError):
        return None


# --- runners (each in a fresh process) -----------------------------------------------------------------------


def run_ours(export: Path, contexts: list[int], batches: list[int], new_tokens: int, threads: int) -> list[dict]:
    """codegen-bench's fused backend: batch 1 at each context, and each larger batch at the first context."""
    rows = []
    for batch in batches:
        prompts = contexts if batch == 1 else contexts[:1]
        cmd = [
            sys.executable,
            "-m",
            "codegen_deploy.cli.bench",
            str(export),
            "--backends",
            "onnxruntime-fused",
            "--json",
            "--threads",
            str(threads),
            "--batch",
            str(batch),
            "--prompt-tokens",
            ",".join(map(str, prompts)),
            "--new-tokens",
            str(new_tokens),
            "--repeats",
            "1",
            "--verify",
            "size",
        ]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit code {proc.returncode})")
        for r in json.loads(proc.stdout):
            rows.append(
                {
                    "batch": batch,
                    "context": r["prompt_tokens"],
                    "ttft_s": r["ttft_s"],
                    "decode_tok_s": r["decode_tok_s"],
                    "peak_rss_bytes": r.get("peak_rss_bytes"),
                }
            )
            if batch > 1:  # all rows' tokens per second, as llama-batched-bench's S_TG
                rows[-1]["batched_decode_tok_s"] = rows[-1].pop("decode_tok_s")
    return rows


def genai_worker(spec: dict) -> dict:
    """In a fresh process: onnxruntime-genai on an export folder, batch 1, greedy over a random prompt; TTFT is
    append_tokens plus the first generate_next_token, decode tok/s leaves that first step out (as codegen-bench)."""
    import numpy as np
    import onnxruntime_genai as og

    from codegen_deploy.memory import peak_rss_bytes

    config = og.Config(spec["export"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": spec["threads"]}}}}))
    t = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t
    rows = []
    for context in spec["contexts"]:
        prompt = np.random.default_rng(0).integers(0, spec["vocab"], (1, context), dtype=np.int32)
        length = context + spec["new_tokens"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        first = time.perf_counter()
        generator.generate_next_token()  # the first decode step, left out as codegen-bench does
        second = time.perf_counter()
        steps = 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        end = time.perf_counter()
        rows.append(
            {
                "batch": 1,
                "context": context,
                "ttft_s": first - start,
                "decode_tok_s": steps / (end - second) if steps else None,
                "first_step_s": second - first,
            }
        )
        del generator
    return {"load_s": load_s, "rows": rows, "peak_rss_bytes": peak_rss_bytes()}


def run_genai(export: Path, contexts: list[int], new_tokens: int, threads: int, vocab: int) -> list[dict]:
    spec = {"export": str(export), "contexts": contexts, "new_tokens": new_tokens, "threads": threads, "vocab": vocab}
    proc = subprocess.run(
        [sys.executable, __file__, "--genai-worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the genai worker failed (exit code {proc.returncode})")
    result = json.loads(lines[-1])
    graph = genai_graph(export)  # what ran: a quantized folder may still name the float32 graph
    return [{**r, "peak_rss_bytes": result["peak_rss_bytes"], "graph": graph} for r in result["rows"]]


def run_llama(
    bin_dir: Path, gguf_path: Path, contexts: list[int], batches: list[int], new_tokens: int, threads: int
) -> tuple[list[dict], list[dict]]:
    """llama-bench (pp of the longest context: TTFT; tg of new_tokens at each context depth) and llama-batched-bench
    (npp = first context, ntg = new_tokens, npl = batches). Returns (rows, the tools' raw records)."""
    t = str(threads)
    bench = [str(bin_dir / "llama-bench"), "-m", str(gguf_path), "-t", t, "-ngl", "0", "-r", "1", "-o", "json"]
    pp = [*bench, "-p", str(max(contexts)), "-n", "0"]
    tg = [*bench, "-p", "0", "-n", str(new_tokens), "-d", ",".join(map(str, contexts))]
    raw, rows = [], []
    for cmd in (pp, tg):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        records = json.loads(proc.stdout)
        raw += records
        for r in records:
            if r["n_gen"] == 0:
                rows.append(
                    {"batch": 1, "context": r["n_prompt"], "ttft_s": r["avg_ns"] / 1e9, "prompt_tok_s": r["avg_ts"]}
                )
            else:
                rows.append({"batch": 1, "context": r["n_depth"], "decode_tok_s": r["avg_ts"]})
    n_kv = max(batches) * (contexts[0] + new_tokens)
    bb = [
        str(bin_dir / "llama-batched-bench"),
        "-m",
        str(gguf_path),
        "-t",
        t,
        "-tb",
        t,
        "-ngl",
        "0",
        "-c",
        str(n_kv),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(contexts[0]),
        "-ntg",
        str(new_tokens),
        "-npl",
        ",".join(map(str, batches)),
        "--output-format",
        "jsonl",
    ]
    proc = subprocess.run(bb, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(bb)} failed:\n{proc.stderr[-2000:]}")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    if not lines:  # its log goes to stdout or stderr depending on the version
        raise RuntimeError(f"{' '.join(bb)} printed no jsonl results:\n{proc.stderr[-2000:]}")
    for line in lines:
        r = json.loads(line)
        raw.append(r)
        # S_TG: every row's generated tokens over the generation time; the batch-1 row is the same workload
        # as llama-bench's tg at the first context and is kept apart (batched_decode_tok_s).
        rows.append(
            {
                "batch": r["pl"],
                "context": r["pp"],
                "batched_decode_tok_s": r["speed_tg"],
                "batched_ttft_s": r["t_pp"],
            }
        )
    return rows, raw


# --- machine -------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    from codegen_deploy.config import max_threads

    return {
        "cpu": cpu,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx": "amx_tile" in flags,
        "cores_usable": max_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "memory_read_gb_s": read_bandwidth(threads),
    }


def read_bandwidth(threads: int, gigabytes: float = 2.0, repeats: int = 5) -> dict:
    """Memory read bandwidth: the max of a `gigabytes` array read as int32, one slice per thread (numpy drops the
    GIL there; a max is one vector compare per load, so it streams where a float sum's pairwise adds do not
    quite), best of `repeats`. Simple and stated; a STREAM-like bound, not a peak."""
    import numpy as np

    a = np.ones(int(gigabytes * 1e9 / 4), np.int32)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    return {
        "gb_s": a.nbytes / best / 1e9,
        "method": f"numpy int32 max of {a.nbytes / 1e9:.1f} GB, {threads} threads, best of {repeats}",
    }


def versions(llama_version: str | None, bin_dir: Path | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "numpy", "gguf", "codegen-deploy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["llama-cpp-python (llama.cpp source)"] = llama_version
    if bin_dir is not None:
        proc = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True)
        out["llama.cpp"] = (proc.stdout + proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else None
    return out


# --- report --------------------------------------------------------------------------------------------------

METRICS = ("ttft_s", "prompt_tok_s", "decode_tok_s", "batched_decode_tok_s", "batched_ttft_s", "peak_rss_bytes")


def medians(raw: list[dict]) -> list[dict]:
    """One row per (runner, format, batch, context): the median of each metric over rounds."""
    groups: dict[tuple, list[dict]] = {}
    for r in raw:
        groups.setdefault((r["runner"], r["format"], r["batch"], r["context"]), []).append(r)
    out = []
    for (runner, fmt, batch, context), rows in groups.items():
        row = {
            "runner": runner,
            "format": fmt,
            "batch": batch,
            "context": context,
            "rounds": len({r["round"] for r in rows}),
        }
        for m in METRICS:
            values = [r[m] for r in rows if r.get(m) is not None]
            if values:
                row[m] = statistics.median(values)
        if "graph" in rows[0]:
            row["graph"] = rows[0]["graph"]
        out.append(row)
    return sorted(out, key=lambda r: (r["runner"], list(FORMATS).index(r["format"]), r["batch"], r["context"]))


def plot(rows: list[dict], contexts: list[int], batches: list[int], path: Path) -> None:
    """Bars per format, grouped by runner: decode tok/s at the first and last context (batch 1), TTFT at the last,
    and all rows' decode tok/s at the largest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners = sorted({r["runner"] for r in rows})
    formats = [f for f in FORMATS if any(r["format"] == f for r in rows)]
    panels = [
        (f"decode tok/s at context {contexts[0]}", "decode_tok_s", contexts[0], 1, 1),
        (f"decode tok/s at context {contexts[-1]}", "decode_tok_s", contexts[-1], 1, 1),
        (f"TTFT ms, {contexts[-1]}-token prompt", "ttft_s", contexts[-1], 1, 1e3),
    ]
    if batches[-1] > 1:
        panels.append(
            (f"all rows' decode tok/s, batch {batches[-1]}", "batched_decode_tok_s", contexts[0], batches[-1], 1)
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    width = 0.8 / max(1, len(formats))
    for ax, (title, key, context, batch, scale) in zip(axes, panels, strict=True):
        for j, fmt in enumerate(formats):
            values = []
            for runner in runners:
                match = [
                    r
                    for r in rows
                    if (r["runner"], r["format"], r["batch"], r["context"]) == (runner, fmt, batch, context)
                    and key in r
                ]
                values.append(match[0][key] * scale if match else 0)
            ax.bar([i + j * width for i in range(len(runners))], values, width, label=fmt)
        ax.set_xticks([i + width * (len(formats) - 1) / 2 for i in range(len(runners))], runners)
        ax.set_title(title)
    axes[0].legend(title="format")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def file_sizes(folder: Path) -> dict:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.suffix in (".onnx", ".data", ".gguf")}


def main(argv: list[str] | None = None) -> int:
    from codegen_deploy.config import max_threads

    def threads_arg(text: str) -> int:
        value = int(text)
        if not 1 <= value <= max_threads():
            raise argparse.ArgumentTypeError(f"must be from 1 to {max_threads()} (the cores here), got {value}")
        return value

    def int_list(text: str) -> list[int]:
        values = [int(v) for v in text.split(",") if v.strip()]
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
        return values

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a CodeGen checkpoint (default: make a random 350M one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/codegen-decode-speed"), help="where to make files")
    p.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "data" / "codegen-350M-mono-tokenizer")
    p.add_argument("--threads", type=threads_arg, default=min(2, max_threads()))
    p.add_argument(
        "--rounds", type=lambda t: int_list(t)[0], default=3, help="rounds of every (runner, format) (default 3)"
    )
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated of {', '.join(FORMATS)}")
    p.add_argument("--contexts", type=int_list, default=[128, 1024], help="prompt / depth tokens (default 128,1024)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per run (default 128)")
    p.add_argument("--batches", type=int_list, default=[1, 4, 8], help="batch sizes at the first context (1,4,8)")
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--skip-genai", action="store_true")
    p.add_argument("--llama-cpp-version", help="llama-cpp-python version whose llama.cpp to build (default: newest)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "cpu_anchors.json")
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "cpu_anchors.png")
    p.add_argument("--genai-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.genai_worker:
        print(json.dumps(genai_worker(json.loads(args.genai_worker))))
        return 0
    rounds = args.rounds
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if unknown := set(formats) - set(FORMATS):
        p.error(f"unknown formats {', '.join(sorted(unknown))}: choose from {', '.join(FORMATS)}")
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3")
    contexts = sorted(set(args.contexts))
    batches = sorted(set(args.batches))
    if 1 not in batches:
        batches = [1, *batches]
    skipped = {}
    if not args.skip_genai:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            skipped["genai"] = "onnxruntime-genai is not installed (pip install 'codegen-deploy[genai]')"
    else:
        skipped["genai"] = "--skip-genai"

    args.work.mkdir(parents=True, exist_ok=True)
    ours_formats = [f for f in formats if f not in LLAMA_ONLY]
    checkpoint, exports = prepare_exports(args.checkpoint, args.work, ours_formats, args.tokenizer)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]

    bin_dir, llama_version, ggufs = None, None, {}
    if args.skip_llama_cpp:
        skipped["llama.cpp"] = "--skip-llama-cpp"
    else:
        bin_dir, found = find_or_build_llama_cpp(version=args.llama_cpp_version)
        if bin_dir is None:
            skipped["llama.cpp"] = found
        else:
            llama_version = found
            ggufs = prepare_ggufs(bin_dir, checkpoint, args.work, [FORMATS[f][1] for f in formats], args.threads)
    for runner, why in skipped.items():
        log(f"[skip] {runner}: {why}")

    from codegen_deploy.artifacts.io_spec import FUSED_GRAPH_FILE

    sizes = {
        "ours": {
            f: {
                "fused_graph_weight_bytes": graph_weight_bytes(exports[f] / FUSED_GRAPH_FILE),
                "kv_bytes_per_token": kv_bytes_per_token(exports[f]),
                "files": file_sizes(exports[f]),
                "genai_runs": genai_graph(exports[f]),
            }
            for f in ours_formats
        },
        "llama.cpp": {
            f: gguf_bytes(ggufs[FORMATS[f][1]]) for f in formats if FORMATS[f][1] in ggufs and f not in OURS_ONLY
        },
    }
    for f, s in sizes["ours"].items():
        log(
            f"[sizes] ours {f}: fused graph weights {s['fused_graph_weight_bytes']['by_file']}; genai runs "
            f"{s['genai_runs']}"
        )
    for f, s in sizes["llama.cpp"].items():
        log(f"[sizes] llama.cpp {FORMATS[f][1]}: {s}")
    machine = machine_info(args.threads)
    log(
        f"[machine] {machine['cpu']}, {machine['cores_usable']} cores, AVX2 {machine['avx2']}, AVX-512 "
        f"{machine['avx512f']}, VNNI {machine['avx512_vnni'] or machine['avx_vnni']}; read bandwidth "
        f"{machine['memory_read_gb_s']['gb_s']:.1f} GB/s"
    )

    jobs = []
    for fmt in formats:
        if fmt not in LLAMA_ONLY:
            jobs.append(("ours", fmt))
            if "genai" not in skipped:
                jobs.append(("genai", fmt))
        if bin_dir is not None and fmt not in OURS_ONLY:
            jobs.append(("llama.cpp", fmt))
    raw, llama_raw, failed = [], [], {}
    began = time.perf_counter()
    for rnd in range(rounds):
        for runner, fmt in jobs:
            if (runner, fmt) in failed:
                continue
            t = time.perf_counter()
            try:
                if runner == "ours":
                    rows = run_ours(exports[fmt], contexts, batches, args.new_tokens, args.threads)
                elif runner == "genai":
                    rows = run_genai(exports[fmt], contexts, args.new_tokens, args.threads, vocab)
                else:
                    rows, records = run_llama(
                        bin_dir, ggufs[FORMATS[fmt][1]], contexts, batches, args.new_tokens, args.threads
                    )
                    llama_raw += [{"round": rnd, "format": fmt, **r} for r in records]
            except RuntimeError as e:
                failed[(runner, fmt)] = str(e)
                log(f"[round {rnd + 1}/{rounds}] {runner} {fmt} failed: {e}")
                continue
            raw += [{"round": rnd, "runner": runner, "format": fmt, **r} for r in rows]
            summary = ", ".join(
                f"b{r['batch']}@{r['context']}: "
                + " ".join(f"{k}={r[k]:.3g}" for k in ("ttft_s", "decode_tok_s", "batched_decode_tok_s") if r.get(k))
                for r in rows
            )
            log(
                f"[round {rnd + 1}/{rounds}] {runner} {fmt} ({time.perf_counter() - t:.0f} s, "
                f"{time.perf_counter() - began:.0f} s in all): {summary}"
            )

    rows = medians(raw)
    from common import table

    columns = ["runner", "format", "batch", "context", "ttft_s", "decode_tok_s", "batched_decode_tok_s", "rounds"]
    shown = [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(table(shown, columns))
    config = json.loads((checkpoint / "config.json").read_text())
    llama_kv = 2 * config["n_layer"] * config["n_embd"] * 2  # llama.cpp's default float16 cache
    bound = roofline(rows, sizes, machine["memory_read_gb_s"]["gb_s"], llama_kv)
    columns = ["runner", "format", "context", "bytes_per_token", "ms_per_token", "share_of_bound"]
    shown = [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()} for r in bound]
    print(f"\nroofline (read bandwidth {machine['memory_read_gb_s']['gb_s']:.1f} GB/s):")
    print(table(shown, columns))
    report = {
        "checkpoint": str(checkpoint),
        "exports": {f: str(e) for f, e in exports.items()},
        "ggufs": {k: str(v) for k, v in ggufs.items()},
        "llama_cpp_bin": str(bin_dir) if bin_dir else None,
        "workload": {
            "threads": args.threads,
            "rounds": rounds,
            "contexts": contexts,
            "new_tokens": args.new_tokens,
            "batches": batches,
            "formats": formats,
        },
        "notes": {
            "ttft_s": "ours / genai: prompt forward + first token; llama.cpp: llama-bench pp of the prompt",
            "decode_tok_s": "batch 1, tokens generated after `context` prompt (llama.cpp: tg at depth `context`); "
            "ours and genai leave the first decode step out",
            "genai": "onnxruntime-genai runs the graph the folder's genai_config.json names (results' `graph`)",
            "batched_decode_tok_s": "llama-batched-bench S_TG: all rows' generated tokens / generation time; "
            "ours at batch > 1: codegen-bench decode_tok_s (also over all rows)",
        },
        "machine": machine,
        "versions": versions(llama_version, bin_dir),
        "sizes": sizes,
        "skipped": skipped,
        "failed": {f"{r}/{f}": e for (r, f), e in failed.items()},
        "results": rows,
        "roofline": bound,
        "raw": raw,
        "llama_cpp_raw": llama_raw,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json}")
    if rows:
        try:
            plot(rows, contexts, batches, args.plot)
            log(f"wrote {args.plot}")
        except ImportError:
            log('no plot: matplotlib is not installed (pip install "codegen-deploy[bench]")')
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
