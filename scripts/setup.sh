#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and codegen-deploy with the extras given (default: everything the
# tests need: cpu,genai,serve,ray,test; scripts/demo.sh asks for cpu only).
# A bare `torch` requirement would pull a multi-GB CUDA build, so torch is pinned to the CPU build first.
# Elsewhere than this project's machines, set TORCH_INDEX_URL to PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-cpu,genai,serve,ray,test}
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip

# pip with its progress (what it collects, downloads and installs), without the "already satisfied" lines of a
# venv that has it all.
pip_install() {
  .venv/bin/python -m pip install "$@" 2>&1 | { grep --line-buffered -v "^Requirement already satisfied" || true; }
}

if .venv/bin/python -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "== torch 2.13.0 (CPU build) is installed"
else
  echo "== installing torch 2.13.0 (CPU build, a ~190 MB wheel)"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip_install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    pip_install "torch==2.13.0"
  fi
fi
echo "== installing codegen-deploy[$EXTRAS]"
pip_install -e ".[$EXTRAS]"
