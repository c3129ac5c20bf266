"""One compiled pass that says whether a host format satisfies every invariant of its ``validate()``.

``TiledELL.validate``, ``CSR.validate`` and ``TopKIndex.validate`` check their invariants with a
dozen NumPy passes each, which at decode sizes costs tens of microseconds per call, more than the
kernels. When numba is installed and the buffers are NumPy arrays, they first ask the matching
function here: ``True`` means every invariant holds and ``validate`` returns at once; ``False``
(or no numba, or device arrays) runs the NumPy checks, which find the first broken invariant and
name it. So these functions decide nothing alone: they are never less strict than the NumPy checks
(the format tests break each invariant in turn and expect the NumPy message), only faster.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from .._arrays import kind_of, to_numpy

_SIGN_OFF = {2: np.uint16(0x7FFF), 4: np.uint32(0x7FFFFFFF), 8: np.uint64(0x7FFFFFFFFFFFFFFF)}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@functools.cache
def _kernels() -> Any | None:
    """The compiled checks, or None without numba (the NumPy checks then run alone)."""
    try:
        import numba
    except ImportError:
        return None
    if not os.environ.get("NUMBA_CACHE_DIR"):  # the package's cache folder, never the installed package
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        numba.config.CACHE_DIR = os.path.join(base, "sparsecore", "numba")
    njit = numba.njit(cache=True, nogil=True)

    @njit
    def csr_ok(indptr, indices, k, sorted_, stamp):
        m = indptr.shape[0] - 1
        if indptr[0] != 0 or indptr[m] != indices.shape[0]:
            return False
        for r in range(m):
            lo, hi = indptr[r], indptr[r + 1]
            if hi < lo:
                return False
            prev = -1
            for p in range(lo, hi):
                c = indices[p]
                if c < 0 or c >= k:
                    return False
                if sorted_:
                    if c <= prev:
                        return False
                    prev = c
                else:
                    if stamp[c] == r + 1:
                        return False
                    stamp[c] = r + 1
        return True

    @njit
    def tiled_ell_ok(counts, cols, bits, sign_off, tile, k, sorted_, ov_ptr, ov_idx, stamp):
        m, nt, cap = cols.shape
        mark = 0
        for r in range(m):
            for t in range(nt):
                c = counts[r, t]
                if c < 0 or c > cap:
                    return False
                width = min(tile, k - t * tile)
                prev = -1
                mark += 1
                for s in range(cap):
                    off = np.int64(cols[r, t, s])
                    if s < c:
                        if off < 0 or off >= width:
                            return False
                        if sorted_:
                            if off <= prev:
                                return False
                            prev = off
                        else:
                            if stamp[off] == mark:
                                return False
                            stamp[off] = mark
                    elif off != 0 or (bits[r, t, s] & sign_off) != 0:
                        return False
            for p in range(ov_ptr[r], ov_ptr[r + 1]):  # overflow: only entries of full tiles, none held twice
                col = ov_idx[p]
                t = col // tile
                if counts[r, t] < cap:
                    return False
                for s in range(cap):
                    if np.int64(cols[r, t, s]) == col - t * tile:
                        return False
        return True

    @njit
    def topk_ok(indices, counts, units, stamp):
        b_n, g_n, kmax = indices.shape
        mark = 0
        for b in range(b_n):
            n = units[b]
            for g in range(g_n):
                c = counts[b, g]
                if c < 0 or c > kmax:
                    return False
                mark += 1
                for j in range(kmax):
                    i = indices[b, g, j]
                    if j < c:
                        if i < 0 or i >= n or stamp[i] == mark:
                            return False
                        stamp[i] = mark
                    elif i != -1:
                        return False
        return True

    @njit
    def kv_topk_ok(lengths, max_len, indices, counts, unit, stamp):
        units = np.empty(lengths.shape[0], np.int64)  # the cache's lengths, then the index against them
        for b in range(lengths.shape[0]):
            if lengths[b] < 0 or lengths[b] > max_len:
                return False
            units[b] = -(-np.int64(lengths[b]) // unit)
        return topk_ok(indices, counts, units, stamp)

    @njit
    def topk_bounds_ok(indices, counts, lengths, unit):
        b_n, g_n, kmax = indices.shape
        ranges = lengths.shape[0] > 0  # no lengths: the counts only
        for b in range(b_n):
            n = -(-np.int64(lengths[b]) // unit) if ranges else np.int64(0)
            for g in range(g_n):
                c = counts[b, g]
                if c < 0 or c > kmax:
                    return False
                for j in range(c if ranges else 0):
                    i = indices[b, g, j]
                    if i < 0 or i >= n:
                        return False
        return True

    @njit
    def ell_bounds_ok(counts, cols, tile, k):
        m, nt, cap = cols.shape
        for r in range(m):
            for t in range(nt):
                c = counts[r, t]
                if c < 0 or c > cap:
                    return False
                width = min(tile, k - t * tile)
                for s in range(cap):
                    off = np.int64(cols[r, t, s])
                    if off < 0 or off >= width or (s >= c and off != 0):
                        return False
        return True

    @njit
    def start_ok(start, lengths):
        if start.shape[0] != lengths.shape[0]:
            return False
        for b in range(lengths.shape[0]):
            if start[b] < 0 or start[b] > lengths[b]:
                return False
        return True

    @njit
    def lengths_ok(lengths, hi):
        for b in range(lengths.shape[0]):
            if lengths[b] < 0 or lengths[b] > hi:
                return False
        return True

    @njit
    def paged_ok(page_table, lengths, page_size, num_pages):
        max_pages = page_table.shape[1]
        for b in range(lengths.shape[0]):
            n = lengths[b]
            if n < 0 or n > max_pages * page_size:
                return False
            for j in range((n + page_size - 1) // page_size):  # only the pages in use are read
                p = page_table[b, j]
                if p < 0 or p >= num_pages:
                    return False
        return True

    return type("Kernels", (), {"csr_ok": staticmethod(csr_ok), "tiled_ell_ok": staticmethod(tiled_ell_ok),
                                "topk_ok": staticmethod(topk_ok), "kv_topk_ok": staticmethod(kv_topk_ok),
                                "lengths_ok": staticmethod(lengths_ok),
                                "paged_ok": staticmethod(paged_ok),
                                "ell_bounds_ok": staticmethod(ell_bounds_ok),
                                "topk_bounds_ok": staticmethod(topk_bounds_ok), "start_ok": staticmethod(start_ok)})


def _host(*arrays: Any) -> tuple[np.ndarray, ...] | None:
    """NumPy views of host arrays (NumPy, or CPU torch tensors: zero-copy); None when any is on a
    device or of another kind (the NumPy checks then decide)."""
    out = []
    for a in arrays:
        if type(a) is np.ndarray:
            out.append(a)
        elif kind_of(a) == "torch" and a.device.type == "cpu":
            out.append(to_numpy(a))
        else:
            return None
    return tuple(out)


def csr_ok(a: Any) -> bool:
    """True when the host CSR ``a`` holds every invariant of ``CSR.validate``."""
    kern = _kernels()
    arrays = None if kern is None else _host(a.indptr, a.indices)
    if arrays is None:
        return False
    indptr, indices = arrays
    return bool(kern.csr_ok(indptr, indices, int(a.shape[1]), bool(a.sorted),
                            np.zeros(0 if a.sorted else int(a.shape[1]), np.int64)))


def tiled_ell_ok(a: Any) -> bool:
    """True when the NumPy TiledELL ``a`` (and its overflow) holds every invariant of ``TiledELL.validate``."""
    kern = _kernels()
    ov = a.overflow
    arrays = None if kern is None else _host(a.counts, a.cols, a.values,
                                             *(() if ov is None else (ov.indptr, ov.indices)))
    if arrays is None or arrays[2].dtype.itemsize not in _UINT:
        return False
    if ov is not None and not csr_ok(ov):
        return False
    counts, cols, values = arrays[:3]
    size = values.dtype.itemsize
    m = int(a.shape[0])
    ov_ptr = _zeros(m + 1) if ov is None else arrays[3]
    ov_idx = _zeros(0) if ov is None else arrays[4]
    return bool(kern.tiled_ell_ok(counts, cols, values.view(_UINT[size]), _SIGN_OFF[size], int(a.tile),
                                  int(a.shape[1]), bool(a.sorted), ov_ptr, ov_idx,
                                  np.zeros(0 if a.sorted else int(a.tile), np.int64)))


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> np.ndarray:
    """Shared int64 zeros (an empty overflow's pointers): the checks only read them."""
    return np.zeros(n, np.int64)


def topk_ok(index: Any, units: np.ndarray) -> bool:
    """True when the NumPy TopKIndex ``index`` holds every invariant of ``TopKIndex.validate`` with
    ``units[b]`` (int64) the number of selectable units of sequence ``b``."""
    kern = _kernels()
    arrays = None if kern is None else _host(index.indices, index.counts)
    if arrays is None or units.shape != (arrays[0].shape[0],):
        return False
    top = int(units.max()) if units.size else 0
    return bool(kern.topk_ok(arrays[0], arrays[1], units, np.zeros(max(top, 0), np.int64)))


def dense_kv_topk_ok(kv: Any, index: Any) -> bool:
    """True when a host DenseKV's lengths are in ``0..max_len`` and the TopKIndex ``index`` holds
    every invariant of ``TopKIndex.validate`` against them (a sparse decode call's data, one pass)."""
    kern = _kernels()
    arrays = None if kern is None else _host(kv.lengths, index.indices, index.counts)
    if arrays is None or arrays[0].shape != (arrays[1].shape[0],):
        return False
    unit = index.page_size if index.granularity == "page" else 1
    max_len = int(kv.max_len)
    stamp = np.zeros(-(-max_len // unit), np.int64)
    return bool(kern.kv_topk_ok(arrays[0], max_len, arrays[1], arrays[2], unit, stamp))


def topk_bounds_ok(index: Any, lengths: Any = None) -> bool:
    """True when the host TopKIndex ``index`` holds what ``TopKIndex.check_bounds`` checks: counts
    in ``0..k_max`` and, with ``lengths[B]``, every selected index below its sequence's units."""
    kern = _kernels()
    arrays = None if kern is None else _host(index.indices, index.counts,
                                             *(() if lengths is None else (lengths,)))
    if arrays is None or (lengths is not None and arrays[2].shape != (arrays[0].shape[0],)):
        return False
    ln = arrays[2] if lengths is not None else _zeros(0)
    unit = index.page_size if index.granularity == "page" else 1
    return bool(kern.topk_bounds_ok(arrays[0], arrays[1], ln, unit))


def dense_kv_ok(lengths: Any, max_len: int) -> bool:
    """True when every ``lengths[b]`` of a host DenseKV is in ``0..max_len``."""
    kern = _kernels()
    arrays = None if kern is None else _host(lengths)
    return arrays is not None and bool(kern.lengths_ok(arrays[0], max_len))


def paged_kv_ok(page_table: Any, lengths: Any, page_size: int, num_pages: int) -> bool:
    """True when a host PagedKV's lengths are in range and every page id in use is ``0 <= id < P``."""
    kern = _kernels()
    arrays = None if kern is None else _host(page_table, lengths)
    return arrays is not None and bool(kern.paged_ok(arrays[0], arrays[1], page_size, num_pages))


def tiled_ell_bounds_ok(a: Any) -> bool:
    """True when the slots of a host TiledELL are in bounds (``TiledELL.check_bounds`` without the
    overflow: counts in ``0..capacity``, offsets inside their tile, padding offsets 0)."""
    kern = _kernels()
    arrays = None if kern is None else _host(a.counts, a.cols)
    return arrays is not None and bool(kern.ell_bounds_ok(arrays[0], arrays[1], int(a.tile), int(a.shape[1])))


def start_ok(start: np.ndarray, lengths: np.ndarray) -> bool:
    """True when NumPy ``start[B]`` has ``0 <= start[b] <= lengths[b]`` for every sequence."""
    kern = _kernels()
    return kern is not None and start.ndim == 1 and bool(kern.start_ok(start, lengths))
