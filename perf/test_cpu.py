"""Host benchmarks of the numba_cpu backend beside the strongest host baselines.

Every benchmark checks the result it timed against an independent computation before timing, so a
fast wrong kernel cannot post a number. Groups put a kernel and its baselines side by side.
"""

from __future__ import annotations

import numpy as np
import pytest

import sparsecore as sc

pytest.importorskip("numba", reason="the numba_cpu benchmarks need numba")
sp = pytest.importorskip("scipy.sparse")
torch = pytest.importorskip("torch")

M, K, N = 512, 5632, 2048


def _sparse(rng, m, k, density, dtype=np.float32):
    x = rng.standard_normal((m, k)).astype(dtype)
    x[rng.random((m, k)) >= density] = 0
    return x


@pytest.fixture(scope="module")
def ffn(rng):
    x = _sparse(rng, M, K, 0.01)
    w = rng.standard_normal((K, N)).astype(np.float32)
    return x, w, x @ w


def _check(out, expected, tol=1e-3):
    out = np.asarray(out, dtype=np.float64)
    err = np.max(np.abs(out - expected), initial=0.0) / max(1.0, np.max(np.abs(expected), initial=0.0))
    assert err < tol, f"benchmarked result is wrong: relative error {err:.3g}"


@pytest.mark.parametrize("impl", ["numba_cpu", "scipy_csr", "numpy_dense"])
def test_spmm_99pct(benchmark, ffn, impl):
    x, w, expected = ffn
    benchmark.group = f"spmm f32 M={M} K={K} N={N} 99% sparse"
    benchmark.extra_info.update(op="spmm", impl=impl, nnz=int((x != 0).sum()))
    if impl == "numba_cpu":
        a = sc.tiled_ell_from_dense(x)
        fn = lambda: sc.spmm(a, w, backend="numba_cpu")
    elif impl == "scipy_csr":
        xs = sp.csr_matrix(x)
        fn = lambda: xs @ w
    else:
        fn = lambda: x @ w
    _check(fn(), expected)
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("density", [0.002, 0.005, 0.01, 0.02, 0.05, 0.10])
def test_spmm_density_sweep(benchmark, rng, ffn, density):
    _, w, _ = ffn
    x = _sparse(rng, M, K, density)
    a = sc.tiled_ell_from_dense(x)
    benchmark.group = "spmm f32 density sweep (numba_cpu)"
    benchmark.extra_info.update(op="spmm", impl="numba_cpu", density=density, nnz=int((x != 0).sum()))
    fn = lambda: sc.spmm(a, w, backend="numba_cpu")
    _check(fn(), x @ w)
    benchmark.pedantic(fn, rounds=21, warmup_rounds=2)


B, HQ, HKV, D, S = 4, 32, 8, 128, 32768


@pytest.fixture(scope="module")
def cache(rng):
    k = rng.standard_normal((B, S, HKV, D), dtype=np.float32)
    v = rng.standard_normal((B, S, HKV, D), dtype=np.float32)
    q = rng.standard_normal((B, HQ, D), dtype=np.float32)
    return q, sc.DenseKV(k, v, np.full(B, S, np.int32))


def _sdpa(q, kv):
    tq = torch.from_numpy(q)[:, :, None, :]
    tk = torch.from_numpy(kv.k).permute(0, 2, 1, 3).contiguous()
    tv = torch.from_numpy(kv.v).permute(0, 2, 1, 3).contiguous()
    return lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)[:, :, 0]


@pytest.mark.parametrize("impl", ["numba_cpu_sparse_50x", "numba_cpu_dense", "torch_sdpa_dense"])
def test_decode(benchmark, cache, impl):
    q, kv = cache
    benchmark.group = f"decode f32 B={B} Hq={HQ} Hkv={HKV} D={D} S={S}"
    benchmark.extra_info.update(op="decode", impl=impl)
    if impl == "numba_cpu_sparse_50x":
        index = sc.select_topk(q, kv, S // 50, backend="numba_cpu")
        fn = lambda: sc.sparse_decode(q, kv, index, backend="numba_cpu")[0]
        # the check: the same keys through the reference
        expected = sc.sparse_decode(q, kv, index, backend="reference")[0]
    elif impl == "numba_cpu_dense":
        fn = lambda: sc.dense_decode(q, kv, backend="numba_cpu")[0]
        expected = _sdpa(q, kv)().numpy()
    else:
        fn = _sdpa(q, kv)
        expected = sc.dense_decode(q, kv, backend="numba_cpu")[0]
    _check(np.asarray(fn()), np.asarray(expected, np.float64), tol=1e-4)
    benchmark.pedantic(fn, rounds=5 if "dense" in impl else 15, warmup_rounds=1)


@pytest.mark.parametrize("method", ["exact", "quest", "quest_stored"])
def test_select_topk(benchmark, cache, method):
    """Exact and Quest read every key (Quest computes the pages' min/max from them); Quest with stored
    PageBounds reads 2 / 16 of the key bytes and must pick the same pages."""
    q, kv = cache
    benchmark.group = f"select_topk f32 B={B} Hq={HQ} Hkv={HKV} D={D} S={S} k=S/50"
    benchmark.extra_info.update(op="select_topk", impl=f"numba_cpu_{method}")
    k = S // 50 if method == "exact" else S // 50 // 16
    if method == "quest_stored":
        bounds = sc.page_bounds(kv, 16, backend="numba_cpu")
        fn = lambda: sc.select_topk(q, kv, k, method="quest", bounds=bounds, backend="numba_cpu")
        want = sc.select_topk(q, kv, k, method="quest", page_size=16, backend="reference")
        assert np.array_equal(np.asarray(fn().indices), want.indices)
    else:
        fn = lambda: sc.select_topk(q, kv, k, method=method, backend="numba_cpu")
    idx = fn()
    assert (np.asarray(idx.counts) == k).all()
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["numba_cpu_build", "numba_cpu_decode_step", "numpy_build"])
def test_page_bounds(benchmark, cache, impl):
    """Quest's page bounds: built for the whole cache, and the per-step update (one page per sequence)."""
    _, kv = cache
    benchmark.group = f"page_bounds f32 B={B} Hkv={HKV} D={D} S={S} page=16"
    benchmark.extra_info.update(op="page_bounds", impl=impl)
    pages = kv.k.reshape(B, S // 16, 16, HKV, D)
    want = pages.min(axis=2)
    bounds = sc.page_bounds(kv, 16, backend="numba_cpu")
    assert np.array_equal(bounds.kmin, want) and np.array_equal(bounds.kmax, pages.max(axis=2))
    if impl == "numba_cpu_build":
        fn = lambda: sc.page_bounds(kv, 16, backend="numba_cpu")
    elif impl == "numba_cpu_decode_step":
        start = kv.lengths - 1
        fn = lambda: sc.page_bounds(kv, out=bounds, start=start, backend="numba_cpu")
    else:
        fn = lambda: (pages.min(axis=2), pages.max(axis=2))
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
