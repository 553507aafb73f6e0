#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job on the embedded default, offline:
# train a small CodeGen checkpoint (3 minutes, once) -> export + validate ONNX -> generate -> parity check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu   # what the demo uses: torch, onnxruntime and the base packages
bin=.venv/bin
echo "== 1/4 train a small 'demo' CodeGen for 3 minutes on Python's standard library (HF layout; once)"
if [ ! -f demo/checkpoint/training.json ]; then
  rm -rf demo/checkpoint   # a random checkpoint of an older demo
  "$bin/codegen-make-checkpoint" demo/checkpoint --shape demo --train 3
fi
echo "== 2/4 export to ONNX, validated against the reference"
"$bin/codegen-export" --model demo/checkpoint --output demo/export --force
echo "== 3/4 generate with ONNX Runtime (a 4M-parameter model trained for minutes: code-like, not good code)"
"$bin/codegen-generate" demo/export "def fibonacci(n):" --max-new-tokens 32
echo
echo "== 4/4 parity: reference PyTorch vs ONNX Runtime on a few prompts"
"$bin/codegen-parity" demo/export --backends torch,onnxruntime --new-tokens 16
