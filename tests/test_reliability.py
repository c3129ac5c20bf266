"""Reliability guarantees that need a process of their own (docs/reliability.md): thread safety under
each numba threading layer, the fuzz run with NUMBA_BOUNDSCHECK=1, no torch import by the ops; and
small cases of issue 13 on every host backend (sddmm with a pattern of another dtype, merge_attention
with D = 0, gradients refused but torch.no_grad() and the torch adapters fine)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import sparsecore as sc
from tests._util import assert_close, backend_takes, host_backend_params
from tests.nonfinite import NP

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = host_backend_params()


def _run(code: str, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    full.pop("SPARSECORE_VALIDATE", None)
    full.pop("SPARSECORE_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


# ---- thread safety -------------------------------------------------------------------------------

_THREADS = """
import sys, threading
import numba
import numpy as np

@numba.njit(parallel=True)
def probe(a):
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s

try:
    probe(np.ones(64))
except Exception as e:  # the layer's library is missing
    print(f"layer unavailable: {e}")
    sys.exit(77)

import sparsecore as sc

rng = np.random.default_rng(0)
x = (rng.standard_normal((256, 4096)) * (rng.random((256, 4096)) < 0.1)).astype(np.float32)
a = sc.pack(x)
w = rng.standard_normal((4096, 64)).astype(np.float32)
k = rng.standard_normal((2, 2048, 2, 64)).astype(np.float32)
kv = sc.DenseKV(k, k, np.array([2048, 1500], np.int32))
q = rng.standard_normal((2, 8, 64)).astype(np.float32)
small = sc.pack(x[:2, :64], tile=16)
calls = {
    "spmm": lambda: sc.spmm(a, w),                           # parallel (work above PARALLEL_MIN_WORK)
    "dense_decode": lambda: sc.dense_decode(q, kv)[0],       # parallel, split
    "spmm_small": lambda: sc.spmm(small, w[:64]),            # one thread
    "pack": lambda: sc.unpack(sc.pack(x[:64])),
}
want = {n: f() for n, f in calls.items()}
errors = []

def work(i):
    try:
        for j in range(6):
            for n, f in calls.items():
                if f().tobytes() != want[n].tobytes():
                    errors.append(f"thread {i}: {n} differs")
    except BaseException as e:
        errors.append(f"thread {i}: {type(e).__name__}: {e}")

threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("layer", numba.threading_layer(), "errors", errors)
sys.exit(1 if errors else 0)
"""


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_concurrent_calls_under_each_threading_layer(layer: str) -> None:
    """Four Python threads call numba_cpu ops at once; each result must equal the single-threaded
    one bit for bit, and the process must not abort (workqueue used to: "Concurrent access has been
    detected"). A layer whose library this machine lacks is skipped, with numba's reason."""
    pytest.importorskip("numba")
    res = _run(_THREADS, {"NUMBA_THREADING_LAYER": layer})
    if res.returncode == 77:
        pytest.skip(f"numba threading layer {layer!r} is not available here: {res.stdout.strip()[-200:]}")
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert f"layer {layer} errors []" in res.stdout


# ---- no out-of-bounds read: the fuzz run with NUMBA_BOUNDSCHECK=1 --------------------------------------

def test_fuzz_with_boundscheck() -> None:
    """tests/fuzz_boundscheck.py on a small budget: numba_cpu against the reference on random valid
    inputs (an out-of-bounds read raises IndexError under NUMBA_BOUNDSCHECK=1) and broken formats
    refused with SPARSECORE_VALIDATE=never. The bounds-checked kernels are cached in a folder of their
    own (the first run compiles them: about 90 s on 2 cores; later runs take seconds)."""
    pytest.importorskip("numba")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    env = {"NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": os.path.join(base, "sparsecore", "numba-boundscheck")}
    res = subprocess.run([sys.executable, "-m", "tests.fuzz_boundscheck", "--cases", "25", "--seed", "13"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert "25 cases x 3 kinds passed (NUMBA_BOUNDSCHECK=1)" in res.stdout


def test_ops_never_import_torch() -> None:
    """The gradient guard looks torch up in sys.modules: a NumPy-only program never imports it."""
    res = _run("""
        import sys
        import numpy as np
        import sparsecore as sc
        a = sc.pack(np.eye(4, dtype=np.float32), tile=4)
        sc.spmm(a, np.ones((4, 2), np.float32))
        sc.dense_decode(np.ones((1, 1, 2), np.float32), sc.DenseKV(np.ones((1, 3, 1, 2), np.float32),
                        np.ones((1, 3, 1, 2), np.float32), np.array([3], np.int32)))
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """, {})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---- issue 13's small cases on every host backend ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sddmm_with_a_pattern_of_another_dtype(backend: str, dtype: str, pattern_dtype: str) -> None:
    """Only the pattern's structure is used, so its dtype may differ from x's; numba_cpu used to read
    a 16-bit pattern through x's 1-entry float32 table (out of bounds)."""
    backend_takes(backend, dtype)
    rng = np.random.default_rng(0)
    dense = (rng.standard_normal((5, 40)) * (rng.random((5, 40)) < 0.3)).astype(NP[pattern_dtype])
    x = rng.standard_normal((5, 6)).astype(NP[dtype])
    w = rng.standard_normal((40, 6)).astype(NP[dtype])
    for pattern in (sc.pack(dense, tile=8, capacity=1), sc.csr_from_dense(dense)):
        got = sc.sddmm(x, w, pattern, backend=backend)
        to_dense = sc.unpack if isinstance(got, sc.TiledELL) else sc.csr_to_dense
        want = (x.astype(np.float64) @ w.astype(np.float64).T) * (dense != 0)
        assert_close(to_dense(got), want, dtype, what="sddmm", scale=np.array(6.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_attention_with_head_dim_0(backend: str) -> None:
    o = np.zeros((2, 3, 0), np.float32)
    l1 = np.array([[0.0, -np.inf, 1.0]] * 2, np.float32)
    l2 = np.array([[1.0, -np.inf, np.nan]] * 2, np.float32)
    out, lse = sc.merge_attention(o, l1, o, l2, backend=backend)
    assert out.shape == (2, 3, 0)
    with np.errstate(invalid="ignore"):
        want = np.logaddexp(l1.astype(np.float64), l2)
    assert_close(lse, want, "float32", what="lse")


def test_gradients_are_refused_but_no_grad_and_the_torch_ops_work() -> None:
    torch = pytest.importorskip("torch")
    import sparsecore.torch as sct

    x = torch.tensor([[0.0, 1.5, 0.0, -2.0]])
    w = torch.ones(4, 2, requires_grad=True)
    a = sc.pack(x, tile=4)
    with pytest.raises(ValueError, match="use sparsecore.torch.spmm, which is differentiable"):
        sc.spmm(a, w)
    with torch.no_grad():
        assert sc.spmm(a, w).tolist() == [[-0.5, -0.5]]
    assert sc.spmm(a, w.detach()).tolist() == [[-0.5, -0.5]]
    y = sct.spmm(sct.pack(x, tile=4), w)                 # the differentiable op: the gradient arrives
    y.sum().backward()
    assert w.grad is not None and w.grad[:, 0].tolist() == [0.0, 1.5, 0.0, -2.0]
