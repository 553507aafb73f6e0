#!/usr/bin/env bash
# The GPU checks of ONNX Runtime's CUDA path in one run, on a machine with an NVIDIA GPU, onnxruntime-gpu and a
# CUDA build of torch. Run from the project root (results go into $OUT):
#   OUT=/tmp/gpu-out bash scripts/gpu_check.sh
# 1. the GPU tests (fp32 TF32-off and fp16 parity, fused vs plain, CUDA graphs on vs off, fp16 export with the
#    fused graph's rotary chosen for CUDA, bfloat16 export validated on the CUDA provider);
# 2. benchmarks/gpu_decode.py on the 350M shape at batch 1 and 8 (and 2B at batch 1 when time allows).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); \
print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu tests/runtime/test_onnxruntime_gpu.py tests/test_pipeline.py -rs 2>&1 | tee "$OUT/tests.txt"
timeout 300 python3 benchmarks/gpu_decode.py --shape 350M --batches 1,8 --output "$OUT/gpu_decode_350M.json" \
  2>&1 | tee "$OUT/bench_350M.txt"
if [ "${GPU_CHECK_2B:-0}" = 1 ]; then
  timeout 300 python3 benchmarks/gpu_decode.py --shape 2B --batches 1 --skip-parity \
    --output "$OUT/gpu_decode_2B.json" 2>&1 | tee "$OUT/bench_2B.txt"
fi
