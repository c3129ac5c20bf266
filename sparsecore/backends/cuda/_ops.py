"""Host side of every CUDA C op, written once for both launchers against the small :class:`Runtime`
interface (allocate in the caller's library, take a device pointer, launch a named kernel on the
caller's stream). Imports no GPU library; ``cupy`` and ``cuda_python`` each provide a Runtime.

No op synchronises with the host except ``pack``, which reads one integer (the exact overflow
total, to size the overflow CSR) when some tile is over capacity; see ``docs/kernels.md``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from ..._arrays import dtype_name
from ...formats.csr import CSR
from ...formats.kv import DenseKV, PageBounds, PagedKV
from ...formats.tiled_ell import TiledELL
from ...formats.topk import TopKIndex, topk_capacity
from ...ops import inputs as I
from . import (
    CUT_CAP,
    ITYPE,
    NT_ATTN,
    NT_FFN,
    NT_PACK,
    NT_SCAN,
    NT_SELECT,
    VALUE_BYTES,
    aligned,
    cdiv,
    grid_1d,
    page_bounds_blocks,
    plan_decode,
    thr32,
    value_ctype,
    vec,
    vpl_for,
)


class Runtime(Protocol):
    """What an op needs from a launcher, for one call (one library, device and stream)."""

    sm_count: int

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any: ...

    def ptr(self, x: Any) -> int: ...

    def contig(self, x: Any) -> Any: ...

    def launch(self, src: str, dtype: str, name: str, grid: tuple[int, int, int], block: int,
               args: list[Any]) -> None: ...

    def read_int(self, x: Any, i: int) -> int: ...


#: the most units (k rounded up to a power of two, and k + sink + window) a row of the adaptive
#: budget sorts in shared memory (CUT_CAP); above it the sort runs in a global workspace (tests lower
#: it to exercise that path on small rows)
CUT_SHARED = CUT_CAP


def p(rt: Runtime, x: Any) -> np.uint64:
    return np.uint64(rt.ptr(x))


def i32(v: int) -> np.int32:
    return np.int32(v)


def i64(v: int) -> np.int64:
    return np.int64(v)


def f32(v: float) -> np.float32:
    return np.float32(v)


def _go(rt: Runtime, src: str, dtype: str, name: str, grid: tuple[int, ...], block: int, args: list[Any]) -> None:
    g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
    if min(g) <= 0:
        return  # an empty grid: nothing to do (CUDA rejects a zero dimension)
    if g[1] > 65535 or g[2] > 65535:
        raise ValueError(f"cuda: grid {g} exceeds 65535 blocks in y or z for kernel {name}")
    rt.launch(src, dtype, name, g, block, args)  # type: ignore[arg-type]


def _idx(sparse: CSR) -> tuple[str, str]:
    return ITYPE[dtype_name(sparse.indptr)], ITYPE[dtype_name(sparse.indices)]


def index_reasons(a: Any) -> list[str]:
    """The CSR index dtypes the kernels are instantiated for: indptr and indices both int32 or both int64."""
    csr = a.overflow if isinstance(a, TiledELL) else a
    if csr is None:
        return []
    pi, ii = dtype_name(csr.indptr), dtype_name(csr.indices)
    if pi != ii:
        return [f"CSR indptr is {pi} but indices is {ii}; the CUDA C kernels take both int32 or both int64"]
    return []


class _Dummy:
    """One small buffer per call whose pointer stands in for absent optional buffers (never read)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.buf: Any = None

    def __call__(self) -> np.uint64:
        if self.buf is None:
            self.buf = self.rt.empty((4,), "int64")
        return p(self.rt, self.buf)


def _ell_args(rt: Runtime, a: TiledELL) -> list[Any]:
    return [p(rt, rt.contig(a.values)), p(rt, rt.contig(a.cols)), p(rt, rt.contig(a.counts)), i32(a.n_tiles),
            i32(a.tile), i32(a.capacity)]


def _ovf_args(rt: Runtime, a: TiledELL, dummy: _Dummy) -> tuple[list[Any], tuple[str, str]]:
    if a.overflow is None:
        return [i32(0), dummy(), dummy(), dummy()], ("int", "int")
    o = a.overflow
    return [i32(1), p(rt, rt.contig(o.indptr)), p(rt, rt.contig(o.indices)), p(rt, rt.contig(o.data))], _idx(o)


def _csr_args(rt: Runtime, c: CSR) -> list[Any]:
    return [p(rt, rt.contig(c.indptr)), p(rt, rt.contig(c.indices)), p(rt, rt.contig(c.data))]


def _al(rt: Runtime, arrays: list[Any], row_elems: list[int], dt: str) -> np.int32:
    return i32(int(aligned([rt.ptr(x) for x in arrays], [n * VALUE_BYTES[dt] for n in row_elems])))


# ---- FFN ------------------------------------------------------------------------------------------

def pack(rt: Runtime, inp: I.PackInputs) -> TiledELL:
    x = rt.contig(inp.x)
    dt = dtype_name(x)
    t = value_ctype(dt)
    m, k = (int(s) for s in x.shape)
    tile, cap = int(inp.tile), int(inp.capacity)
    n_t = cdiv(k, tile)
    idx = "int64" if m * k >= 2**31 else "int32"
    ic = ITYPE[idx]
    values = rt.empty((m, n_t, cap), dt)
    cols = rt.empty((m, n_t, cap), "int16")
    counts = rt.empty((m, n_t), "int32")
    ovc = rt.empty((max(m * n_t, 1),), "int32")
    off = rt.empty((max(m * n_t, 1),), "int64")
    indptr = rt.empty((m + 1,), idx)
    thr, relu = f32(thr32(inp.threshold)), i32(1 if inp.activation == "relu" else 0)
    _go(rt, "ffn.cu", dt, f"pack_tiles<{t}, {NT_PACK}>", (m, n_t), NT_PACK,
        [p(rt, x), i32(m), i32(k), thr, relu, i32(tile), i32(cap), p(rt, values), p(rt, cols), p(rt, counts),
         p(rt, ovc)])
    _go(rt, "ffn.cu", dt, f"pack_scan<{ic}, {NT_SCAN}>", (1,), NT_SCAN,
        [p(rt, ovc), i32(m), i32(n_t), p(rt, indptr), p(rt, off)])
    # The one host read of the backend: the exact overflow total sizes the CSR, so nothing is
    # dropped and nothing re-runs. Skipped when no tile can overflow (capacity == tile).
    total = 0 if cap >= tile else rt.read_int(indptr, m)
    overflow = None
    if total > 0:
        indices = rt.empty((total,), idx)
        data = rt.empty((total,), dt)
        _go(rt, "ffn.cu", dt, f"pack_overflow<{t}, {ic}, {NT_PACK}>", (m, n_t), NT_PACK,
            [p(rt, x), i32(m), i32(k), thr, relu, i32(tile), i32(cap), p(rt, ovc), p(rt, off), p(rt, indices),
             p(rt, data)])
        overflow = CSR(indptr, indices, data, (m, k))
    return TiledELL(values, cols, counts, (m, k), tile, overflow)


def unpack(rt: Runtime, inp: I.UnpackInputs) -> Any:
    a = inp.a
    dt = a.dtype
    m, k = a.shape
    out = rt.empty((m, k), dt)
    d = _Dummy(rt)
    ell = _ell_args(rt, a)
    ovf, (pc, ic) = _ovf_args(rt, a, d)
    _go(rt, "ffn.cu", dt, f"unpack<{value_ctype(dt)}, {pc}, {ic}, {NT_PACK}>", (m,), NT_PACK,
        [ell[0], ell[1], ell[2], i32(k), ell[3], ell[4], ell[5], *ovf, p(rt, out)])
    return out


def spmm(rt: Runtime, inp: I.SpmmInputs) -> Any:
    a, w = inp.a, rt.contig(inp.w)
    dt = dtype_name(w)
    t, v = value_ctype(dt), vec(dt)
    m, n = a.shape[0], int(w.shape[1])
    out = rt.empty((m, n), dt)
    grid = (m, cdiv(n, NT_FFN * v))
    al = _al(rt, [w, out], [n], dt)
    if isinstance(a, TiledELL):
        ovf, (pc, ic) = _ovf_args(rt, a, _Dummy(rt))
        _go(rt, "ffn.cu", dt, f"spmm_ell<{t}, {pc}, {ic}, {NT_FFN}, {v}>", grid, NT_FFN,
            [*_ell_args(rt, a), *ovf, p(rt, w), i32(n), al, p(rt, out)])
    else:
        pc, ic = _idx(a)
        _go(rt, "ffn.cu", dt, f"spmm_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>", grid, NT_FFN,
            [*_csr_args(rt, a), p(rt, w), i32(n), al, p(rt, out)])
    return out


def _sddmm_csr(rt: Runtime, x: Any, w: Any, c: CSR, dt: str) -> CSR:
    data = rt.empty((c.nnz,), dt)
    if c.nnz:
        t, v, d = value_ctype(dt), vec(dt), int(x.shape[1])
        pc, ic = _idx(c)
        _go(rt, "ffn.cu", dt, f"sddmm_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>", (c.shape[0],), NT_FFN,
            [p(rt, x), p(rt, w), i32(d), _al(rt, [x, w], [d], dt), p(rt, rt.contig(c.indptr)),
             p(rt, rt.contig(c.indices)), p(rt, data)])
    return CSR(c.indptr, c.indices, data, c.shape, c.sorted)


def sddmm(rt: Runtime, inp: I.SddmmInputs) -> Any:
    x, w, pat = rt.contig(inp.x), rt.contig(inp.w), inp.pattern
    dt = dtype_name(x)
    if isinstance(pat, CSR):
        return _sddmm_csr(rt, x, w, pat, dt)
    t, v, d = value_ctype(dt), vec(dt), int(x.shape[1])
    values = rt.empty(tuple(int(s) for s in pat.values.shape), dt)
    _go(rt, "ffn.cu", dt, f"sddmm_ell<{t}, {NT_FFN}, {v}>", (pat.shape[0], pat.n_tiles), NT_FFN,
        [p(rt, x), p(rt, w), i32(d), _al(rt, [x, w], [d], dt), p(rt, rt.contig(pat.cols)),
         p(rt, rt.contig(pat.counts)), i32(pat.tile), i32(pat.capacity), p(rt, values)])
    overflow = None if pat.overflow is None else _sddmm_csr(rt, x, w, pat.overflow, dt)
    return TiledELL(values, pat.cols, pat.counts, pat.shape, pat.tile, overflow, pat.sorted)


def spmm_t(rt: Runtime, inp: I.SpmmTInputs) -> Any:
    a, dy = inp.a, rt.contig(inp.dy)
    dt = dtype_name(dy)
    t, v = value_ctype(dt), vec(dt)
    m, k = a.shape
    n = int(dy.shape[1])
    out = rt.empty((k, n), dt)
    if k * n == 0:
        return out
    acc = out if dt == "float32" else rt.empty((k, n), "float32")  # float32 atomics need a float32 target
    _go(rt, "ffn.cu", dt, "fill_zero_f32", (grid_1d(k * n, 256, 4096),), 256, [p(rt, acc), i64(k * n)])
    grid = (m, cdiv(n, NT_FFN * v))
    al = _al(rt, [dy], [n], dt)
    if isinstance(a, TiledELL):
        ovf, (pc, ic) = _ovf_args(rt, a, _Dummy(rt))
        _go(rt, "ffn.cu", dt, f"spmm_t_ell<{t}, {pc}, {ic}, {NT_FFN}, {v}>", grid, NT_FFN,
            [*_ell_args(rt, a), *ovf, p(rt, dy), i32(n), al, p(rt, acc)])
    else:
        pc, ic = _idx(a)
        _go(rt, "ffn.cu", dt, f"spmm_t_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>", grid, NT_FFN,
            [*_csr_args(rt, a), p(rt, dy), i32(n), al, p(rt, acc)])
    if dt != "float32":
        _go(rt, "ffn.cu", dt, f"cast_from_f32<{t}>", (grid_1d(k * n, 256, 4096),), 256,
            [p(rt, acc), i64(k * n), p(rt, out)])
    return out


def gated_ffn(rt: Runtime, inp: I.GatedFfnInputs) -> Any:
    x, gate = rt.contig(inp.x), inp.gate
    w_up, w_down = rt.contig(inp.w_up), rt.contig(inp.w_down)
    dt = dtype_name(x)
    t, v = value_ctype(dt), vec(dt)
    m, d, n = gate.shape[0], int(x.shape[1]), int(w_down.shape[1])
    out = rt.empty((m, n), dt)
    grid = (m, cdiv(n, NT_FFN * v))
    al_d, al_n = _al(rt, [x, w_up], [d], dt), _al(rt, [w_down, out], [n], dt)
    if isinstance(gate, TiledELL):
        ovf, (pc, ic) = _ovf_args(rt, gate, _Dummy(rt))
        _go(rt, "ffn.cu", dt, f"gated_ell<{t}, {pc}, {ic}, {NT_FFN}, {v}>", grid, NT_FFN,
            [p(rt, x), i32(d), al_d, *_ell_args(rt, gate), *ovf, p(rt, w_up), p(rt, w_down), i32(n), al_n,
             p(rt, out)])
    else:
        pc, ic = _idx(gate)
        _go(rt, "ffn.cu", dt, f"gated_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>", grid, NT_FFN,
            [p(rt, x), i32(d), al_d, *_csr_args(rt, gate), p(rt, w_up), p(rt, w_down), i32(n), al_n,
             p(rt, out)])
    return out


# ---- attention ------------------------------------------------------------------------------------

def _kv_args(rt: Runtime, kv: DenseKV | PagedKV, dummy: _Dummy) -> tuple[list[Any], list[Any]]:
    """(the flat KvView arguments, the K/V arrays for the alignment check)."""
    if isinstance(kv, DenseKV):
        k, v = rt.contig(kv.k), rt.contig(kv.v)
        args = [p(rt, k), p(rt, v), dummy(), p(rt, rt.contig(kv.lengths)), i32(0), i32(kv.max_len), i32(1), i32(1),
                i32(kv.num_kv_heads), i32(kv.head_dim)]
    else:
        k, v = rt.contig(kv.k_pages), rt.contig(kv.v_pages)
        pt = rt.contig(kv.page_table)
        args = [p(rt, k), p(rt, v), p(rt, pt), p(rt, rt.contig(kv.lengths)), i32(1), i32(0), i32(kv.page_size),
                i32(int(pt.shape[1])), i32(kv.num_kv_heads), i32(kv.head_dim)]
    return args, [k, v]


def page_bounds(rt: Runtime, inp: I.PageBoundsInputs) -> PageBounds:
    """Quest metadata of the cache; ``out`` (if given) is written in place, so its arrays must be
    C-contiguous (the classes refuse others). A fresh result is zero-filled by the kernel itself."""
    kv = inp.kv
    dt = kv.dtype
    ps = int(inp.unit_page_size)
    n_pages = int(inp.num_pages)
    shape = (kv.batch, n_pages, kv.num_kv_heads, kv.head_dim)
    if inp.out is None:
        res = PageBounds(rt.empty(shape, dt), rt.empty(shape, dt), ps)
    else:
        res = inp.out
    dummy = _Dummy(rt)
    kva, _ = _kv_args(rt, kv, dummy)
    has_start = inp.start is not None
    start = p(rt, rt.contig(inp.start)) if has_start else dummy()
    x = page_bounds_blocks(kv.batch, n_pages, rt.sm_count)
    _go(rt, "attention.cu", dt, f"page_bounds<{value_ctype(dt)}, {NT_ATTN}>", (x, kv.batch),
        NT_ATTN, [*kva, i32(ps), i32(n_pages), i32(int(has_start)), start, i32(int(inp.out is None)),
                  p(rt, res.kmin), p(rt, res.kmax)])
    return res


def select_topk(rt: Runtime, inp: I.SelectTopkInputs) -> TopKIndex:
    q, kv = rt.contig(inp.q), inp.kv
    dt = dtype_name(q)
    t = value_ctype(dt)
    b, hq, d = (int(s) for s in q.shape)
    hkv = kv.num_kv_heads
    group = hq // hkv
    per_head = not inp.shared
    g_rows = hq if per_head else hkv
    ps = inp.unit_page_size
    ups = 1 if ps is None else int(ps)
    n_units = cdiv(kv.max_len, ups)
    k_max = inp.k_max
    indices = rt.empty((b, g_rows, k_max), "int32")
    counts = rt.empty((b, g_rows), "int32")
    if b * g_rows == 0:
        return TopKIndex(indices, counts, "token" if ps is None else "page", ps)
    dummy = _Dummy(rt)
    kva, kvarr = _kv_args(rt, kv, dummy)
    scores = rt.empty((b, g_rows, max(n_units, 1)), "float32")
    if inp.k > 0 and n_units > 0:  # k == 0 keeps only the forced units: no score is read
        nw = NT_ATTN // 32
        bnd = inp.bounds if ps is not None else None
        if bnd is None:
            ba, barr = [i32(0), dummy(), dummy(), i32(0)], []
        else:
            bmin, bmax = rt.contig(bnd.kmin), rt.contig(bnd.kmax)
            ba, barr = [i32(1), p(rt, bmin), p(rt, bmax), i32(bnd.num_pages)], [bmin, bmax]
        mass = bool(inp.candidates) or inp.top_p is not None  # each head's scores, then every key's mass
        rows, out = (hq, rt.empty((b, hq, n_units), "float32")) if mass else (g_rows, scores)
        if inp.method == "int8":  # the keys' int8 copy (codes in token order, paged cache or not)
            cc, cs = rt.contig(inp.codes.codes), rt.contig(inp.codes.scales)
            _go(rt, "attention.cu", dt, f"topk_scores_int8<{t}, {NT_ATTN}, {vpl_for(d)}>",
                (cdiv(n_units, nw), rows, b), NT_ATTN,
                [p(rt, q), i32(hq), p(rt, cc), p(rt, cs), kva[3], i32(int(cc.shape[1])), i32(hkv), i32(d),
                 i32(group), i32(int(per_head or mass)), i32(n_units), _al(rt, [q], [d], dt), p(rt, out)])
        else:
            _go(rt, "attention.cu", dt, f"topk_scores<{t}, {NT_ATTN}, {vpl_for(d)}>", (cdiv(n_units, nw), rows, b),
                NT_ATTN, [p(rt, q), i32(hq), *kva, i32(group), i32(int(per_head or mass)), i32(int(ps is not None)),
                          i32(ups), i32(n_units), *ba, _al(rt, [q, *kvarr, *barr], [d], dt), p(rt, out)])
        if inp.method == "int8" and inp.rescore > inp.k:  # the pool's exact scores, NaN elsewhere
            pool_max = topk_capacity(int(inp.rescore), int(inp.sink), inp.forced_window, kv.max_len, None)
            pool, pool_counts = rt.empty((b, g_rows, pool_max), "int32"), rt.empty((b, g_rows), "int32")
            _go(rt, "attention.cu", dt, f"topk_select<{NT_SELECT}>", (g_rows, b), NT_SELECT,
                [p(rt, scores), i32(max(n_units, 1)), kva[3], i32(0), i32(1), i32(int(inp.rescore)),
                 i32(int(inp.sink)), i32(inp.forced_window), i32(pool_max), p(rt, pool), p(rt, pool_counts)])
            _go(rt, "attention.cu", dt, f"rescore_pool<{t}, {NT_SELECT}>", (g_rows, b), NT_SELECT,
                [p(rt, q), i32(hq), *kva, i32(group), i32(int(per_head)), i32(int(inp.sink)), i32(inp.forced_window),
                 p(rt, pool), p(rt, pool_counts), i32(pool_max), i32(max(n_units, 1)), p(rt, scores)])
        if mass:  # (the reasons refuse a pool of candidates: every key is one)
            scale = 1.0 / math.sqrt(d) if inp.scale is None else float(inp.scale)
            _go(rt, "attention.cu", dt, f"mass_of_every_key<{NT_SELECT}>", (g_rows, b), NT_SELECT,
                [p(rt, out), i32(n_units), kva[3], i32(group), i32(int(not per_head)), f32(scale), p(rt, scores)])
    _go(rt, "attention.cu", dt, f"topk_select<{NT_SELECT}>", (g_rows, b), NT_SELECT,
        [p(rt, scores), i32(max(n_units, 1)), kva[3], i32(int(ps is not None)), i32(ups), i32(int(inp.k)),
         i32(int(inp.sink)), i32(inp.forced_window), i32(k_max), p(rt, indices), p(rt, counts)])
    if inp.top_p is not None and inp.k > 0:  # the adaptive budget: as few of the k as cover top_p
        n_sort = 1 << (int(inp.k) - 1).bit_length()
        ws = [rt.empty((b * g_rows, n_sort), "float32"), rt.empty((b * g_rows, n_sort), "int32"),
              rt.empty((b * g_rows, k_max), "int32")] if max(n_sort, k_max) > CUT_SHARED else []
        _go(rt, "attention.cu", dt, f"top_p_cut<{NT_SELECT}, {CUT_CAP}>", (g_rows, b), NT_SELECT,
            [p(rt, scores), i32(max(n_units, 1)), kva[3], i32(int(inp.sink)), i32(inp.forced_window),
             f32(inp.top_p), i32(int(inp.k_min)), i32(n_sort), i32(k_max), p(rt, indices), p(rt, counts),
             *([p(rt, w) for w in ws] if ws else [np.uint64(0)] * 3)])
    return TopKIndex(indices, counts, "token" if ps is None else "page", ps)


def _decode(rt: Runtime, q: Any, kv: DenseKV | PagedKV, scale: float | None, index: TopKIndex | None
            ) -> tuple[Any, Any]:
    q = rt.contig(q)
    dt = dtype_name(q)
    t = value_ctype(dt)
    b, hq, d = (int(s) for s in q.shape)
    hkv = kv.num_kv_heads
    group = hq // hkv
    out = rt.empty((b, hq, d), dt)
    lse = rt.empty((b, hq), "float32")
    if b * hq == 0:
        return out, lse
    dummy = _Dummy(rt)
    kva, kvarr = _kv_args(rt, kv, dummy)
    if index is None:
        mode, ups, g, k_max, max_keys, per_index = 0, 1, hkv, 1, kv.max_len, False
        ia, ca = dummy(), dummy()
    else:
        mode = 1 if index.granularity == "token" else 2
        ups = 1 if index.page_size is None else int(index.page_size)
        g, k_max = index.groups, index.k_max
        max_keys, per_index = k_max * ups, g != hkv
        ia, ca = p(rt, rt.contig(index.indices)), p(rt, rt.contig(index.counts))
    plan = plan_decode(b, hq, hkv, d, max_keys, per_index, rt.sm_count)
    scale32 = f32(1.0 / math.sqrt(d) if scale is None else scale)
    if plan.splits > 1:
        o_part = rt.empty((plan.splits, b, hq, max(d, 1)), "float32")
        l_part = rt.empty((plan.splits, b, hq), "float32")
        po, pl = p(rt, o_part), p(rt, l_part)
    else:
        po, pl = dummy(), dummy()
    _go(rt, "attention.cu", dt, f"decode_split<{t}, {NT_ATTN}, {plan.vpl}, {plan.gmax}>", (plan.splits, plan.rows, b),
        NT_ATTN, [p(rt, q), i32(hq), *kva, i32(group), i32(int(plan.per_head)), i32(mode), ia, ca, i32(g),
                  i32(k_max), i32(ups), i32(plan.chunk), scale32, _al(rt, [q, *kvarr], [d], dt), po, pl,
                  p(rt, out), p(rt, lse)])
    if plan.splits > 1:
        _go(rt, "attention.cu", dt, f"decode_merge<{t}, {NT_ATTN}>", (b * hq,), NT_ATTN,
            [po, pl, i32(plan.splits), i64(b * hq), i32(d), p(rt, out), p(rt, lse)])
    return out, lse


def sparse_decode(rt: Runtime, inp: I.SparseDecodeInputs) -> tuple[Any, Any]:
    return _decode(rt, inp.q, inp.kv, inp.scale, inp.index)


def dense_decode(rt: Runtime, inp: I.DenseDecodeInputs) -> tuple[Any, Any]:
    return _decode(rt, inp.q, inp.kv, inp.scale, None)


def merge_attention(rt: Runtime, inp: I.MergeAttentionInputs) -> tuple[Any, Any]:
    o1, o2 = rt.contig(inp.o1), rt.contig(inp.o2)
    l1, l2 = rt.contig(inp.lse1), rt.contig(inp.lse2)
    dt = dtype_name(o1)
    shape = tuple(int(s) for s in o1.shape)
    d = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    out = rt.empty(shape, dt)
    lse = rt.empty(shape[:-1], "float32")
    lc = "double" if dtype_name(l1) == "float64" else "float"
    work = rows * max(d, 1)
    _go(rt, "attention.cu", dt, f"merge_attention<{value_ctype(dt)}, {lc}>", (grid_1d(work, 256, 4096),), 256,
        [p(rt, o1), p(rt, l1), p(rt, o2), p(rt, l2), i64(rows), i32(d), p(rt, out), p(rt, lse)])
    return out, lse
