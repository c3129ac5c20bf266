"""Tiny inputs for the simulator tier (it costs about 0.2 ms per simulated thread and much more per
barrier): host arrays to compare against the reference, and their Numba device copies.

Caches are poisoned: positions past a sequence's length, the unused rows of its last page and pages
no sequence uses hold NaN, so a kernel that reads one row too many returns NaN.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from sparsecore import CSR, DenseKV, PagedKV, TiledELL, TopKIndex
from sparsecore._arrays import to_host
from sparsecore.formats.convert import csr_from_dense, tiled_ell_from_dense

DTYPES = ("float32", "float16", "bfloat16")
NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dev(x: Any) -> Any:
    """A Numba device copy of a host array, or of every array of a format."""
    from numba import cuda

    if hasattr(x, "map_arrays"):
        return x.map_arrays(lambda a: cuda.to_device(np.require(a, requirements="C")))
    return cuda.to_device(np.require(x, requirements="C"))


def host(x: Any) -> np.ndarray:
    return np.asarray(to_host(x))


def f64(x: Any) -> np.ndarray:
    return host(x).astype(np.float64)


def values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.standard_normal(shape).astype(NP[dtype])


def sparse_dense(rng: np.random.Generator, m: int, k: int, density: float, dtype: str,
                 full_row: bool = False) -> np.ndarray:
    """A dense [m, k] matrix with about ``density`` of its entries non-zero (never exactly 0 after
    rounding), optionally one row entirely non-zero."""
    x = rng.uniform(0.5, 2.0, (m, k)) * rng.choice([-1.0, 1.0], (m, k))
    x[rng.random((m, k)) >= density] = 0.0
    if full_row and m:
        x[0] = rng.uniform(0.5, 2.0, k)
    return x.astype(NP[dtype])


def sparse_format(x: np.ndarray, fmt: str, tile: int, capacity: int) -> TiledELL | CSR:
    return tiled_ell_from_dense(x, tile=tile, capacity=capacity) if fmt == "ell" else csr_from_dense(x)


def kv_cache(rng: np.random.Generator, dtype: str, b: int, s: int, hkv: int, d: int, lengths: list[int],
             paged: bool, page_size: int = 4) -> DenseKV | PagedKV:
    """A dense [b, s] cache, or a paged one holding the same tokens in shuffled pages (one spare
    NaN page; page-table entries past a sequence's pages are -1)."""
    dt = NP[dtype]
    k = values(rng, (b, s, hkv, d), dtype)
    v = values(rng, (b, s, hkv, d), dtype)
    ln = np.asarray(lengths, np.int32)
    for i, n in enumerate(lengths):
        k[i, n:] = np.nan
        v[i, n:] = np.nan
    if not paged:
        return DenseKV(k, v, ln)
    max_pages = cdiv(s, page_size)
    n_pages = b * max_pages + 1
    perm = rng.permutation(n_pages)
    kp = np.full((n_pages, page_size, hkv, d), np.nan, dtype=dt)
    vp = np.full((n_pages, page_size, hkv, d), np.nan, dtype=dt)
    table = np.full((b, max_pages), -1, np.int32)
    for i, n in enumerate(lengths):
        for j in range(cdiv(n, page_size)):
            p = perm[i * max_pages + j]
            table[i, j] = p
            rows = min(page_size, n - j * page_size)
            kp[p, :rows] = k[i, j * page_size:j * page_size + rows]
            vp[p, :rows] = v[i, j * page_size:j * page_size + rows]
    return PagedKV(kp, vp, table, ln)


def random_index(rng: np.random.Generator, lengths: list[int], groups: int, k_max: int,
                 page_size: int | None = None, empty_row: bool = False) -> TopKIndex:
    """A valid TopKIndex: per row a random count <= k_max of distinct tokens (or pages) in range,
    unsorted, padding -1; ``empty_row`` makes row (0, 0) select nothing."""
    b = len(lengths)
    idx = np.full((b, groups, k_max), -1, np.int32)
    cnt = np.zeros((b, groups), np.int32)
    for i, n in enumerate(lengths):
        units = n if page_size is None else cdiv(n, page_size)
        for g in range(groups):
            c = int(rng.integers(0, min(k_max, units) + 1))
            if empty_row and i == 0 and g == 0:
                c = 0
            idx[i, g, :c] = rng.choice(units, size=c, replace=False)
            cnt[i, g] = c
    return TopKIndex(idx, cnt, "token" if page_size is None else "page", page_size)
