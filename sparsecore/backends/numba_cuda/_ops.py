"""Host side of every numba_cuda op: views, allocations and launches; no host synchronisation
except the one documented read in ``pack``. Imported only when an op runs (it needs numba-cuda)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..._arrays import dtype_name
from ...formats.csr import CSR
from ...formats.kv import DenseKV, PageBounds, PagedKV
from ...formats.tiled_ell import TiledELL
from ...formats.topk import TopKIndex, topk_capacity
from ...ops import inputs as I
from ._limits import CUT_CAP
from ._runtime import Place, common, kernels

#: the most units (k rounded up to a power of two, and k + sink + window) a row of the adaptive
#: budget sorts in shared memory; above it the sort runs in a global workspace (tests lower it to
#: exercise that path on small rows)
CUT_SHARED = CUT_CAP


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _nt() -> int:
    return int(common().NT)


def _thr32(threshold: float) -> np.float32:
    """The largest float32 <= threshold: for every float32 a, (a <= threshold) == (a <= thr32),
    so the kernel's float32 compare decides exactly as the reference's float64 one."""
    return np.float32(I.threshold_f32(threshold))


def _overflow_args(P: Place, a: TiledELL, dtype: str) -> tuple[Any, ...]:
    """(has_ovf, indptr, indices, data) views; 1-element dummies (never read) without overflow."""
    if a.overflow is None:
        return (0, P.new((1,), "int32")[1], P.new((1,), "int32")[1], P.new((1,), dtype)[1])
    o = a.overflow
    return (1, P.view(o.indptr), P.view(o.indices), P.view(o.data))


def _ell_args(P: Place, a: TiledELL) -> tuple[Any, ...]:
    return (P.view(a.values), P.view(a.cols), P.view(a.counts), a.tile)


# ---- FFN ops ------------------------------------------------------------------------------------

def pack(inp: I.PackInputs) -> TiledELL:
    x = inp.x
    dt = dtype_name(x)
    m, k = (int(s) for s in x.shape)
    tile, cap = int(inp.tile), int(inp.capacity)
    n_t = _cdiv(k, tile)
    kern = kernels(dt)
    nt = _nt()
    thr = _thr32(inp.threshold)
    relu = 1 if inp.activation == "relu" else 0
    idx_dt = "int64" if max(k, m * k) >= 2**31 else "int32"
    with Place(x) as P:
        xv = P.view(x)
        values, vv = P.new((m, n_t, cap), dt)
        cols, cv = P.new((m, n_t, cap), "int16")
        counts, cnv = P.new((m, n_t), "int32")
        _, ovc = P.new((max(m * n_t, 1),), "int32")
        _, ovoff = P.new((max(m * n_t, 1),), "int64")
        indptr, ipv = P.new((m + 1,), idx_dt)
        P.launch(kern.pack_tiles, (m, n_t), nt, xv, thr, relu, tile, vv, cv, cnv, ovc)
        P.launch(kern.pack_scan, (1,), nt, ovc, m, n_t, ipv, ovoff)
        # The one host read of the backend: the exact overflow total sizes the CSR (nothing is
        # dropped, nothing is re-run); it is 0, and the overflow None, whenever every tile fits.
        total = P.read_int(ipv, m)
        overflow = None
        if total > 0:
            indices, iv = P.new((total,), idx_dt)
            data, dv = P.new((total,), dt)
            P.launch(kern.pack_overflow, (m, n_t), nt, xv, thr, relu, tile, cap, ovc, ovoff, iv, dv)
            overflow = CSR(indptr, indices, data, (m, k))
    return TiledELL(values, cols, counts, (m, k), tile, overflow)


def unpack(inp: I.UnpackInputs) -> Any:
    a = inp.a
    dt = a.dtype
    m, k = a.shape
    with Place(a.values) as P:
        out, ov = P.new((m, k), dt)
        if m * k:
            P.launch(kernels(dt).unpack, (m,), _nt(), *_ell_args(P, a), *_overflow_args(P, a, dt), ov)
    return out


def spmm(inp: I.SpmmInputs) -> Any:
    a, w = inp.a, inp.w
    dt = dtype_name(w)
    m = a.shape[0]
    n = int(w.shape[1])
    kern, nt = kernels(dt), _nt()
    with Place(w) as P:
        out, ov = P.new((m, n), dt)
        if m * n:
            grid = (m, _cdiv(n, nt))
            if isinstance(a, TiledELL):
                P.launch(kern.spmm_ell, grid, nt, *_ell_args(P, a), *_overflow_args(P, a, dt), P.view(w), ov)
            else:
                P.launch(kern.spmm_csr, grid, nt, P.view(a.indptr), P.view(a.indices), P.view(a.data),
                         P.view(w), ov)
    return out


def _sddmm_csr(P: Place, kern: Any, x: Any, w: Any, c: CSR, dt: str) -> CSR:
    data, dv = P.new((c.nnz,), dt)
    if c.nnz:
        P.launch(kern.sddmm_csr, (c.shape[0],), _nt(), P.view(x), P.view(w), P.view(c.indptr),
                 P.view(c.indices), dv)
    return CSR(c.indptr, c.indices, data, c.shape, c.sorted)


def sddmm(inp: I.SddmmInputs) -> Any:
    x, w, p = inp.x, inp.w, inp.pattern
    dt = dtype_name(x)
    kern = kernels(dt)
    with Place(x) as P:
        if isinstance(p, CSR):
            return _sddmm_csr(P, kern, x, w, p, dt)
        values, vv = P.new(tuple(p.values.shape), dt)
        m, n_t = p.shape[0], p.n_tiles
        if m * n_t * p.capacity:
            P.launch(kern.sddmm_ell, (m, n_t), _nt(), P.view(x), P.view(w), P.view(p.cols), P.view(p.counts),
                     p.tile, vv)
        overflow = None if p.overflow is None else _sddmm_csr(P, kern, x, w, p.overflow, dt)
    return TiledELL(values, p.cols, p.counts, p.shape, p.tile, overflow, p.sorted)


def spmm_t(inp: I.SpmmTInputs) -> Any:
    a, dy = inp.a, inp.dy
    dt = dtype_name(dy)
    m, k = a.shape
    n = int(dy.shape[1])
    kern, nt = kernels(dt), _nt()
    with Place(dy) as P:
        out, ov = P.new((k, n), dt)
        if k * n == 0:
            return out
        # float32 atomics need a float32 target: the output itself, or a scratch cast at the end
        acc = ov if dt == "float32" else P.new((k, n), "float32")[1]
        P.fill(acc, np.float32(0.0), nt)
        grid = (m, _cdiv(n, nt))
        if isinstance(a, TiledELL):
            P.launch(kern.spmm_t_ell, grid, nt, *_ell_args(P, a), *_overflow_args(P, a, dt), P.view(dy), acc)
        else:
            P.launch(kern.spmm_t_csr, grid, nt, P.view(a.indptr), P.view(a.indices), P.view(a.data),
                     P.view(dy), acc)
        if dt != "float32":
            P.launch(kern.cast_out, (min(_cdiv(k * n, nt), 4096),), nt, acc, ov)
    return out


def gated_ffn(inp: I.GatedFfnInputs) -> Any:
    x, gate, w_up, w_down = inp.x, inp.gate, inp.w_up, inp.w_down
    dt = dtype_name(x)
    m = gate.shape[0]
    n = int(w_down.shape[1])
    kern, nt = kernels(dt), _nt()
    with Place(x) as P:
        out, ov = P.new((m, n), dt)
        if m * n:
            grid = (m, _cdiv(n, nt * int(common().CPT)))
            if isinstance(gate, TiledELL):
                P.launch(kern.gated_ell, grid, nt, P.view(x), P.view(gate.values), P.view(gate.cols),
                         P.view(gate.counts), gate.tile, *_overflow_args(P, gate, dt), P.view(w_up),
                         P.view(w_down), ov)
            else:
                P.launch(kern.gated_csr, grid, nt, P.view(x), P.view(gate.indptr), P.view(gate.indices),
                         P.view(gate.data), P.view(w_up), P.view(w_down), ov)
    return out


# ---- decode ops ---------------------------------------------------------------------------------

def _kv_args(P: Place, kv: DenseKV | PagedKV) -> tuple[Any, ...]:
    """(k, v, page_table, lengths, page_size, dense) for the kernels: a dense cache is read as pages
    of its whole length, one per sequence (page_table is then a dummy that is never read)."""
    if isinstance(kv, DenseKV):
        return (P.view(kv.k), P.view(kv.v), P.new((1, 1), "int32")[1], P.view(kv.lengths),
                int(kv.k.shape[1]), 1)
    return (P.view(kv.k_pages), P.view(kv.v_pages), P.view(kv.page_table), P.view(kv.lengths), kv.page_size, 0)


def page_bounds(inp: I.PageBoundsInputs) -> PageBounds:
    kv = inp.kv
    dt = kv.dtype
    ups = int(inp.unit_page_size)
    shape = (kv.batch, int(inp.num_pages), kv.num_kv_heads, kv.head_dim)
    with Place(kv.lengths) as P:
        if inp.out is None:  # fresh: every page written, those past a sequence's length with 0
            kmin, kmin_v = P.new(shape, dt)
            kmax, kmax_v = P.new(shape, dt)
            res = PageBounds(kmin, kmax, ups)
        else:
            res = inp.out
            kmin_v, kmax_v = P.view(res.kmin), P.view(res.kmax)
        if inp.start is None:
            start, has_start = P.new((1,), "int32")[1], 0  # a dummy, never read
        else:
            start, has_start = P.view(inp.start), 1
        fresh = 1 if inp.out is None else 0
        k, _, pt, lengths, kv_ps, dense = _kv_args(P, kv)
        P.launch(kernels(dt).page_bounds, (shape[1], shape[2], shape[0]), _nt(), k, pt, lengths, kv_ps, dense,
                 ups, start, has_start, fresh, kmin_v, kmax_v)
    return res


def select_topk(inp: I.SelectTopkInputs) -> TopKIndex:
    q, kv = inp.q, inp.kv
    dt = dtype_name(q)
    b, hq, _ = (int(s) for s in q.shape)
    hkv = kv.num_kv_heads
    group = hq // hkv
    g_rows = hkv if inp.shared else hq
    ps = inp.unit_page_size
    ups = 1 if ps is None else int(ps)
    n_units = _cdiv(kv.max_len, ups)
    k_max = inp.k_max
    nt = _nt()
    kern = kernels(dt)
    with Place(q) as P:
        indices, iv = P.new((b, g_rows, k_max), "int32")
        counts, cv = P.new((b, g_rows), "int32")
        if b * g_rows:
            _, sv = P.new((b, g_rows, max(n_units, 1)), "float32")
            kk, _, pt, lengths, kv_ps, dense = _kv_args(P, kv)
            shared = 1 if inp.shared else 0
            if inp.k > 0:  # with k == 0 only the forced units are kept and no score is read
                grid = (_cdiv(n_units, nt), hkv, b)
                mass = bool(inp.candidates) or inp.top_p is not None  # each head's scores, then every key's mass
                if ps is None:
                    out = P.new((b, hq, max(n_units, 1)), "float32")[1] if mass else sv
                    if inp.method == "int8":  # the keys' int8 copy (codes in token order, paged or not)
                        P.launch(kern.topk_scores_int8, grid, nt, P.view(q), P.view(inp.codes.codes),
                                 P.view(inp.codes.scales), lengths, group, 0 if mass else shared, out)
                    else:
                        P.launch(kern.topk_scores_exact, grid, nt, P.view(q), kk, pt, lengths, kv_ps, dense, group,
                                 0 if mass else shared, out)
                    if mass:  # (input_reasons refuse a pool of candidates: every key is one)
                        scale = np.float32(1.0 / math.sqrt(kv.head_dim) if inp.scale is None else inp.scale)
                        P.launch(common().mass_of_every_key, (g_rows, b), nt, out, lengths, group, shared, scale, sv)
                elif inp.bounds is not None:  # the pages' min/max from the bounds, not the keys
                    P.launch(kern.topk_scores_quest_bounds, grid, nt, P.view(q), P.view(inp.bounds.kmin),
                             P.view(inp.bounds.kmax), lengths, group, shared, ups, sv)
                else:
                    P.launch(kern.topk_scores_quest, grid, nt, P.view(q), kk, pt, lengths, kv_ps, dense, group,
                             shared, ups, sv)
                if inp.method == "int8" and inp.rescore > inp.k:  # the pool's exact scores; NaN elsewhere
                    pool_max = topk_capacity(int(inp.rescore), int(inp.sink), inp.forced_window, kv.max_len, None)
                    pv, pcv = P.new((b, g_rows, pool_max), "int32")[1], P.new((b, g_rows), "int32")[1]
                    P.launch(common().topk_select, (g_rows, b), nt, sv, lengths, 1, int(inp.sink), inp.forced_window,
                             int(inp.rescore), pv, pcv)
                    P.launch(kern.rescore_pool, (g_rows, b), nt, P.view(q), kk, pt, lengths, kv_ps, dense, group,
                             shared, int(inp.sink), inp.forced_window, pv, pcv, sv)
            P.launch(common().topk_select, (g_rows, b), nt, sv, lengths, ups, int(inp.sink), inp.forced_window,
                     int(inp.k), iv, cv)
            if inp.top_p is not None and inp.k > 0:  # the adaptive budget: as few of the k as cover top_p
                n_sort = 1 << (int(inp.k) - 1).bit_length()
                if max(n_sort, k_max) > CUT_SHARED:  # the row's sort in global memory
                    ws = (P.new((b * g_rows, n_sort), "float32")[1], P.new((b * g_rows, n_sort), "int32")[1],
                          P.new((b * g_rows, k_max), "int32")[1], 1)
                else:  # never read: this row's own buffers stand in, no allocation
                    ws = (sv[0], iv[0], iv[0], 0)
                P.launch(common().top_p_cut, (g_rows, b), nt, sv, lengths, int(inp.sink), inp.forced_window,
                         np.float32(inp.top_p), int(inp.k_min), n_sort, iv, cv, *ws)
    return TopKIndex(indices, counts, "token" if ps is None else "page", ps)


def _decode(P: Place, q: Any, kv: DenseKV | PagedKV, scale: float | None, index: TopKIndex | None
            ) -> tuple[Any, Any]:
    dt = dtype_name(q)
    b, hq, d = (int(s) for s in q.shape)
    hkv = kv.num_kv_heads
    group = hq // hkv
    kern, nt = kernels(dt), _nt()
    split = int(common().SPLIT)
    scale32 = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    out, ov = P.new((b, hq, d), dt)
    lse, lv = P.new((b, hq), "float32")
    if b * hq == 0:
        return out, lse
    if index is None:  # dense: every token, one block per KV group (each K/V row read once per group)
        mode, ups, g_rows, hpb = 0, 1, hkv, group
        max_slots = kv.max_len
        iv, icv = P.new((1, 1, 1), "int32")[1], P.new((1, 1), "int32")[1]
    else:
        shared = index.groups == hkv
        mode = 1 if index.granularity == "token" else 2
        ups = 1 if index.page_size is None else int(index.page_size)
        g_rows, hpb = (hkv, group) if shared else (hq, 1)
        max_slots = index.k_max * ups
        iv, icv = P.view(index.indices), P.view(index.counts)
    n_split = max(1, _cdiv(max_slots, split))
    if n_split > 1:
        po, pl = P.new((b, hq, n_split, d), "float32")[1], P.new((b, hq, n_split), "float32")[1]
    else:
        po, pl = P.new((1, 1, 1, 1), "float32")[1], P.new((1, 1, 1), "float32")[1]
    P.launch(kern.decode_split, (n_split, g_rows, b), nt, P.view(q), *_kv_args(P, kv), iv, icv, mode, ups, hpb,
             group, scale32, ov, lv, po, pl)
    if n_split > 1:
        P.launch(kern.decode_merge, (hq, b), nt, po, pl, ov, lv)
    return out, lse


def sparse_decode(inp: I.SparseDecodeInputs) -> tuple[Any, Any]:
    with Place(inp.q) as P:
        return _decode(P, inp.q, inp.kv, inp.scale, inp.index)


def dense_decode(inp: I.DenseDecodeInputs) -> tuple[Any, Any]:
    with Place(inp.q) as P:
        return _decode(P, inp.q, inp.kv, inp.scale, None)


def merge_attention(inp: I.MergeAttentionInputs) -> tuple[Any, Any]:
    o1, o2 = inp.o1, inp.o2
    dt = dtype_name(o1)
    shape = tuple(int(s) for s in o1.shape)
    d = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    nt = _nt()
    with Place(o1) as P:
        out = P.empty(shape, dt)
        lse = P.empty(shape[:-1], "float32")
        if rows:
            work = rows * max(d, 1)
            P.launch(kernels(dt).merge, (min(_cdiv(work, nt), 4096),), nt,
                     P.view(_rows(o1, rows, d)), P.view(_rows(inp.lse1, rows)), P.view(_rows(o2, rows, d)),
                     P.view(_rows(inp.lse2, rows)), P.view(out.reshape(rows, d)), P.view(lse.reshape(rows)))
    return out, lse


def _rows(x: Any, *shape: int) -> Any:
    """``x`` reshaped (a view when contiguous; torch and CuPy copy on the device otherwise)."""
    return x.reshape(*shape)
