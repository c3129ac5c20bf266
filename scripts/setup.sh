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
"$py" -c "import sparsecore, numpy, ml_dtypes, hypothesis, torch; print('sparsecore', sparsecore.__version__, 'ready')"
