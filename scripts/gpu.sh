#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (installs nothing): the gpu tier, compute-sanitizer,
# and the GPU benchmarks. Results go to $OUT (default perf/results/gpu-<name>); commit them.
#   bash scripts/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
out=${OUT:-perf/results/gpu-$name}
mkdir -p "$out"
status=0
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -m sparsecore info > "$out/info.txt" 2>&1
# the gpu tier, compute-sanitizer (memcheck, racecheck) included as tests of their own
python3 -m pytest -m gpu tests/gpu -rs -q 2>&1 | tee "$out/gpu-tier.log" | tail -30 || status=1
[ "${PIPESTATUS[0]}" = 0 ] || status=1
python3 -m pytest perf/test_gpu.py --benchmark-only --benchmark-json="$out/gpu-bench.json" -q 2>&1 \
  | tail -40 > "$out/gpu-bench.log"
python3 perf/report.py "$out/gpu-bench.json" > "$out/gpu-bench.md" 2>&1
python3 -m sparsecore bench --json "$out/bench-cli.json" > "$out/bench-cli.txt" 2>&1
tail -5 "$out/gpu-bench.log"
echo "results in $out (gpu tier status $status)"
exit $status
