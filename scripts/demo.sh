#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job on the embedded default, offline:
# make a random CodeGen checkpoint -> export + validate ONNX -> generate -> parity check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu   # what the demo uses: torch, onnxruntime and the base packages
bin=.venv/bin
echo "== 1/4 make a random 'demo' CodeGen checkpoint (HF layout, tokenizer trained here)"
[ -f demo/checkpoint/config.json ] || "$bin/codegen-make-checkpoint" demo/checkpoint --shape demo
echo "== 2/4 export to ONNX, validated against the reference"
"$bin/codegen-export" --model demo/checkpoint --output demo/export --force
echo "== 3/4 generate with ONNX Runtime (random weights: the text is noise, the pipeline is real)"
"$bin/codegen-generate" demo/export "def fibonacci(n):" --max-new-tokens 32
echo
echo "== 4/4 parity: reference PyTorch vs ONNX Runtime on a few prompts"
"$bin/codegen-parity" demo/export --backends torch,onnxruntime --new-tokens 16
