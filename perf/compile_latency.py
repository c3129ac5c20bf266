"""Cold and warm first call of every op on numba_cpu, each in a fresh process.

    python perf/compile_latency.py [--dtype float32] [--ops spmm,pack] [--json perf/results/<machine>/compile.json]

Cold: an empty ``NUMBA_CACHE_DIR`` (a new temporary folder per op), so the first call compiles.
Warm: a second fresh process on the folder the cold one filled, so the first call loads from the cache.
Per op, the first call is :func:`sparsecore.warmup.example_calls`' first (decode size, no overflow).
Reported per process: ``import sparsecore``, ``import numba`` (timed on its own, before the call), the
first call (with building its inputs: milliseconds of NumPy, and for ``sparse_decode`` a reference
``select_topk`` whose compiled data check is numba's first use), and each kernel compiled with its seconds
(numba's ``numba:compile`` event). The first call a user sees is ``numba_s + first_call_s``.
The last row is numba's floor: the same two processes for a one-line cached ``njit`` function, no
sparsecore (import numba, then the first call; warm, that call only loads the function and starts numba's
compiler and type registries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import sparsecore
t_import = time.perf_counter() - t0
from sparsecore import warmup as w
op, dtype = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
import numba
t_numba = time.perf_counter() - t0
w.install_compile_notice(None)
t0 = time.perf_counter()
label, call = w.example_calls(op, dtype)[0]  # in the timed part: some inputs are built by a checked op
call()
t_call = time.perf_counter() - t0
t0 = time.perf_counter()
call()
t_second = time.perf_counter() - t0
print(json.dumps({"op": op, "dtype": dtype, "call": label, "import_s": t_import, "numba_s": t_numba,
                  "first_call_s": t_call, "second_call_s": t_second,
                  "compiled": [[r.kernel, r.seconds] for r in w.compile_log()]}))
"""

# numba's own floor: the first call of a one-line cached function (no sparsecore) in a fresh process
FLOOR = r"""
import json, os, sys, time
import numpy as np
t0 = time.perf_counter()
import numba
t_numba = time.perf_counter() - t0
sys.path.insert(0, sys.argv[1])
from sc_floor_kernel import total
t0 = time.perf_counter()
total(np.ones(3))
print(json.dumps({"numba_s": t_numba, "first_call_s": time.perf_counter() - t0}))
"""


def floor(cache: str) -> tuple[dict, dict]:
    """Cold and warm first call of ``x.sum()`` in an ``njit(cache=True)`` function: what any numba
    kernel costs a fresh process, whatever it computes."""
    with open(os.path.join(cache, "sc_floor_kernel.py"), "w") as f:
        f.write("import numba\n\n\n@numba.njit(cache=True)\ndef total(x):\n    return x.sum()\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    out = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", FLOOR, cache], env=env, capture_output=True, text=True,
                             check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


def measure(op: str, dtype: str, cache: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    res = subprocess.run([sys.executable, "-c", CHILD, op, dtype], env=env, capture_output=True, text=True,
                         check=False)
    if res.returncode:
        raise RuntimeError(f"{op} {dtype}: child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    from sparsecore.ops.table import OPS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", help="value dtype (default: float32)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    rows = []
    print(f"{'op':<16}{'cold first call s':>18}{'warm first call s':>18}{'second call ms':>15}  kernels compiled "
          "(cold: s each)", flush=True)
    for op in [o for o in args.ops.split(",") if o]:
        with tempfile.TemporaryDirectory(prefix="sc-numba-cache-") as cache:
            cold = measure(op, args.dtype, cache)
            warm = measure(op, args.dtype, cache)
        rows.append({"op": op, "cold": cold, "warm": warm})
        kern = ", ".join(f"{k} {s:.1f}" for k, s in cold["compiled"])
        print(f"{op:<16}{cold['numba_s'] + cold['first_call_s']:>18.2f}{warm['numba_s'] + warm['first_call_s']:>18.2f}"
              f"{warm['second_call_s'] * 1e3:>15.2f}  {kern}  (warm compiled {len(warm['compiled'])})", flush=True)
    with tempfile.TemporaryDirectory(prefix="sc-numba-floor-") as cache:
        cold, warm = floor(cache)
    rows.append({"op": "(numba floor: x.sum())", "cold": cold, "warm": warm})
    print(f"{'numba floor':<16}{cold['numba_s'] + cold['first_call_s']:>18.2f}"
          f"{warm['numba_s'] + warm['first_call_s']:>18.2f}  (a one-line cached njit function, no sparsecore)",
          flush=True)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"python": sys.version, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
