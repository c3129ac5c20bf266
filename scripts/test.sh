#!/usr/bin/env bash
# The test command: every tier runs, whatever the one before it did, then one summary line per tier;
# the exit status is non-zero when any tier failed.
#   host + compile: one pytest process (arguments given to this script go to it)
#   simulator:      numba_cuda kernels under NUMBA_ENABLE_CUDASIM=1 (set before numba is imported)
# The gpu tier runs where a GPU is: python3 -m pytest -m gpu tests/gpu (scripts/gpu.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
names=()
codes=()
times=()

tier() {  # tier NAME COMMAND...: run it, keep its exit status and seconds
  local name=$1 start=$SECONDS code
  shift
  echo "=== tier $name: $*"
  "$@"
  code=$?
  names+=("$name")
  codes+=("$code")
  times+=("$((SECONDS - start))")
}

tier "host+compile" python3 -m pytest "$@"
tier simulator env NUMBA_ENABLE_CUDASIM=1 python3 -m pytest -m simulator tests/simulator

failed=0
echo "=== summary"
for i in "${!names[@]}"; do
  if [ "${codes[$i]}" -eq 0 ]; then verdict=passed; else verdict="FAILED (exit ${codes[$i]})"; failed=1; fi
  printf 'tier %-13s %s in %ss\n' "${names[$i]}" "$verdict" "${times[$i]}"
done
exit "$failed"
