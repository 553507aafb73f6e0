"""How often prefix reuse, chunked prompts and speculative decoding change an answer, per export kind.

Each of N requests (windows of Python's own source; greedy and seeded sampling in turn) is answered twice on
the same session: by a fresh engine with nothing cached and whole prompts (the request alone on a fresh
server), and by an engine with the path on:

- reuse: the server's engine (4 rows, 4 cache slots, chunks sized from the costs) after a primer request that
  leaves a cache: the prompt cut at 2/3 of its characters, the same prompt (a re-send), a longer prompt that
  starts with it (text deleted), or a primer cancelled half-way through its prompt.
- chunks: the prompt read in pieces of --chunk tokens next to another row that generates, which is cancelled
  when the prompt is read (so that the request then steps alone, as it did alone).
- batching: the whole prompt, then each step next to another generating row.
- speculation (auto): greedy requests with what --speculate auto gives on this export (prompt lookup where
  speculation is on by default, drafting where its measured acceptance says it pays; nothing where it is off).
- speculation (always): greedy requests with prompt lookup trusted from the start, so that it drafts whenever
  it finds a match: how often a check's rounding parts an answer from plain decoding.

A request "differs" when its tokens differ from the fresh engine's; "logprobs differ" counts requests whose
reported log-probabilities (the model's raw logits) are not bitwise equal, which finds every rounding
difference, also those that did not change a token. Prints a table and one JSON line (the figures of the
README's Exactness section, before and after the rule, are in benchmarks/results/exactness.json).

    python benchmarks/exactness.py --shape demo --requests 48
    python benchmarks/exactness.py --tree /tmp/before     # the same measurement with another checkout's code
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = {"fp32": {}, "fp16": {"dtype": "float16"}, "int8": {"fused_weights": "int8"}, "int4": {"fused_weights": "int4"}}
PATHS = ("reuse", "chunks", "batching", "speculation (auto)", "speculation (always)")
PRIMERS = ("cut", "re-send", "longer", "cancelled")


def prepare(work: Path, shape: str) -> tuple[Path, dict[str, Path]]:
    """A random checkpoint of `shape` and an export of each kind (fused graph, not validated: only agreement
    with itself is measured)."""
    from codegen_deploy.model.make_checkpoint import make_checkpoint
    from codegen_deploy.pipeline import export_model

    checkpoint = work / shape
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, shape=shape, seed=0)
    exports = {}
    for kind, options in KINDS.items():
        out = work / f"{shape}-{kind}"
        if not (out / "manifest.json").exists():
            export_model(checkpoint, out, validate=False, force=True, progress=lambda line: None, **options)
        exports[kind] = out
    return checkpoint, exports


def prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """`count` windows of about `tokens` tokens of Python's own source, each from another file."""
    import ast
    import dataclasses
    import inspect
    import textwrap
    import typing

    text = "".join(inspect.getsource(m) for m in (argparse, ast, dataclasses, json.decoder, textwrap, typing))
    step = len(text) // (count + 1)
    out = []
    for i in range(count):
        ids = tokenizer.encode(text[i * step : i * step + 8 * tokens])[:tokens]
        out.append(tokenizer.decode(ids))
    return out


class Requests:
    """Answers requests on one session with the engines of each path."""

    def __init__(self, session, tokenizer, new_tokens: int, chunk: int):
        self.session, self.tokenizer = session, tokenizer
        self.new_tokens, self.chunk = new_tokens, chunk
        self.eos = set(tokenizer.end_ids)

    def spec(self, text: str, i: int, logprobs: bool = True, max_tokens: int | None = None):
        from codegen_deploy.runtime.engine import RowSpec
        from codegen_deploy.runtime.sampling import SamplingConfig

        sampling = SamplingConfig() if i % 2 == 0 else SamplingConfig(temperature=0.8, top_p=0.95, seed=1950 + i)
        ids = tuple(self.tokenizer.encode(text))
        return RowSpec(ids, max_tokens or self.new_tokens, sampling, logprobs=0 if logprobs else None)

    def run(self, engine, spec, until=None):
        """Run `spec` in `engine` until it ends (or until(row) is true); (tokens, logprobs, row)."""
        from codegen_deploy.runtime.engine import Row

        row = Row(spec, self.tokenizer, self.eos)
        assert engine.add(row)
        return self.run_on(engine, row, until)

    def run_on(self, engine, row, until=None):
        """Step `engine` until `row` ends (or until(row)); the tokens and logprobs it got meanwhile, and the row."""
        start, logprobs = len(row.ids), []
        while row in engine.rows and not (until and until(row)):
            for p in engine.step():
                if p.row is row and p.update is not None and p.update.logprobs:
                    logprobs += p.update.logprobs
        return row.ids[max(start, row.prompt_len) :], logprobs, row

    def alone(self, spec):
        from codegen_deploy.runtime.engine import SlotEngine

        return self.run(SlotEngine(self.session, rows=1), spec)[:2]

    def reuse(self, text: str, i: int):
        from codegen_deploy.runtime.engine import SlotEngine

        engine = SlotEngine(self.session, rows=4, cache_memory=2**30, prefill_chunk=None)
        kind = PRIMERS[i % len(PRIMERS)]
        spec = self.spec(text, i)
        if kind == "cut":
            self.run(engine, self.spec(text[: 2 * len(text) // 3], i + 1, max_tokens=4))
        elif kind == "re-send":
            self.run(engine, spec)
        elif kind == "longer":
            self.run(engine, self.spec(text + "\n\ndef after(x):\n    return x\n", i + 1, max_tokens=4))
        else:
            engine.prefill_chunk = max(self.session.min_piece, len(spec.prompt_ids) // 3)  # stops after a piece
            _, _, row = self.run(engine, self.spec(text, i + 1), until=lambda r: r.computed > 0)
            engine.remove(row)
            engine.prefill_chunk = None
        return self.run(engine, spec)[:2]

    def generating(self, engine):
        """Another row in `engine`, generating (its end token out of reach) once its prompt is read."""
        from codegen_deploy.runtime.engine import Row, RowSpec
        from codegen_deploy.runtime.sampling import SamplingConfig

        endless = SamplingConfig(logit_bias=tuple((t, -100.0) for t in self.eos))
        other = Row(RowSpec(tuple(self.tokenizer.encode("import os\n")), 10_000, endless), self.tokenizer, set())
        engine.add(other)
        while other.reading:
            engine.step()
        return other

    def chunks(self, text: str, i: int):
        from codegen_deploy.runtime.engine import SlotEngine

        engine = SlotEngine(self.session, rows=2, prefill_chunk=self.chunk)
        other = self.generating(engine)
        tokens, logprobs, row = self.run(engine, self.spec(text, i), until=lambda r: not r.reading)
        engine.remove(other)
        rest = self.run_on(engine, row)
        return tokens + rest[0], logprobs + rest[1]

    def batching(self, text: str, i: int):
        from codegen_deploy.runtime.engine import SlotEngine

        engine = SlotEngine(self.session, rows=2)
        other = self.generating(engine)
        result = self.run(engine, self.spec(text, i))[:2]
        engine.remove(other)
        return result

    def speculation(self, text: str, always: bool):
        from codegen_deploy.runtime.engine import SlotEngine
        from codegen_deploy.runtime.sampling import SamplingConfig
        from codegen_deploy.runtime.speculate import Acceptance, make_drafter

        drafter = make_drafter("lookup" if always else "auto", self.session, SamplingConfig())
        if drafter is not None and always:
            for _ in range(20):  # a history of accepted drafts: rows draft from their first round
                Acceptance(history=drafter.history).update(4, 4)
        engine = SlotEngine(self.session, rows=1, drafter=drafter)
        return self.run(engine, self.spec(text, 0, logprobs=False))[:2]

    def answer(self, path: str, text: str, i: int):
        if path.startswith("speculation"):
            return self.speculation(text, always="always" in path)
        return getattr(self, path)(text, i)


def measure(args) -> list[dict]:
    from codegen_deploy.model.tokenizer import load_tokenizer
    from codegen_deploy.runtime import open_session

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, exports = prepare(work, args.shape)
    tokenizer = load_tokenizer(checkpoint)
    texts = prompts(tokenizer, args.requests, args.prompt_tokens)
    rows = []
    for kind in args.kinds:
        with open_session("onnxruntime", exports[kind], threads=args.threads) as session:
            requests = Requests(session, tokenizer, args.new_tokens, args.chunk)
            for path in PATHS:
                differ = logprobs_differ = 0
                for i, text in enumerate(texts):
                    greedy_only = path.startswith("speculation")
                    expected = requests.alone(requests.spec(text, 0 if greedy_only else i, logprobs=not greedy_only))
                    got = requests.answer(path, text, i)
                    differ += got[0] != expected[0]
                    logprobs_differ += got[1] != expected[1]
                    print(f"{kind} {path} {i + 1}/{len(texts)}: {differ} differ", file=sys.stderr, flush=True)
                rows.append(
                    {
                        "kind": kind,
                        "path": path,
                        "requests": len(texts),
                        "differ": differ,
                        "logprobs differ": "" if path.startswith("speculation") else logprobs_differ,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="demo", help="checkpoint shape (make_checkpoint's): demo, 350M, ...")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--chunk", type=int, default=24, help="prompt tokens per piece in the chunks path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "codegen-exactness"))
    parser.add_argument("--tree", type=Path, help="measure another checkout's code (its codegen_deploy)")
    args = parser.parse_args()
    if args.tree is not None:
        site = Path(tempfile.mkdtemp(prefix="site-"))
        drop_editable = '[f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]'
        (site / "sitecustomize.py").write_text(f"import sys\nsys.meta_path[:] = {drop_editable}\n")
        env = dict(os.environ, PYTHONPATH=f"{site}:{args.tree.resolve()}")
        argv = list(sys.argv[1:])
        at = argv.index("--tree")
        del argv[at : at + 2]
        sys.exit(subprocess.call([sys.executable, __file__, *argv], env=env))
    from common import table

    rows = measure(args)
    print(table(rows, ["kind", "path", "requests", "differ", "logprobs differ"]))
    print(json.dumps({"shape": args.shape, "rows": rows}))


if __name__ == "__main__":
    main()
