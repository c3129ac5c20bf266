#!/usr/bin/env bash
# The test command: the host and compile tiers in one pytest process, then the simulator tier in its
# own (NUMBA_ENABLE_CUDASIM must be set before numba is imported). The gpu tier runs where a GPU is:
#   python3 -m pytest -m gpu tests/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest "$@"
NUMBA_ENABLE_CUDASIM=1 python3 -m pytest -m simulator tests/simulator
