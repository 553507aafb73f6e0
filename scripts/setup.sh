#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and codegen-deploy (CPU extras + test tools).
# A bare `torch` requirement would pull a multi-GB CUDA build, so torch is pinned to the CPU build first.
# Elsewhere than this project's machines, set TORCH_INDEX_URL to PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "== installing torch (CPU build) and codegen-deploy[cpu,genai,serve,ray,test]"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[cpu,genai,serve,ray,test]"
