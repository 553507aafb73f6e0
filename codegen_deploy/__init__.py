"""codegen-deploy: Salesforce CodeGen from a Hugging Face checkpoint to verified ONNX and TensorRT deployments."""

import os

# OpenMP threads that spin while they wait take the cores from each other and from any other job: with one other
# busy process on a 2-core machine, torch at 2 threads ran 6-26x slower (the demo's parity 6-16 s instead of
# 0.5 s; see the README). Waiting passively costs a quiet machine little. OpenMP reads this when torch loads
# its runtime, so it is set here, before any module of the package imports torch: every command, the
# benchmark's children and library use alike. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
