"""Every bad input gets its exception type and its message pinned.

Each case is one row: ``case(id, exception, regex, call)``. The regex pins the function name, the
argument, the bad value and what is allowed; literal text goes through :func:`lit` / :func:`parts`
(``re.escape``). The fixtures below are small valid objects (checked by ``test_fixtures_are_valid``)
that each case breaks in exactly one way, so the error must come from that one change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import sparsecore as sc
from sparsecore import CSR, DenseKV, PageBounds, PagedKV, TiledELL, TopKIndex

F32, F64, F16, I16, I32, I64 = np.float32, np.float64, np.float16, np.int16, np.int32, np.int64
VALUES = "allowed: float64, float32, float16, bfloat16"


def lit(msg: str) -> str:
    """The whole message, literally."""
    return "^" + re.escape(msg) + "$"


def parts(*pieces: str) -> str:
    """Literal pieces in this order, anything (newlines too) between; the first starts the message."""
    return "(?s)^" + ".*".join(re.escape(p) for p in pieces)


def _a(v: Any, dtype: Any, batch: bool = False) -> Any:
    """Arrays pass unchanged; nested tuples become an array of ``dtype`` (``batch``: one row of a batch)."""
    return v if hasattr(v, "shape") else np.array([v] if batch else v, dtype)


# --- fixtures: one small valid object each ------------------------------------------------------
# TiledELL [1, 10], tile 8, capacity 2: tile 0 is full (offsets 0, 5), tile 1 is partial (width 2)
# and holds offset 1 (column 9) in slot 0; slot 1 is padding.
def ell(values: Any = ((1, 2), (3, 0)), cols: Any = ((0, 5), (1, 0)), counts: Any = (2, 1), *,
        shape: Any = (1, 10), tile: Any = 8, overflow: Any = None, sorted: bool = True, vdtype: Any = F32) -> TiledELL:
    return TiledELL(_a(values, vdtype, True), _a(cols, I16, True), _a(counts, I32, True), shape, tile, overflow,
                    sorted)


# CSR [2, 5]: row 0 holds columns 1, 3; row 1 holds column 0.
def csr(indptr: Any = (0, 2, 3), indices: Any = (1, 3, 0), data: Any = (1, 2, 3), *, shape: Any = (2, 5),
        sorted: bool = True, idtype: Any = I32, vdtype: Any = F32) -> CSR:
    return CSR(_a(indptr, idtype), _a(indices, idtype), _a(data, vdtype), shape, sorted)


def over(col: int, val: float = 7.0, dtype: Any = F32) -> CSR:
    """A one-entry overflow CSR for :func:`ell` (row 0, column ``col``)."""
    return csr((0, 1), (col,), (val,), shape=(1, 10), vdtype=dtype)


def arr(*shape: int, dtype: Any = F32) -> np.ndarray:
    return np.ones(shape, dtype)


# Decode: B 1, Hq 4, Hkv 2, D 4. Dense cache S 8; paged cache P 3 pages of 4 (max_pages 3, 12 tokens).
def q(b: int = 1, hq: int = 4, d: int = 4, dtype: Any = F32) -> np.ndarray:
    return np.linspace(-1, 1, b * hq * d).reshape(b, hq, d).astype(dtype)


def dkv(lengths: Any = (8,), *, shape: tuple[int, ...] = (1, 8, 2, 4), dtype: Any = F32, vdtype: Any = None,
        vshape: Any = None) -> DenseKV:
    k = np.linspace(-1, 1, int(np.prod(shape))).reshape(shape).astype(dtype)
    v = arr(*(vshape or shape), dtype=vdtype or dtype)
    return DenseKV(k, v, _a(lengths, I32))


def pkv(page_table: Any = ((0, 1, -1),), lengths: Any = (8,), *, shape: tuple[int, ...] = (3, 4, 2, 4),
        vshape: Any = None) -> PagedKV:
    k = np.linspace(-1, 1, int(np.prod(shape))).reshape(shape).astype(F32)
    return PagedKV(k, arr(*(vshape or shape)), _a(page_table, I32), _a(lengths, I32))


# PageBounds of dkv() in pages of 4: [B 1, P 2, Hkv 2, D 4].
def pb(shape: tuple[int, ...] = (1, 2, 2, 4), page_size: Any = 4, dtype: Any = F32) -> PageBounds:
    return PageBounds(arr(*shape, dtype=dtype), arr(*shape, dtype=dtype), page_size)


def read_only_pb() -> PageBounds:
    b = pb()
    b.kmin.flags.writeable = False
    return b


# TopKIndex [B 1, G 2, k_max 3]: rows select {0, 1} and {2, 3}; slot 2 is padding.
def topk(indices: Any = ((0, 1, -1), (2, 3, -1)), counts: Any = (2, 2), granularity: str = "token",
         page_size: Any = None) -> TopKIndex:
    return TopKIndex(_a(indices, I32, True), _a(counts, I32, True), granularity, page_size)


X = np.array([[0, 1.5, 0, -2, 0, 0, 3, 0]] * 2, F32)  # pack's input [2, 8]
W = arr(10, 3)  # spmm's weight [K, N] for ell()
O, LSE = arr(2, 4), np.zeros(2, F32)  # merge_attention's partials [2, D], [2]


def meta(x: Any) -> Any:
    """A torch 'meta' tensor (shape and dtype, no data) of an array or of every array of a format."""
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to("meta")
    return x.map_arrays(f) if hasattr(x, "map_arrays") else f(x)


def cpu(x: Any) -> Any:
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return x.map_arrays(f) if hasattr(x, "map_arrays") else f(x)


def case(id: str, exc: type[Exception], regex: str, call: Callable[[], Any], *, env: dict[str, str] | None = None,
         xfail: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(call, exc, regex, env or {}, id=id, marks=marks)


V, T = ValueError, TypeError
ELL_SHAPES = "(a has shape (1, 10))"

CASES = [
    # --- pack ------------------------------------------------------------------------------------
    case("pack-x-ndim", V, lit("pack: x has shape (8,); expected 2 dimensions [M, K]"), lambda: sc.pack(X[0])),
    case("pack-x-not-array", T, lit("pack: x must be an array (NumPy, torch, CuPy or Numba device array), got list"),
         lambda: sc.pack([[1.0]])),
    case("pack-x-int32", T, lit(f"pack: x has dtype int32; {VALUES}"), lambda: sc.pack(X.astype(I32))),
    case("pack-threshold-negative", V, lit("pack: threshold = -0.5; must be a finite number >= 0"),
         lambda: sc.pack(X, threshold=-0.5)),
    case("pack-threshold-nan", V, lit("pack: threshold = nan; must be a finite number >= 0"),
         lambda: sc.pack(X, threshold=float("nan"))),
    case("pack-activation-unknown", V, lit("pack: activation = 'gelu'; allowed: None, 'relu'"),
         lambda: sc.pack(X, activation="gelu")),
    case("pack-tile-not-pow2", V, lit("pack: tile = 12; must be a power of two between 2 and 32768"),
         lambda: sc.pack(X, tile=12)),
    case("pack-tile-not-pow2-numpy-int", V, lit("pack: tile = 12; must be a power of two between 2 and 32768"),
         lambda: sc.pack(X, tile=np.int64(12))),
    case("pack-tile-too-large", V, lit("pack: tile = 65536; must be <= 32768"), lambda: sc.pack(X, tile=65536)),
    case("pack-tile-too-small", V, lit("pack: tile = 1; must be >= 2"), lambda: sc.pack(X, tile=1)),
    case("pack-tile-float", T, lit("pack: tile must be an int, got 8.0 (float)"), lambda: sc.pack(X, tile=8.0)),
    case("pack-capacity-zero", V, lit("pack: capacity = 0; must be >= 1"), lambda: sc.pack(X, tile=8, capacity=0)),
    case("pack-capacity-over-tile", V, lit("pack: capacity = 9; must be <= tile = 8"),
         lambda: sc.pack(X, tile=8, capacity=9)),
    case("pack-capacity-float", T, lit("pack: capacity must be an int, got 2.0 (float)"),
         lambda: sc.pack(X, tile=8, capacity=2.0)),
    # --- unpack ----------------------------------------------------------------------------------
    case("unpack-csr", T, lit("unpack: a must be a TiledELL, got CSR"), lambda: sc.unpack(csr())),
    case("unpack-dense", T, lit("unpack: a must be a TiledELL, got ndarray"), lambda: sc.unpack(X)),
    case("unpack-data-counts-over-capacity", V,
         lit("TiledELL.validate: counts[0, 1] = 3; allowed 0 <= count <= capacity = 2"),
         lambda: sc.unpack(ell(counts=(2, 3)))),
    # --- spmm: arguments -------------------------------------------------------------------------
    case("spmm-a-dense", T, lit("spmm: a must be a TiledELL or a CSR, got ndarray; convert a dense matrix with "
                                "sparsecore.pack"), lambda: sc.spmm(X, W)),
    case("spmm-w-ndim", V, lit("spmm: w has shape (10,); expected 2 dimensions [K, N]"),
         lambda: sc.spmm(ell(), W[:, 0])),
    case("spmm-w-rows", V, lit(f"spmm: w has shape (9, 3); expected w.shape[0] == K = 10 {ELL_SHAPES}"),
         lambda: sc.spmm(ell(), W[:9])),
    case("spmm-w-int32", T, lit(f"spmm: w has dtype int32; {VALUES}"), lambda: sc.spmm(ell(), W.astype(I32))),
    case("spmm-w-float64-a-float32", T, lit("spmm: a has dtype float32 but w has float64; they must match"),
         lambda: sc.spmm(ell(), W.astype(F64))),
    case("spmm-numpy-and-torch", T, lit("spmm: all arrays must come from one library: a.values is numpy, "
                                        "a.cols is numpy, a.counts is numpy, w is torch"),
         lambda: sc.spmm(ell(), cpu(W))),
    case("spmm-cpu-and-meta", V, lit("spmm: all arrays must be on one device: a.values on cpu, a.cols on cpu, "
                                     "a.counts on cpu, w on meta"), lambda: sc.spmm(cpu(ell()), meta(W))),
    # --- spmm: TiledELL data, checked by the op itself -------------------------------------------
    case("ell-col-past-tile", V, lit("TiledELL.validate: cols[0, 0, 1] = 8 is out of range; tile 0 has columns "
                                     "0 <= offset < 8 (tile = 8, K = 10)"),
         lambda: sc.spmm(ell(cols=((0, 8), (1, 0))), W)),
    case("ell-col-past-K-partial-tile", V, lit("TiledELL.validate: cols[0, 1, 0] = 2 is out of range; tile 1 has "
                                               "columns 0 <= offset < 2 (tile = 8, K = 10)"),
         lambda: sc.spmm(ell(cols=((0, 5), (2, 0))), W)),
    case("ell-col-negative", V, lit("TiledELL.validate: cols[0, 0, 0] = -1 is out of range; tile 0 has columns "
                                    "0 <= offset < 8 (tile = 8, K = 10)"),
         lambda: sc.spmm(ell(cols=((-1, 5), (1, 0))), W)),
    case("ell-duplicate-in-tile", V, lit("TiledELL.validate: tile [0, 0] has duplicate offsets 5, 5 in slots 0, 1; "
                                         "filled slots must be strictly ascending (or pass sorted=False)"),
         lambda: sc.spmm(ell(cols=((5, 5), (1, 0))), W)),
    case("ell-unsorted", V, lit("TiledELL.validate: tile [0, 0] has descending offsets 5, 0 in slots 0, 1; "
                                "filled slots must be strictly ascending (or pass sorted=False)"),
         lambda: sc.spmm(ell(cols=((5, 0), (1, 0))), W)),
    case("ell-duplicate-unsorted-flag", V,
         lit("TiledELL.validate: tile [0, 0] holds offset 5 in slots 0 and 1; filled slots must hold distinct offsets"),
         lambda: sc.spmm(ell(cols=((5, 5), (1, 0)), sorted=False), W)),
    case("ell-padding-value", V, lit("TiledELL.validate: padding slot [0, 1, 1] (past counts = 1) holds offset 0 "
                                     "and value 7.0; padding must be offset 0 and value 0"),
         lambda: sc.spmm(ell(values=((1, 2), (3, 7))), W)),
    case("ell-padding-offset", V, lit("TiledELL.validate: padding slot [0, 1, 1] (past counts = 1) holds offset 1 "
                                      "and value 0.0; padding must be offset 0 and value 0"),
         lambda: sc.spmm(ell(cols=((0, 5), (1, 1))), W)),
    case("ell-counts-over-capacity", V, lit("TiledELL.validate: counts[0, 1] = 3; allowed 0 <= count <= capacity = 2"),
         lambda: sc.spmm(ell(counts=(2, 3)), W)),
    case("ell-counts-negative", V, lit("TiledELL.validate: counts[0, 1] = -1; allowed 0 <= count <= capacity = 2"),
         lambda: sc.spmm(ell(counts=(2, -1)), W)),
    case("ell-overflow-in-tile-not-full", V,
         lit("TiledELL.validate: overflow entry (row 0, column 8) belongs to tile 1 which is not full (counts = 1 < "
             "capacity = 2); overflow holds only entries of full tiles"),
         lambda: sc.spmm(ell(overflow=over(8)), W)),
    case("ell-entry-in-slot-and-overflow", V,
         lit("TiledELL.validate: column 5 of row 0 is held both in a slot and in the overflow"),
         lambda: sc.spmm(ell(overflow=over(5)), W)),
    case("ell-overflow-index-past-K", V,
         lit("TiledELL.validate: overflow: indices[0] = 10 is out of range; allowed 0 <= index < K = 10"),
         lambda: sc.spmm(ell(overflow=over(10)), W)),
    # --- spmm: CSR data, checked by the op itself ------------------------------------------------
    case("csr-index-past-K", V, lit("CSR.validate: indices[2] = 5 is out of range; allowed 0 <= index < K = 5"),
         lambda: sc.spmm(csr(indices=(1, 3, 5)), arr(5, 3))),
    case("csr-index-negative", V, lit("CSR.validate: indices[0] = -1 is out of range; allowed 0 <= index < K = 5"),
         lambda: sc.spmm(csr(indices=(-1, 3, 0)), arr(5, 3))),
    case("csr-duplicate-in-row", V, lit("CSR.validate: row 0 has duplicate column indices 3, 3; columns must be "
                                        "strictly ascending within a row (or pass sorted=False)"),
         lambda: sc.spmm(csr(indices=(3, 3, 0)), arr(5, 3))),
    case("csr-unsorted", V, lit("CSR.validate: row 0 has descending column indices 3, 1; columns must be strictly "
                                "ascending within a row (or pass sorted=False)"),
         lambda: sc.spmm(csr(indices=(3, 1, 0)), arr(5, 3))),
    case("csr-duplicate-unsorted-flag", V, lit("CSR.validate: row 0 has duplicate column index 3; columns must be "
                                               "unique in a row"),
         lambda: sc.spmm(csr(indices=(3, 3, 0), sorted=False), arr(5, 3))),
    case("csr-indptr0", V, lit("CSR.validate: indptr[0] = 1; must be 0"),
         lambda: sc.spmm(csr(indptr=(1, 2, 3)), arr(5, 3))),
    case("csr-indptr-decreasing", V, lit("CSR.validate: indptr decreases at row 1: indptr[1] = 3 > indptr[2] = 2"),
         lambda: sc.spmm(csr(indptr=(0, 3, 2)), arr(5, 3))),
    case("csr-indptr-last-not-nnz", V, lit("CSR.validate: indptr[-1] = 2; must equal nnz = 3"),
         lambda: sc.spmm(csr(indptr=(0, 2, 2)), arr(5, 3))),
    # --- CSR constructor -------------------------------------------------------------------------
    case("CSR-indices-int16", T, lit("CSR: indices has dtype int16; allowed: int32, int64"),
         lambda: CSR(np.array([0, 1], I32), np.array([0], I16), arr(1), (1, 5))),
    case("CSR-indptr-int64-ok-data-int32", T, lit(f"CSR: data has dtype int32; {VALUES}"),
         lambda: csr(vdtype=I32)),
    case("CSR-indptr-length", V, lit("CSR: indptr has length 4; expected M + 1 = 3"),
         lambda: csr(indptr=(0, 1, 2, 3))),
    case("CSR-indices-data-length", V, lit("CSR: indices has length 3 but data has length 2; they must match"),
         lambda: csr(data=(1, 2))),
    case("CSR-indices-ndim", V, lit("CSR: indices has shape (1, 3); expected 1 dimension [nnz]"),
         lambda: csr(indices=np.array([[1, 3, 0]], I32))),
    case("CSR-shape-list", T, lit("CSR: shape = [2, 5]; expected a tuple (M, K)"), lambda: csr(shape=[2, 5])),
    case("CSR-shape-negative", V, lit("CSR: shape[1] = -1; must be >= 0"), lambda: csr(shape=(2, -1))),
    # --- TiledELL constructor --------------------------------------------------------------------
    case("ELL-cols-int32", T, lit("TiledELL: cols has dtype int32; allowed: int16"),
         lambda: ell(cols=np.zeros((1, 2, 2), I32))),
    case("ELL-counts-int64", T, lit("TiledELL: counts has dtype int64; allowed: int32"),
         lambda: ell(counts=np.zeros((1, 2), I64))),
    case("ELL-values-int32", T, lit(f"TiledELL: values has dtype int32; {VALUES}"), lambda: ell(vdtype=I32)),
    case("ELL-values-ndim", V, lit("TiledELL: values has shape (1, 4); expected 3 dimensions [M, n_tiles, capacity]"),
         lambda: ell(values=np.zeros((1, 4), F32))),
    case("ELL-tile-not-pow2", V, lit("TiledELL: tile = 6; must be a power of two between 2 and 32768"),
         lambda: ell(tile=6)),
    case("ELL-tile-too-large", V, lit("TiledELL: tile = 65536; must be <= 32768"), lambda: ell(tile=65536)),
    case("ELL-capacity-over-tile", V, lit("TiledELL: capacity = 3; must be <= tile = 2"),
         lambda: ell(values=np.zeros((1, 5, 3), F32), tile=2)),
    case("ELL-capacity-zero", V, lit("TiledELL: capacity = 0; must be >= 1"), lambda: ell(values=np.zeros((1, 2, 0)))),
    case("ELL-values-n-tiles", V, lit("TiledELL: values has shape (1, 3, 2); expected (M, n_tiles, capacity) with "
                                      "M = 1, n_tiles = ceil(K / tile) = ceil(10 / 8) = 2"),
         lambda: ell(values=np.zeros((1, 3, 2), F32))),
    case("ELL-cols-shape", V, lit("TiledELL: cols has shape (1, 2, 3); expected (1, 2, 2) like values"),
         lambda: ell(cols=np.zeros((1, 2, 3), I16))),
    case("ELL-counts-shape", V, lit("TiledELL: counts has shape (1, 3); expected (M, n_tiles) = (1, 2)"),
         lambda: ell(counts=np.zeros((1, 3), I32))),
    case("ELL-overflow-not-csr", T, lit("TiledELL: overflow must be a CSR or None, got dict"),
         lambda: ell(overflow={})),
    case("ELL-overflow-shape", V, lit("TiledELL: overflow has shape (2, 5); expected (1, 10) like the matrix"),
         lambda: ell(overflow=csr())),
    case("ELL-overflow-dtype", T, lit("TiledELL: overflow has dtype float64 but values have float32; they must match"),
         lambda: ell(overflow=over(8, dtype=F64))),
    case("ELL-shape-not-pair", T, lit("TiledELL: shape = (1, 10, 1); expected a tuple (M, K)"),
         lambda: ell(shape=(1, 10, 1))),
    # --- sddmm -----------------------------------------------------------------------------------
    case("sddmm-pattern-dense", T, lit("sddmm: pattern must be a TiledELL or a CSR, got ndarray; convert a dense "
                                       "matrix with sparsecore.pack"), lambda: sc.sddmm(arr(1, 4), arr(10, 4), X)),
    case("sddmm-x-ndim", V, lit("sddmm: x has shape (4,); expected 2 dimensions [M, D]"),
         lambda: sc.sddmm(arr(4), arr(10, 4), ell())),
    case("sddmm-w-ndim", V, lit("sddmm: w has shape (10, 4, 1); expected 2 dimensions [K, D]"),
         lambda: sc.sddmm(arr(1, 4), arr(10, 4, 1), ell())),
    case("sddmm-x-rows", V, lit("sddmm: x has shape (2, 4); expected x.shape[0] == M = 1 (pattern has shape (1, 10))"),
         lambda: sc.sddmm(arr(2, 4), arr(10, 4), ell())),
    case("sddmm-w-rows", V, lit("sddmm: w has shape (9, 4); expected w.shape[0] == K = 10 (pattern has shape "
                                "(1, 10))"), lambda: sc.sddmm(arr(1, 4), arr(9, 4), ell())),
    case("sddmm-D-mismatch", V, lit("sddmm: x has shape (1, 4) and w has shape (10, 3); x.shape[1] must equal "
                                    "w.shape[1] (D)"), lambda: sc.sddmm(arr(1, 4), arr(10, 3), ell())),
    case("sddmm-x-int32", T, lit(f"sddmm: x has dtype int32; {VALUES}"),
         lambda: sc.sddmm(arr(1, 4, dtype=I32), arr(10, 4), ell())),
    case("sddmm-w-float64-x-float32", T, lit("sddmm: value dtypes must match: x is float32, w is float64"),
         lambda: sc.sddmm(arr(1, 4), arr(10, 4, dtype=F64), ell())),
    case("sddmm-data-csr-index-past-K", V, lit("CSR.validate: indices[1] = 7 is out of range; allowed 0 <= index < "
                                               "K = 5"),
         lambda: sc.sddmm(arr(2, 4), arr(5, 4), csr(indices=(1, 7, 0)))),
    # --- spmm_t ----------------------------------------------------------------------------------
    case("spmm_t-a-dense", T, lit("spmm_t: a must be a TiledELL or a CSR, got ndarray; convert a dense matrix with "
                                  "sparsecore.pack"), lambda: sc.spmm_t(X, arr(2, 3))),
    case("spmm_t-dy-ndim", V, lit("spmm_t: dy has shape (1, 3, 1); expected 2 dimensions [M, N]"),
         lambda: sc.spmm_t(ell(), arr(1, 3, 1))),
    case("spmm_t-dy-rows", V, lit(f"spmm_t: dy has shape (3, 2); expected dy.shape[0] == M = 1 {ELL_SHAPES}"),
         lambda: sc.spmm_t(ell(), arr(3, 2))),
    case("spmm_t-dy-int32", T, lit(f"spmm_t: dy has dtype int32; {VALUES}"),
         lambda: sc.spmm_t(ell(), arr(1, 3, dtype=I32))),
    case("spmm_t-dy-float64-a-float32", T, lit("spmm_t: a has dtype float32 but dy has float64; they must match"),
         lambda: sc.spmm_t(ell(), arr(1, 3, dtype=F64))),
    case("spmm_t-data-ell-duplicate", V, parts("TiledELL.validate: tile [0, 1] has duplicate offsets 1, 1"),
         lambda: sc.spmm_t(ell(cols=((0, 5), (1, 1)), counts=(2, 2)), arr(1, 3))),
    # --- gated_ffn -------------------------------------------------------------------------------
    case("gated_ffn-gate-dense", T, lit("gated_ffn: gate must be a TiledELL or a CSR, got ndarray; convert a dense "
                                        "matrix with sparsecore.pack"),
         lambda: sc.gated_ffn(arr(1, 4), X, arr(10, 4), arr(10, 4))),
    case("gated_ffn-x-ndim", V, lit("gated_ffn: x has shape (4,); expected 2 dimensions [M, D]"),
         lambda: sc.gated_ffn(arr(4), ell(), arr(10, 4), arr(10, 4))),
    case("gated_ffn-x-rows", V, lit("gated_ffn: x has shape (3, 4); expected x.shape[0] == M = 1 (gate has shape "
                                    "(1, 10))"), lambda: sc.gated_ffn(arr(3, 4), ell(), arr(10, 4), arr(10, 4))),
    case("gated_ffn-w_up-shape", V, lit("gated_ffn: w_up has shape (10, 3); expected (K, D) = (10, 4)"),
         lambda: sc.gated_ffn(arr(1, 4), ell(), arr(10, 3), arr(10, 4))),
    case("gated_ffn-w_down-rows", V, lit("gated_ffn: w_down has shape (9, 5); expected w_down.shape[0] == K = 10"),
         lambda: sc.gated_ffn(arr(1, 4), ell(), arr(10, 4), arr(9, 5))),
    case("gated_ffn-w_down-ndim", V, lit("gated_ffn: w_down has shape (10,); expected 2 dimensions [K, N]"),
         lambda: sc.gated_ffn(arr(1, 4), ell(), arr(10, 4), arr(10))),
    case("gated_ffn-w_down-float64", T, lit("gated_ffn: value dtypes must match: x is float32, w_up is float32, "
                                            "w_down is float64"),
         lambda: sc.gated_ffn(arr(1, 4), ell(), arr(10, 4), arr(10, 4, dtype=F64))),
    case("gated_ffn-gate-float64", T, lit("gated_ffn: gate has dtype float64 but x has float32; they must match"),
         lambda: sc.gated_ffn(arr(1, 4), ell(vdtype=F64), arr(10, 4), arr(10, 4))),
    case("gated_ffn-data-ell-overflow-not-full", V, parts("TiledELL.validate: overflow entry (row 0, column 9)"),
         lambda: sc.gated_ffn(arr(1, 4), ell(cols=((0, 5), (0, 0)), overflow=over(9)), arr(10, 4), arr(10, 4))),
    # --- select_topk -----------------------------------------------------------------------------
    case("select_topk-kv-not-cache", T, lit("select_topk: kv must be a DenseKV or a PagedKV, got ndarray"),
         lambda: sc.select_topk(q(), arr(1, 8, 2, 4), 2)),
    case("select_topk-q-ndim", V, lit("select_topk: q has shape (4, 4); expected 3 dimensions [B, Hq, D]"),
         lambda: sc.select_topk(q()[0], dkv(), 2)),
    case("select_topk-q-int32", T, lit(f"select_topk: q has dtype int32; {VALUES}"),
         lambda: sc.select_topk(q(dtype=I32), dkv(), 2)),
    case("select_topk-q-batch", V, lit("select_topk: q has batch 2 but kv has batch 1; they must match"),
         lambda: sc.select_topk(q(b=2), dkv(), 2)),
    case("select_topk-q-head_dim", V, lit("select_topk: q has head_dim 8 but kv has head_dim 4; they must match"),
         lambda: sc.select_topk(q(d=8), dkv(), 2)),
    case("select_topk-Hq-not-multiple", V, lit("select_topk: q has Hq = 3 query heads, kv has Hkv = 2; Hq must be a "
                                               "positive multiple of Hkv (GQA)"),
         lambda: sc.select_topk(q(hq=3), dkv(), 2)),
    case("select_topk-q-float16-kv-float32", T, lit("select_topk: q has dtype float16 but kv has float32; they must "
                                                    "match"), lambda: sc.select_topk(q(dtype=F16), dkv(), 2)),
    case("select_topk-k-over-capacity", V, lit("select_topk: k = 9 exceeds the cache's capacity of 8 tokens; allowed "
                                               "0 <= k <= 8"), lambda: sc.select_topk(q(), dkv(), 9)),
    case("select_topk-k-over-pages", V, lit("select_topk: k = 4 exceeds the cache's capacity of 3 pages of 4 tokens; "
                                            "allowed 0 <= k <= 3"),
         lambda: sc.select_topk(q(), pkv(), 4, method="quest")),
    case("select_topk-k-negative", V, lit("select_topk: k = -1; must be >= 0"), lambda: sc.select_topk(q(), dkv(), -1)),
    case("select_topk-k-float", T, lit("select_topk: k must be an int, got 2.0 (float)"),
         lambda: sc.select_topk(q(), dkv(), 2.0)),
    case("select_topk-sink-negative", V, lit("select_topk: sink = -1; must be >= 0"),
         lambda: sc.select_topk(q(), dkv(), 2, sink=-1)),
    case("select_topk-window-negative", V, lit("select_topk: window = -2; must be >= 0"),
         lambda: sc.select_topk(q(), dkv(), 2, window=-2)),
    case("select_topk-method-unknown", V, lit("select_topk: method = 'topp'; allowed: 'exact', 'quest', 'int8'"),
         lambda: sc.select_topk(q(), dkv(), 2, method="topp")),
    case("select_topk-page_size-with-exact", V, lit("select_topk: page_size = 4 is only used by method = 'quest'"),
         lambda: sc.select_topk(q(), dkv(), 2, page_size=4)),
    case("select_topk-page_size-zero", V, lit("select_topk: page_size = 0; must be >= 1"),
         lambda: sc.select_topk(q(), dkv(), 2, method="quest", page_size=0)),
    case("select_topk-shared-not-bool", T, lit("select_topk: shared = 'yes'; must be True or False"),
         lambda: sc.select_topk(q(), dkv(), 2, shared="yes")),
    case("select_topk-data-lengths-over-S", V, lit("DenseKV.validate: lengths[0] = 9; allowed 0 <= length <= S = 8"),
         lambda: sc.select_topk(q(), dkv(lengths=(9,)), 2)),
    case("select_topk-data-page-past-P", V,
         lit("PagedKV.validate: page_table[0, 1] = 3 is out of range for a page in use (lengths[0] = 8); allowed "
             "0 <= page id < P = 3"), lambda: sc.select_topk(q(), pkv(page_table=((0, 3, -1),)), 2)),
    case("select_topk-bounds-with-exact", V, lit("select_topk: bounds are only read by method = 'quest' "
                                                 "(method = 'exact')"),
         lambda: sc.select_topk(q(), dkv(), 2, bounds=pb())),
    case("select_topk-bounds-not-bounds", T, lit("select_topk: bounds must be a PageBounds (from "
                                                 "sparsecore.page_bounds), got ndarray"),
         lambda: sc.select_topk(q(), dkv(), 2, method="quest", bounds=arr(1, 2, 2, 4))),
    case("select_topk-bounds-page_size", V, lit("select_topk: page_size = 2 but bounds.page_size = 4; they must be "
                                                "equal (or leave page_size out)"),
         lambda: sc.select_topk(q(), dkv(), 2, method="quest", page_size=2, bounds=pb())),
    case("select_topk-bounds-head_dim", V, lit("select_topk: bounds has kmin/kmax of shape (1, 2, 2, 3); for this kv "
                                               "and page_size 4 expected (B, P, Hkv, D) = (1, >= 2, 2, 4)"),
         lambda: sc.select_topk(q(), dkv(), 2, method="quest", bounds=pb((1, 2, 2, 3)))),
    case("select_topk-top_p-over-one", V, lit("select_topk: top_p = 1.5; must be a float with 0 < top_p <= 1 (the "
                                              "fraction of the estimated attention mass to keep)"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p=1.5)),
    case("select_topk-top_p-zero", V, lit("select_topk: top_p = 0.0; must be a float with 0 < top_p <= 1 (the "
                                          "fraction of the estimated attention mass to keep)"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p=0.0)),
    case("select_topk-top_p-nan", V, lit("select_topk: top_p = nan; must be a float with 0 < top_p <= 1 (the "
                                         "fraction of the estimated attention mass to keep)"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p=float("nan"))),
    case("select_topk-top_p-str", T, lit("select_topk: top_p = '0.9' (str); must be a float with 0 < top_p <= 1 "
                                         "(the fraction of the estimated attention mass to keep)"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p="0.9")),
    case("select_topk-top_p-quest", V, lit("select_topk: top_p is only supported with method = 'exact' or 'int8' "
                                           "(method = 'quest'): the attention mass is estimated from every key's "
                                           "score"),
         lambda: sc.select_topk(q(), dkv(), 1, method="quest", top_p=0.9)),
    case("select_topk-top_p-rescore", V, lit("select_topk: rescore = 3 is not used with top_p: the int8 scores "
                                             "estimate the attention mass themselves; leave rescore at 0"),
         lambda: sc.select_topk(q(), dkv(), 2, method="int8", codes=sc.quantize_keys(dkv()), top_p=0.9, rescore=3)),
    case("select_topk-k_min-over-k", V, lit("select_topk: k_min = 3 exceeds k = 2; allowed 0 <= k_min <= k (k is the "
                                            "most keys chosen by score, k_min the fewest)"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p=0.9, k_min=3)),
    case("select_topk-k_min-negative", V, lit("select_topk: k_min = -1; must be >= 0"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p=0.9, k_min=-1)),
    case("select_topk-k_min-without-top_p", V, lit("select_topk: k_min = 1 is only used with top_p (the adaptive "
                                                   "budget); give top_p or leave it out"),
         lambda: sc.select_topk(q(), dkv(), 2, k_min=1)),
    case("select_topk-scale-without-top_p", V, lit("select_topk: scale = 0.5 is only used with top_p (the adaptive "
                                                   "budget) or candidates; give one or leave it out"),
         lambda: sc.select_topk(q(), dkv(), 2, scale=0.5)),
    case("select_topk-candidates-below-k", V, lit("select_topk: candidates = 1 is below k = 2; allowed 0 (off) or "
                                                 "an int >= k (the units ranked by their estimated attention "
                                                 "mass; at least the cache's length: every key)"),
         lambda: sc.select_topk(q(), dkv(), 2, candidates=1)),
    case("select_topk-candidates-quest", V, lit("select_topk: candidates is only supported with method = 'exact' or "
                                                "'int8' (method = 'quest')"),
         lambda: sc.select_topk(q(), dkv(), 1, method="quest", candidates=1)),
    case("select_topk-candidates-rescore", V, lit("select_topk: rescore = 4 is not used with candidates: they are "
                                                  "ranked by their estimated attention mass; leave rescore at 0"),
         lambda: sc.select_topk(q(), dkv(), 2, method="int8", codes=sc.quantize_keys(dkv()), rescore=4,
                                candidates=4)),
    case("select_topk-tail_sample-without-candidates", V, lit("select_topk: tail_sample = 4 is only used with "
                                                             "candidates (the mass ranking over candidates); give "
                                                             "candidates or leave it out"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p=0.9, tail_sample=4)),
    case("select_topk-tail_sample-negative", V, lit("select_topk: tail_sample = -1; must be >= 0"),
         lambda: sc.select_topk(q(), dkv(), 2, candidates=4, tail_sample=-1)),
    case("select_topk-top_p-scale-negative", V, lit("select_topk: scale = -1.0; must be a finite float > 0 (or None "
                                                    "for 1 / sqrt(D))"),
         lambda: sc.select_topk(q(), dkv(), 2, top_p=0.9, scale=-1.0)),
    case("select_topk-int8-without-codes", V, lit("select_topk: method = 'int8' needs codes: the int8 copy of the keys "
                                                  "(sparsecore.quantize_keys(kv))"),
         lambda: sc.select_topk(q(), dkv(), 2, method="int8")),
    case("select_topk-codes-with-exact", V, lit("select_topk: codes are only read by method = 'int8' (method = "
                                                "'exact')"),
         lambda: sc.select_topk(q(), dkv(), 2, codes=sc.quantize_keys(dkv()))),
    case("select_topk-codes-not-codes", T, lit("select_topk: codes must be a KeyCodes (from sparsecore.quantize_keys), "
                                               "got ndarray"),
         lambda: sc.select_topk(q(), dkv(), 2, method="int8", codes=arr(1, 8, 2, 4))),
    case("select_topk-codes-shape", V, lit("select_topk: codes has codes of shape (1, 4, 2, 4); for this kv expected "
                                           "(B, S, Hkv, D) = (1, >= 8, 2, 4)"),
         lambda: sc.select_topk(q(), dkv(), 2, method="int8", codes=sc.KeyCodes(np.zeros((1, 4, 2, 4), np.int8),
                                                                                 np.zeros((1, 4, 2), np.float32)))),
    case("select_topk-rescore-below-k", V, lit("select_topk: rescore = 1 is below k = 2; allowed 0 (no re-scoring) or "
                                               "k <= rescore <= 8 (candidates re-scored from the keys)"),
         lambda: sc.select_topk(q(), dkv(), 2, method="int8", codes=sc.quantize_keys(dkv()), rescore=1)),
    case("select_topk-rescore-with-exact", V, lit("select_topk: rescore = 4 is only used by method = 'int8'"),
         lambda: sc.select_topk(q(), dkv(), 2, rescore=4)),
    case("KeyCodes-codes-dtype", T, lit("KeyCodes: codes has dtype float32; allowed: int8"),
         lambda: sc.KeyCodes(np.zeros((1, 4, 2, 4), np.float32), np.zeros((1, 4, 2), np.float32))),
    case("quantize_keys-start-over-length", V, lit("quantize_keys: start = [9]; expected 1 ints with 0 <= start[b] <= "
                                                   "lengths[b] = [8]"),
         lambda: sc.quantize_keys(dkv(), out=sc.quantize_keys(dkv()), start=np.array([9], np.int32))),
    # --- PageBounds and page_bounds ---------------------------------------------------------------
    case("PageBounds-kmin-ndim", V, lit("PageBounds: kmin has shape (2, 2, 4); expected 4 dimensions [B, P, Hkv, D]"),
         lambda: PageBounds(arr(2, 2, 4), arr(2, 2, 4), 4)),
    case("PageBounds-kmax-shape", V, lit("PageBounds: kmax has shape (1, 3, 2, 4); expected (1, 2, 2, 4) like kmin"),
         lambda: PageBounds(arr(1, 2, 2, 4), arr(1, 3, 2, 4), 4)),
    case("PageBounds-dtypes-differ", T, lit("PageBounds: value dtypes must match: kmin is float32, kmax is float16"),
         lambda: PageBounds(arr(1, 2, 2, 4), arr(1, 2, 2, 4, dtype=F16), 4)),
    case("PageBounds-int32", T, lit(f"PageBounds: kmin has dtype int32; {VALUES}"), lambda: pb(dtype=I32)),
    case("PageBounds-page_size-zero", V, lit("PageBounds: page_size = 0; must be an int >= 1"),
         lambda: pb(page_size=0)),
    case("PageBounds-page_size-float", T, lit("PageBounds: page_size = 4.0; must be an int >= 1"),
         lambda: pb(page_size=4.0)),
    case("page_bounds-kv-not-cache", T, lit("page_bounds: kv must be a DenseKV or a PagedKV, got ndarray"),
         lambda: sc.page_bounds(arr(1, 8, 2, 4))),
    case("page_bounds-page_size-zero", V, lit("page_bounds: page_size = 0; must be >= 1"),
         lambda: sc.page_bounds(dkv(), 0)),
    case("page_bounds-out-not-bounds", T, lit("page_bounds: out must be a PageBounds (from sparsecore.page_bounds), "
                                              "got ndarray"), lambda: sc.page_bounds(dkv(), out=arr(1, 2, 2, 4))),
    case("page_bounds-out-page_size", V, lit("page_bounds: page_size = 2 but out.page_size = 4; give one or make "
                                             "them equal"), lambda: sc.page_bounds(dkv(), 2, out=pb())),
    case("page_bounds-out-too-few-pages", V, lit("page_bounds: out has kmin/kmax of shape (1, 1, 2, 4); for this kv "
                                                 "and page_size 4 expected (B, P, Hkv, D) = (1, >= 2, 2, 4)"),
         lambda: sc.page_bounds(dkv(), out=pb((1, 1, 2, 4)))),
    case("page_bounds-out-float16-kv-float32", T, lit("page_bounds: out has dtype float16 but kv has float32; they "
                                                      "must match"), lambda: sc.page_bounds(dkv(), out=pb(dtype=F16))),
    case("page_bounds-out-read-only", V, lit("page_bounds: out.kmin is a read-only NumPy array; the bounds are "
                                             "updated in place"), lambda: sc.page_bounds(dkv(), out=read_only_pb())),
    case("page_bounds-start-without-out", V, lit("page_bounds: start is given without out; start says which pages "
                                                 "of out to recompute"),
         lambda: sc.page_bounds(dkv(), start=np.zeros(1, I32))),
    case("page_bounds-start-int64", T, lit("page_bounds: start has dtype int64; allowed: int32"),
         lambda: sc.page_bounds(dkv(), out=pb(), start=np.zeros(1, I64))),
    case("page_bounds-start-shape", V, lit("page_bounds: start has shape (2,); expected (1,), one per sequence"),
         lambda: sc.page_bounds(dkv(), out=pb(), start=np.zeros(2, I32))),
    case("page_bounds-data-start-past-length", V, lit("page_bounds: start[0] = 6; allowed 0 <= start[b] <= "
                                                      "lengths[0] = 5"),
         lambda: sc.page_bounds(dkv((5,)), out=pb(), start=np.array([6], I32))),
    case("page_bounds-data-start-negative", V, lit("page_bounds: start[0] = -1; allowed 0 <= start[b] <= "
                                                   "lengths[0] = 8"),
         lambda: sc.page_bounds(dkv(), out=pb(), start=np.array([-1], I32))),
    # --- sparse_decode ---------------------------------------------------------------------------
    case("sparse_decode-index-not-topk", T, lit("sparse_decode: index must be a TopKIndex, got ndarray"),
         lambda: sc.sparse_decode(q(), dkv(), np.zeros((1, 2, 3), I32))),
    case("sparse_decode-q-ndim", V, lit("sparse_decode: q has shape (1, 4, 4, 1); expected 3 dimensions [B, Hq, D]"),
         lambda: sc.sparse_decode(q()[..., None], dkv(), topk())),
    case("sparse_decode-q-head_dim", V, lit("sparse_decode: q has head_dim 2 but kv has head_dim 4; they must match"),
         lambda: sc.sparse_decode(q(d=2), dkv(), topk())),
    case("sparse_decode-index-batch", V, lit("sparse_decode: index has batch 2 but q has batch 1; they must match"),
         lambda: sc.sparse_decode(q(), dkv(), TopKIndex(np.full((2, 2, 1), -1, I32), np.zeros((2, 2), I32)))),
    case("sparse_decode-index-G", V, lit("sparse_decode: index has G = 3 selection rows per sequence; expected "
                                         "Hkv = 2 (shared per KV group) or Hq = 4 (per query head)"),
         lambda: sc.sparse_decode(q(), dkv(), TopKIndex(np.full((1, 3, 1), -1, I32), np.zeros((1, 3), I32)))),
    case("sparse_decode-scale-zero", V, lit("sparse_decode: scale = 0; must be a finite float > 0 (or None for "
                                            "1 / sqrt(D))"), lambda: sc.sparse_decode(q(), dkv(), topk(), scale=0)),
    case("sparse_decode-scale-nan", V, lit("sparse_decode: scale = nan; must be a finite float > 0 (or None for "
                                           "1 / sqrt(D))"),
         lambda: sc.sparse_decode(q(), dkv(), topk(), scale=float("nan"))),
    case("sparse_decode-scale-str", T, lit("sparse_decode: scale = '0.5' (str); must be a finite float > 0 "
                                           "(or None for 1 / sqrt(D))"),
         lambda: sc.sparse_decode(q(), dkv(), topk(), scale="0.5")),
    case("sparse_decode-index-torch-q-numpy", T,
         lit("sparse_decode: all arrays must come from one library: q is numpy, kv.k is numpy, kv.v is numpy, "
             "kv.lengths is numpy, index.indices is torch, index.counts is torch"),
         lambda: sc.sparse_decode(q(), dkv(), cpu(topk()))),
    case("sparse_decode-data-index-past-length", V,
         lit("TopKIndex.validate: indices[0, 1, 1] = 6 is out of range; allowed 0 <= index < length = 6 for "
             "sequence 0"), lambda: sc.sparse_decode(q(), dkv(lengths=(6,)), topk(((0, 1, -1), (2, 6, -1))))),
    case("sparse_decode-data-page-past-length", V,
         lit("TopKIndex.validate: indices[0, 0, 1] = 2 is out of range; allowed 0 <= index < ceil(length / "
             "page_size = 4) = 2 for sequence 0"),
         lambda: sc.sparse_decode(q(), dkv(lengths=(6,)), topk(((0, 2, -1), (1, -1, -1)), (2, 1), "page", 4))),
    case("sparse_decode-data-index-duplicate", V,
         lit("TopKIndex.validate: row [0, 0] selects index 1 twice; selected indices must be unique"),
         lambda: sc.sparse_decode(q(), dkv(), topk(((1, 1, -1), (2, 3, -1))))),
    case("sparse_decode-data-index-padding", V,
         lit("TopKIndex.validate: indices[0, 1, 2] = 0 is padding (past counts = 2); padding must be -1"),
         lambda: sc.sparse_decode(q(), dkv(), topk(((0, 1, -1), (2, 3, 0))))),
    case("sparse_decode-data-index-negative", V,
         lit("TopKIndex.validate: indices[0, 0, 1] = -1 is negative; selected indices are >= 0"),
         lambda: sc.sparse_decode(q(), dkv(), topk(((0, -1, -1), (2, 3, -1))))),
    case("sparse_decode-data-counts-over-kmax", V,
         lit("TopKIndex.validate: counts[0, 1] = 4; allowed 0 <= count <= k_max = 3"),
         lambda: sc.sparse_decode(q(), dkv(), topk(counts=(2, 4)))),
    case("sparse_decode-data-counts-negative", V,
         lit("TopKIndex.validate: counts[0, 0] = -1; allowed 0 <= count <= k_max = 3"),
         lambda: sc.sparse_decode(q(), dkv(), topk(counts=(-1, 2)))),
    case("sparse_decode-data-lengths-negative", V,
         lit("DenseKV.validate: lengths[0] = -1; allowed 0 <= length <= S = 8"),
         lambda: sc.sparse_decode(q(), dkv(lengths=(-1,)), topk(((-1,) * 3,) * 2, (0, 0)))),
    case("sparse_decode-data-paged-lengths-over", V,
         lit("PagedKV.validate: lengths[0] = 13; allowed 0 <= length <= max_pages * page_size = 12"),
         lambda: sc.sparse_decode(q(), pkv(lengths=(13,)), topk())),
    # --- dense_decode ----------------------------------------------------------------------------
    case("dense_decode-kv-not-cache", T, lit("dense_decode: kv must be a DenseKV or a PagedKV, got tuple"),
         lambda: sc.dense_decode(q(), (arr(1, 8, 2, 4), arr(1, 8, 2, 4)))),
    case("dense_decode-q-ndim", V, lit("dense_decode: q has shape (4, 4); expected 3 dimensions [B, Hq, D]"),
         lambda: sc.dense_decode(q()[0], dkv())),
    case("dense_decode-q-batch", V, lit("dense_decode: q has batch 3 but kv has batch 1; they must match"),
         lambda: sc.dense_decode(q(b=3), pkv())),
    case("dense_decode-Hq-not-multiple", V, lit("dense_decode: q has Hq = 5 query heads, kv has Hkv = 2; Hq must be "
                                                "a positive multiple of Hkv (GQA)"),
         lambda: sc.dense_decode(q(hq=5), pkv())),
    case("dense_decode-q-float64-kv-float32", T, lit("dense_decode: q has dtype float64 but kv has float32; they must "
                                                     "match"), lambda: sc.dense_decode(q(dtype=F64), dkv())),
    case("dense_decode-scale-negative", V, lit("dense_decode: scale = -1.0; must be a finite float > 0 (or None for "
                                               "1 / sqrt(D))"), lambda: sc.dense_decode(q(), dkv(), scale=-1.0)),
    case("dense_decode-scale-inf", V, lit("dense_decode: scale = inf; must be a finite float > 0 (or None for "
                                          "1 / sqrt(D))"), lambda: sc.dense_decode(q(), dkv(), scale=float("inf"))),
    case("dense_decode-data-page-past-P", V,
         lit("PagedKV.validate: page_table[0, 0] = -1 is out of range for a page in use (lengths[0] = 8); allowed "
             "0 <= page id < P = 3"), lambda: sc.dense_decode(q(), pkv(page_table=((-1, 1, -1),)))),
    case("dense_decode-cpu-and-meta", V, lit("dense_decode: all arrays must be on one device: q on meta, kv.k on cpu, "
                                             "kv.v on cpu, kv.lengths on cpu"),
         lambda: sc.dense_decode(meta(q()), cpu(dkv()))),
    # --- merge_attention -------------------------------------------------------------------------
    case("merge-o2-shape", V, lit("merge_attention: o2 has shape (2, 3); expected (2, 4) like o1"),
         lambda: sc.merge_attention(O, LSE, arr(2, 3), LSE)),
    case("merge-lse1-shape", V, lit("merge_attention: lse1 has shape (3,); expected (2,) = o1.shape[:-1]"),
         lambda: sc.merge_attention(O, np.zeros(3, F32), O, LSE)),
    case("merge-lse2-ndim", V, lit("merge_attention: lse2 has shape (2, 1); expected 1 dimension [...] = "
                                   "o.shape[:-1]"), lambda: sc.merge_attention(O, LSE, O, np.zeros((2, 1), F32))),
    case("merge-lse-float16", T, lit("merge_attention: lse1 has dtype float16; allowed: float32, float64"),
         lambda: sc.merge_attention(O, LSE.astype(F16), O, LSE)),
    case("merge-o1-int32", T, lit(f"merge_attention: o1 has dtype int32; {VALUES}"),
         lambda: sc.merge_attention(O.astype(I32), LSE, O.astype(I32), LSE)),
    case("merge-o2-float64-o1-float32", T, lit("merge_attention: value dtypes must match: o1 is float32, o2 is "
                                               "float64"), lambda: sc.merge_attention(O, LSE, O.astype(F64), LSE)),
    case("merge-o1-list", T, lit("merge_attention: o1 must be an array (NumPy, torch, CuPy or Numba device "
                                 "array), got list"),
         lambda: sc.merge_attention([[1.0]], LSE, O, LSE)),
    case("merge-o1-0d", V, lit("merge_attention: o1 has shape (); expected at least 1 dimension [..., D]"),
         lambda: sc.merge_attention(np.array(1, F32), LSE, np.array(1, F32), LSE)),
    case("merge-numpy-and-torch", T, lit("merge_attention: all arrays must come from one library: o1 is numpy, "
                                         "lse1 is torch, o2 is numpy, lse2 is numpy"),
         lambda: sc.merge_attention(O, cpu(LSE), O, LSE)),
    case("merge-cpu-and-meta", V, lit("merge_attention: all arrays must be on one device: o1 on cpu, lse1 on cpu, "
                                      "o2 on meta, lse2 on meta"),
         lambda: sc.merge_attention(cpu(O), cpu(LSE), meta(O), meta(LSE))),
    # --- DenseKV / PagedKV / TopKIndex constructors ----------------------------------------------
    case("DenseKV-k-ndim", V, lit("DenseKV: k has shape (1, 8, 4); expected 4 dimensions [B, S, Hkv, D]"),
         lambda: dkv(shape=(1, 8, 4))),
    case("DenseKV-k-int32", T, lit(f"DenseKV: k has dtype int32; {VALUES}"), lambda: dkv(dtype=I32)),
    case("DenseKV-v-shape", V, lit("DenseKV: v has shape (1, 8, 2, 3); expected (1, 8, 2, 4) like k"),
         lambda: dkv(vshape=(1, 8, 2, 3))),
    case("DenseKV-v-float16", T, lit("DenseKV: value dtypes must match: k is float32, v is float16"),
         lambda: dkv(vdtype=F16)),
    case("DenseKV-lengths-int64", T, lit("DenseKV: lengths has dtype int64; allowed: int32"),
         lambda: dkv(lengths=np.array([8], I64))),
    case("DenseKV-lengths-shape", V, lit("DenseKV: lengths has shape (2,); expected (1,), one per sequence"),
         lambda: dkv(lengths=(8, 8))),
    case("PagedKV-page_table-int64", T, lit("PagedKV: page_table has dtype int64; allowed: int32"),
         lambda: pkv(page_table=np.zeros((1, 3), I64))),
    case("PagedKV-page_table-ndim", V, lit("PagedKV: page_table has shape (3,); expected 2 dimensions [B, max_pages]"),
         lambda: pkv(page_table=(0, 1, -1))),
    case("PagedKV-v_pages-shape", V, lit("PagedKV: v_pages has shape (3, 4, 2, 2); expected (3, 4, 2, 4) like "
                                         "k_pages"), lambda: pkv(vshape=(3, 4, 2, 2))),
    case("PagedKV-page_size-zero", V, lit("PagedKV: page_size = 0; must be >= 1"), lambda: pkv(shape=(3, 0, 2, 4))),
    case("TopKIndex-page-without-page_size", V, lit("TopKIndex: granularity = 'page' needs page_size (tokens per "
                                                    "page)"), lambda: topk(granularity="page")),
    case("TopKIndex-page_size-with-token", V, lit("TopKIndex: page_size = 4 is only meaningful with granularity = "
                                                  "'page'"), lambda: topk(page_size=4)),
    case("TopKIndex-page_size-zero", V, lit("TopKIndex: page_size = 0; must be >= 1"),
         lambda: topk(granularity="page", page_size=0)),
    case("TopKIndex-granularity-unknown", V, lit("TopKIndex: granularity = 'block'; allowed: 'token', 'page'"),
         lambda: topk(granularity="block")),
    case("TopKIndex-indices-int64", T, lit("TopKIndex: indices has dtype int64; allowed: int32"),
         lambda: topk(indices=np.zeros((1, 2, 3), I64))),
    case("TopKIndex-counts-shape", V, lit("TopKIndex: counts has shape (1, 3); expected (1, 2) = indices.shape[:2]"),
         lambda: topk(counts=(2, 2, 2))),
    # --- issue 13: limits that used to overflow, crash or give a raw error ------------------------------
    case("dense_decode-scale-past-float32", V,
         lit("dense_decode: scale = 1e+39; must be between 1.17549435e-38 and 3.40282347e+38, float32's normal range "
             "(the scores are scaled in float32)"), lambda: sc.dense_decode(q(), dkv(), scale=1e39)),
    case("sparse_decode-scale-below-float32", V,
         parts("sparse_decode: scale = 1e-39; must be between 1.17549435e-38 and 3.40282347e+38"),
         lambda: sc.sparse_decode(q(), dkv(), topk(), scale=1e-39)),
    case("dense_decode-Hq-zero", V, lit("dense_decode: q has Hq = 0 query heads, kv has Hkv = 2; Hq must be a "
                                        "positive multiple of Hkv (GQA)"), lambda: sc.dense_decode(q(hq=0), dkv())),
    case("select_topk-Hq-zero", V, parts("select_topk: q has Hq = 0 query heads"),
         lambda: sc.select_topk(q(hq=0), dkv(), 2)),
    case("select_topk-sink-past-int32", V, lit("select_topk: sink = 9223372036854775808; must be <= 2147483647"),
         lambda: sc.select_topk(q(), dkv(), 2, sink=2**63)),
    case("select_topk-window-past-int32", V, lit("select_topk: window = 4294967296; must be <= 2147483647"),
         lambda: sc.select_topk(q(), dkv(), 2, window=2**32)),
    case("select_topk-page_size-past-int32", V, lit("select_topk: page_size = 1099511627776; must be <= 2147483647"),
         lambda: sc.select_topk(q(), dkv(), 1, method="quest", page_size=2**40)),
    case("TopKIndex-page_size-past-int32", V, lit("TopKIndex: page_size = 1099511627776; must be <= 2147483647"),
         lambda: topk(granularity="page", page_size=2**40)),
    case("spmm-requires-grad", V,
         lit("spmm: w requires grad, but sparsecore.spmm does not record gradients (the result would silently have "
             "none); use sparsecore.torch.spmm, which is differentiable, or call it under torch.no_grad() if no "
             "gradient is wanted"), lambda: sc.spmm(cpu(ell()), cpu(W).requires_grad_())),
    case("pack-requires-grad", V, parts("pack: x requires grad, but sparsecore.pack does not record gradients",
                                        "use sparsecore.torch.pack"),
         lambda: sc.pack(cpu(X).requires_grad_())),
    case("dense_decode-requires-grad", V,
         lit("dense_decode: q requires grad, but sparsecore.dense_decode does not record gradients (the result would "
             "silently have none); dense_decode has no gradient; call it under torch.no_grad() or pass detached "
             "tensors"), lambda: sc.dense_decode(cpu(q()).requires_grad_(), cpu(dkv()))),
    case("never-csr-column-past-K", V,
         lit("spmm: a.indices[1] = 10000000 is out of range; allowed 0 <= indices <= 4 (nnz = 3, K = 5; checked even "
             "with SPARSECORE_VALIDATE=never)"),
         lambda: sc.spmm(csr(indices=(1, 10**7, 0)), arr(5, 3)), env={"SPARSECORE_VALIDATE": "never"}),
    case("never-csr-indptr-past-nnz", V, parts("spmm_t: a.indptr[2] = 9 is out of range; allowed 0 <= indptr <= 3"),
         lambda: sc.spmm_t(csr(indptr=(0, 2, 9)), arr(2, 3)), env={"SPARSECORE_VALIDATE": "never"}),
    case("never-ell-offset-past-tile", V,
         lit("sddmm: pattern.cols of tile 1 holds offset 5, out of range; allowed 0 <= offset < 2 (tile = 8, K = 10; "
             "checked even with SPARSECORE_VALIDATE=never)"),
         lambda: sc.sddmm(arr(1, 4), arr(10, 4), ell(cols=((0, 5), (5, 0)))), env={"SPARSECORE_VALIDATE": "never"}),
    case("never-ell-counts-past-capacity", V, parts("unpack: a.counts[0, 1] = 3 is out of range; allowed 0 <= count "
                                                    "<= capacity = 2"),
         lambda: sc.unpack(ell(counts=(2, 3))), env={"SPARSECORE_VALIDATE": "never"}),
    case("never-ell-overflow-column", V, parts("gated_ffn: gate.overflow.indices[0] = 99 is out of range"),
         lambda: sc.gated_ffn(arr(1, 4), ell(overflow=over(99)), arr(10, 4), arr(10, 4)),
         env={"SPARSECORE_VALIDATE": "never"}),
    case("never-page-past-pool", V,
         lit("dense_decode: kv: page_table[0, 1] = 7 is out of range for a page in use (lengths[0] = 8); allowed "
             "0 <= page id < P = 3"), lambda: sc.dense_decode(q(), pkv(((0, 7, -1),))),
         env={"SPARSECORE_VALIDATE": "never"}),
    case("never-length-past-cache", V, lit("select_topk: kv: lengths[0] = 9; allowed 0 <= length <= S = 8"),
         lambda: sc.select_topk(q(), dkv(lengths=(9,)), 2), env={"SPARSECORE_VALIDATE": "never"}),
    case("never-index-past-length", V,
         lit("sparse_decode: index.indices[0, 1, 1] = 7 is out of range; allowed 0 <= index < 5 (tokens of sequence "
             "0; checked even with SPARSECORE_VALIDATE=never)"),
         lambda: sc.sparse_decode(q(), dkv(lengths=(5,)), topk(((0, 1, -1), (2, 7, -1)))),
         env={"SPARSECORE_VALIDATE": "never"}),
    case("never-index-page-past-length", V, parts("sparse_decode: index.indices[0, 0, 1] = 3 is out of range; "
                                                  "allowed 0 <= index < 2 (pages of sequence 0"),
         lambda: sc.sparse_decode(q(), dkv(lengths=(6,)), topk(((0, 3, -1), (1, -1, -1)), (2, 1), "page", 4)),
         env={"SPARSECORE_VALIDATE": "never"}),
    case("never-index-count-past-k_max", V, parts("sparse_decode: index.counts[0, 0] = 4 is out of range; allowed "
                                                  "0 <= count <= k_max = 3"),
         lambda: sc.sparse_decode(q(), dkv(), topk(counts=(4, 2))), env={"SPARSECORE_VALIDATE": "never"}),
    case("never-page_bounds-start", V, lit("page_bounds: start[0] = 9; allowed 0 <= start[b] <= lengths[0] = 8"),
         lambda: sc.page_bounds(dkv(), out=pb(), start=np.array([9], I32)), env={"SPARSECORE_VALIDATE": "never"}),
    # --- dispatch --------------------------------------------------------------------------------
    case("backend-unknown", V, parts("spmm: backend = 'nope' is unknown for this op; known: ", "reference"),
         lambda: sc.spmm(ell(), W, backend="nope")),
    case("backend-forced-cannot-run", V,
         lit("pack: backend = 'reference' cannot run this call:\n  reference: runs on host arrays, the inputs are on "
             "meta"), lambda: sc.pack(meta(X), backend="reference")),
    case("env-backend-unknown", V, parts("merge_attention: SPARSECORE_BACKEND = 'nope' is unknown for this op; "
                                         "known: ", "reference"),
         lambda: sc.merge_attention(O, LSE, O, LSE), env={"SPARSECORE_BACKEND": "nope"}),
    case("env-backend-forced-cannot-run", V,
         lit("spmm: SPARSECORE_BACKEND = 'reference' cannot run this call:\n  reference: runs on host arrays, the "
             "inputs are on meta"),
         lambda: sc.spmm(meta(ell()), meta(W)), env={"SPARSECORE_BACKEND": "reference"}),
    case("env-validate-unknown", V, lit("SPARSECORE_VALIDATE: value 'sometimes' is not allowed; use 'auto', 'always' "
                                        "or 'never'"),
         lambda: sc.spmm(ell(), W), env={"SPARSECORE_VALIDATE": "sometimes"}),
    case("no-backend-pack", NotImplementedError,
         parts("pack: no backend can run this call (device meta, dtype float32):\n",
               "  reference: runs on host arrays, the inputs are on meta"), lambda: sc.pack(meta(X))),
    case("no-backend-spmm", NotImplementedError,
         parts("spmm: no backend can run this call (device meta, dtype float16):\n",
               "  reference: runs on host arrays, the inputs are on meta"),
         lambda: sc.spmm(meta(ell(vdtype=F16)), meta(W.astype(F16)))),
    case("no-backend-sparse_decode", NotImplementedError,
         parts("sparse_decode: no backend can run this call (device meta, dtype float32):\n",
               "  reference: runs on host arrays, the inputs are on meta"),
         lambda: sc.sparse_decode(meta(q()), meta(dkv()), meta(topk()))),
    case("no-backend-validate-always", NotImplementedError, parts("spmm: no backend can run this call"),
         lambda: sc.spmm(meta(ell()), meta(W)), env={"SPARSECORE_VALIDATE": "always"}),
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSECORE_BACKEND", raising=False)
    monkeypatch.delenv("SPARSECORE_VALIDATE", raising=False)


@pytest.mark.parametrize("call, exc, regex, env", CASES)
def test_bad_input(call: Callable[[], Any], exc: type[Exception], regex: str, env: dict[str, str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(exc, match=regex):
        call()


def test_case_ids_are_unique_and_many() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 50


def test_fixtures_are_valid() -> None:
    """The unbroken fixtures pass every check, so each case's error comes from its one change."""
    a, c = ell().validate(), csr().validate()
    ell(overflow=over(3)).validate()  # an overflow entry of the full tile 0
    dkv().validate()
    pkv().validate()
    sc.page_bounds(dkv(), out=pb(), start=np.array([3], I32))  # the bounds fixture fits dkv()
    topk().validate(lengths=dkv().lengths)
    topk(((0, 1, -1), (1, -1, -1)), (2, 1), "page", 4).validate(lengths=np.array([6], I32))
    assert sc.pack(X, tile=8, capacity=1).overflow is not None
    np.testing.assert_array_equal(sc.unpack(a)[0, [0, 5, 9]], [1, 2, 3])
    assert sc.spmm(a, W).shape == (1, 3)
    assert sc.spmm(c, arr(5, 3)).shape == (2, 3)
    assert sc.sddmm(arr(1, 4), arr(10, 4), a).shape == a.shape
    assert sc.spmm_t(a, arr(1, 3)).shape == (10, 3)
    assert sc.gated_ffn(arr(1, 4), a, arr(10, 4), arr(10, 4)).shape == (1, 4)
    assert sc.select_topk(q(), dkv(), 8).k_max == 8
    assert sc.select_topk(q(), pkv(), 3, method="quest").granularity == "page"
    assert sc.sparse_decode(q(), dkv(), topk())[0].shape == (1, 4, 4)
    assert sc.sparse_decode(q(), pkv(), topk(((-1,) * 3,) * 2, (0, 0)))[1].shape == (1, 4)
    assert sc.dense_decode(q(), pkv())[0].shape == (1, 4, 4)
    assert sc.merge_attention(O, LSE, O, LSE)[0].shape == O.shape


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("op", ["unpack", "spmm", "sddmm", "spmm_t", "gated_ffn"])
def test_data_checks_run_inside_the_op(op: str, lib: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TiledELL whose constructor accepts it (shapes and dtypes are fine) but whose data is broken
    is rejected by the op itself on host inputs, with the same message as ``validate()``; with
    ``SPARSECORE_VALIDATE=never`` the op trusts it (here: a non-zero value in a padding slot, harmless)."""
    bad = ell(values=((1, 2), (3, 7)))  # slot [0, 1, 1] is padding but holds 7
    with pytest.raises(ValueError) as direct:
        bad.validate()
    assert "padding slot [0, 1, 1]" in str(direct.value)
    f = cpu if lib == "torch" else (lambda x: x)
    a, x, w, dy = f(bad), f(arr(1, 4)), f(arr(10, 4)), f(arr(1, 3))
    run = {"unpack": lambda: sc.unpack(a), "spmm": lambda: sc.spmm(a, f(W)), "sddmm": lambda: sc.sddmm(x, w, a),
           "spmm_t": lambda: sc.spmm_t(a, dy), "gated_ffn": lambda: sc.gated_ffn(x, a, w, w)}[op]
    for mode in ("auto", "always"):
        monkeypatch.setenv("SPARSECORE_VALIDATE", mode)
        with pytest.raises(ValueError, match=lit(str(direct.value))):
            run()
    monkeypatch.setenv("SPARSECORE_VALIDATE", "never")
    run()


def test_kv_and_index_checks_run_inside_decode_ops() -> None:
    """Same for the decode ops: the caches' and the index's data are checked by the op."""
    long_kv = dkv(lengths=(9,))
    with pytest.raises(ValueError, match=lit("DenseKV.validate: lengths[0] = 9; allowed 0 <= length <= S = 8")):
        sc.dense_decode(cpu(q()), cpu(long_kv))
    far = topk(((0, 1, -1), (2, 7, -1)))
    far.validate()  # without lengths, 7 is a fine index
    with pytest.raises(ValueError, match=parts("TopKIndex.validate: indices[0, 1, 1] = 7 is out of range; allowed "
                                               "0 <= index < length = 5 for sequence 0")):
        sc.sparse_decode(q(), dkv(lengths=(5,)), far)


@pytest.mark.parametrize("call", [
    pytest.param(lambda: sc.pack(X, tile=np.int64(8)), id="pack-tile-numpy-int"),
    pytest.param(lambda: sc.pack(X, threshold=np.float32(0.5)), id="pack-threshold-numpy-float32"),
    pytest.param(lambda: sc.dense_decode(q(), dkv(), scale=np.float32(0.5)), id="dense_decode-scale-numpy-float32"),
])
def test_numpy_scalar_arguments_are_accepted(call: Callable[[], Any]) -> None:
    call()
