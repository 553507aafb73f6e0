"""Max |logits| difference between our reference and transformers' CodeGenForCausalLM, per config.

    python benchmarks/reference_parity.py

Random weights written by our converter, loaded by both; a left-padded batch of 3 (prompt), then
4 cached decode steps. Differences are over real (non-padding) positions, float32.
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import table  # noqa: E402

from codegen_deploy.config import PUBLISHED_SHAPES  # noqa: E402
from codegen_deploy.model import CodeGen, load_checkpoint, save_checkpoint  # noqa: E402
from tests.conftest import TEST_CONFIGS  # noqa: E402


@torch.no_grad()
def measure(name, config) -> dict:
    import transformers

    cache_arg = (
        "cache"
        if "cache" in inspect.signature(transformers.CodeGenForCausalLM.forward).parameters
        else ("past_key_values")
    )
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(CodeGen.random(config, seed=3, std=0.02 if name == "350M" else 0.1), folder)
        ours = load_checkpoint(folder)
        theirs = transformers.CodeGenForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    lengths = [12, 7, 3]
    ids = torch.randint(0, config.vocab_size, (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, 12 - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got, past = ours(ids, attention_mask=mask, position_ids=pos)
    out = theirs(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    prompt_diff = (got - out.logits).abs()[mask.bool()].max().item()
    cache = getattr(out, cache_arg)
    step_diff = 0.0
    for _ in range(4):
        token = got[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        got, past = ours(token, attention_mask=mask, position_ids=pos, past_key_values=past)
        out = theirs(token, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg: cache})
        cache = getattr(out, cache_arg)
        step_diff = max(step_diff, (got - out.logits).abs().max().item())
    return {
        "config": name,
        "prompt_max_abs": f"{prompt_diff:.2e}",
        "decode_max_abs": f"{step_diff:.2e}",
        "logits_max": f"{got.abs().max().item():.2f}",
    }


def main() -> None:
    rows = [measure(name, config) for name, config in {**TEST_CONFIGS, "350M": PUBLISHED_SHAPES["350M"]}.items()]
    print(table(rows, list(rows[0])))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
