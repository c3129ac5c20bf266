"""Conversions between dense, TiledELL, CSR, scipy.sparse and torch sparse CSR (host arrays).

These are explicit, user-called conversions on NumPy arrays; the ``pack``/``unpack`` ops are the
dispatched, any-backend way to go between dense and TiledELL.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import BFLOAT16, VALUE_DTYPES, from_numpy, kind_of, to_host
from .._checks import check_dtype, check_ndim, fail
from .csr import CSR
from .tiled_ell import TiledELL, check_tile_capacity

__all__ = [
    "tiled_ell_from_mask", "tiled_ell_from_dense", "tiled_ell_to_dense", "tiled_ell_entries",
    "csr_from_dense", "csr_to_dense", "csr_from_entries", "tiled_ell_to_csr", "csr_to_tiled_ell",
    "csr_to_scipy", "csr_from_scipy", "csr_to_torch", "csr_from_torch",
]


def tiled_ell_from_mask(x: np.ndarray, keep: np.ndarray, tile: int, capacity: int) -> TiledELL:
    """TiledELL of ``x`` at the positions where ``keep`` is true: per (row, tile), the first
    ``capacity`` kept columns in ascending order go to the slots, the rest to the overflow CSR."""
    m, k = x.shape
    nt = -(-k // tile)
    kpad = nt * tile
    keep_p = np.zeros((m, kpad), dtype=bool)
    keep_p[:, :k] = keep
    keep_t = keep_p.reshape(m, nt, tile)
    rank = np.cumsum(keep_t, axis=2, dtype=np.int64) - 1  # rank of each kept column inside its tile
    in_slot = keep_t & (rank < capacity)
    r, t, off = np.nonzero(in_slot)
    values = np.zeros((m, nt, capacity), dtype=x.dtype)
    cols = np.zeros((m, nt, capacity), dtype=np.int16)
    s = rank[r, t, off]
    values[r, t, s] = x[r, t * tile + off]
    cols[r, t, s] = off
    counts = np.minimum(keep_t.sum(axis=2), capacity).astype(np.int32)
    over = keep_t & (rank >= capacity)
    overflow = None
    if over.any():
        orow, ocol = np.nonzero(over.reshape(m, kpad))  # row-major: rows then ascending columns
        overflow = csr_from_entries(orow, ocol, x[orow, ocol], (m, k))
    return TiledELL(values, cols, counts, (m, k), tile, overflow)


def tiled_ell_from_dense(x: Any, tile: int = 256, capacity: int | None = None) -> TiledELL:
    """Lossless TiledELL of the non-zeros of a dense host matrix ``x[M, K]``."""
    w = "tiled_ell_from_dense"
    x = to_host(x)
    check_ndim(w, "x", x, 2, "[M, K]")
    check_dtype(w, "x", x, VALUE_DTYPES)
    tile, capacity = check_tile_capacity(w, tile, max(tile // 8, 1) if capacity is None else capacity)
    return tiled_ell_from_mask(x, x != 0, tile, capacity)


def tiled_ell_entries(a: TiledELL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, global cols, values) of every stored entry, slots first then overflow (host)."""
    counts = to_host(a.counts)
    cols = to_host(a.cols).astype(np.int64)
    vals = to_host(a.values)
    filled = np.arange(a.capacity)[None, None, :] < counts[:, :, None]
    r, t, s = np.nonzero(filled)
    rows = r.astype(np.int64)
    gcols = t.astype(np.int64) * a.tile + cols[r, t, s]
    v = vals[r, t, s]
    if a.overflow is not None:
        orow, ocol, ov = csr_entries(a.overflow)
        rows, gcols, v = np.concatenate([rows, orow]), np.concatenate([gcols, ocol]), np.concatenate([v, ov])
    return rows, gcols, v


def csr_entries(c: CSR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr = to_host(c.indptr).astype(np.int64)
    rows = np.repeat(np.arange(c.shape[0], dtype=np.int64), np.diff(indptr))
    return rows, to_host(c.indices).astype(np.int64), to_host(c.data)


def tiled_ell_to_dense(a: TiledELL) -> np.ndarray:
    rows, cols, vals = tiled_ell_entries(a)
    out = np.zeros(a.shape, dtype=to_host(a.values).dtype)
    out[rows, cols] = vals
    return out


def csr_from_entries(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int],
                     index_dtype: Any = np.int32) -> CSR:
    """CSR from unique (row, col, value) entries in any order; sorted by row, then column."""
    order = np.lexsort((cols, rows))
    counts = np.bincount(rows, minlength=shape[0]) if len(rows) else np.zeros(shape[0], np.int64)
    if max(shape[1], len(rows)) >= 2**31:
        index_dtype = np.int64
    indptr = np.zeros(shape[0] + 1, dtype=index_dtype)
    np.cumsum(counts, out=indptr[1:])
    return CSR(indptr, cols[order].astype(index_dtype), np.ascontiguousarray(vals[order]), shape)


def csr_from_dense(x: Any) -> CSR:
    w = "csr_from_dense"
    x = to_host(x)
    check_ndim(w, "x", x, 2, "[M, K]")
    check_dtype(w, "x", x, VALUE_DTYPES)
    r, c = np.nonzero(x)
    return csr_from_entries(r, c, x[r, c], x.shape)


def csr_to_dense(c: CSR) -> np.ndarray:
    rows, cols, vals = csr_entries(c)
    out = np.zeros(c.shape, dtype=vals.dtype)
    out[rows, cols] = vals
    return out


def tiled_ell_to_csr(a: TiledELL) -> CSR:
    rows, cols, vals = tiled_ell_entries(a)
    return csr_from_entries(rows, cols, vals, a.shape)


def csr_to_tiled_ell(c: CSR, tile: int = 256, capacity: int | None = None) -> TiledELL:
    """Lossless TiledELL of a CSR's entries (explicit zeros are kept as entries)."""
    w = "csr_to_tiled_ell"
    tile, capacity = check_tile_capacity(w, tile, max(tile // 8, 1) if capacity is None else capacity)
    rows, cols, vals = csr_entries(c)
    m, k = c.shape
    nt = -(-k // tile)
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    group = rows * nt + cols // tile
    start = np.searchsorted(group, group, side="left")  # first entry of each entry's (row, tile)
    rank = np.arange(len(group)) - start
    slot = rank < capacity
    values = np.zeros((m, nt, capacity), dtype=vals.dtype)
    ecols = np.zeros((m, nt, capacity), dtype=np.int16)
    r, t, s = rows[slot], cols[slot] // tile, rank[slot]
    values[r, t, s] = vals[slot]
    ecols[r, t, s] = cols[slot] % tile
    counts = np.zeros((m, nt), dtype=np.int32)
    np.add.at(counts, (r, t), 1)
    ov = ~slot
    overflow = csr_from_entries(rows[ov], cols[ov], vals[ov], (m, k)) if ov.any() else None
    return TiledELL(values, ecols, counts, (m, k), tile, overflow)


def csr_to_scipy(c: CSR) -> Any:
    import scipy.sparse as sp

    data = to_host(c.data)
    if data.dtype in (BFLOAT16, np.float16):
        fail("csr_to_scipy", f"data has dtype {data.dtype}, which scipy.sparse does not support; "
                             "cast to float32 first", TypeError)
    return sp.csr_matrix((data, to_host(c.indices), to_host(c.indptr)), shape=c.shape)


def csr_from_scipy(s: Any) -> CSR:
    import scipy.sparse as sp

    if not sp.issparse(s):
        fail("csr_from_scipy", f"expected a scipy.sparse matrix, got {type(s).__name__}", TypeError)
    s = s.tocsr()
    sorted_ = bool(s.has_sorted_indices)
    return CSR(s.indptr, s.indices, s.data, tuple(s.shape), sorted=sorted_)


def csr_to_torch(c: CSR) -> Any:
    import torch

    def t(a: Any) -> Any:
        return a if kind_of(a) == "torch" else from_numpy(np.ascontiguousarray(to_host(a)), "torch")

    return torch.sparse_csr_tensor(t(c.indptr), t(c.indices), t(c.data), size=c.shape)


def csr_from_torch(s: Any) -> CSR:
    import torch

    if kind_of(s) != "torch" or s.layout != torch.sparse_csr:
        fail("csr_from_torch", f"expected a torch sparse CSR tensor, got {type(s).__name__} "
                               f"with layout {getattr(s, 'layout', None)}", TypeError)
    return CSR(s.crow_indices(), s.col_indices(), s.values(), tuple(s.shape))

