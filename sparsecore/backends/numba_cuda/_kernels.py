"""The ``@cuda.jit`` kernels of the numba_cuda backend, built once per value dtype.

Imported only when numba-cuda is importable (``_runtime.numba_cuda()`` guards it). Every kernel runs
under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) as well as on a GPU, so reductions and scans go
through shared memory and ``cuda.syncthreads()`` (the simulator has no warp shuffles), and every
barrier is reached by every thread of a block (loops around barriers have block-uniform bounds).

Value dtypes: float32 and float16 arrays are read natively; bfloat16 arrays are passed as uint16 views
and converted with bit operations (``bits << 16``; round-to-nearest-even back). All arithmetic is
float32; float constants are NumPy float32 globals so that Numba does not promote to float64.

Buffers of every kernel are documented at the kernel: shape, element type, who writes it.
"""

from __future__ import annotations

import math
import os
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np
from numba import cuda
from numba import types as nt

from ._limits import CUT_CAP, MAX_GROUP, MAX_HEAD_DIM


def _simulator() -> bool:
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba-cuda keeps the flag in numba's own config
        from numba.core import config  # type: ignore[no-redef]
    return bool(getattr(config, "ENABLE_CUDASIM", 0)) or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


SIM = _simulator()

#: threads per block (a power of two: the tree reductions halve it); the simulator pays per thread.
NT = 32 if SIM else 128
#: decode and select_topk limits (shared-memory staging of the query heads of one KV group).
MAX_D = MAX_HEAD_DIM
#: head dims per thread in the decode V accumulation.
DPT = MAX_D // NT
#: dot products reduced together in sddmm / gated_ffn (one shared-memory tree for R of them).
R = 4
#: output columns per thread in gated_ffn.
CPT = 2 if SIM else 4
#: key slots per split-K decode block (small in the simulator so that tiny shapes split too).
SPLIT = 16 if SIM else 256
# array sizes must be compile-time constants: Numba folds globals, not expressions of them
_QS = MAX_GROUP * MAX_D
_RED = R * NT
_SC = MAX_GROUP * NT
_OD = MAX_GROUP * DPT

F0 = np.float32(0.0)
_FNAN = np.float32(np.nan)
F1 = np.float32(1.0)
NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
F_NAN = np.float32(np.nan)

DTYPES = ("float32", "float16", "bfloat16")

# ---------------------------------------------------------------------------------------------
# bit casts: libdevice on the GPU, NumPy views in the simulator (which runs kernels as Python)

if SIM:
    def _int_as_float(i: Any) -> Any:
        return np.uint32(int(i) & 0xFFFFFFFF).view(np.float32)

    def _float_bits(f: Any) -> int:
        return int(np.float32(f).view(np.uint32))

    _i2f = cuda.jit(device=True)(_int_as_float)
    _fbits = cuda.jit(device=True)(_float_bits)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline="always")
    def _i2f(i):  # pragma: no cover - compiled for the GPU
        return libdevice.int_as_float(nt.int32(i))

    @cuda.jit(device=True, inline="always")
    def _fbits(f):  # pragma: no cover - compiled for the GPU
        return nt.int64(libdevice.float_as_int(f)) & 0xFFFFFFFF


@cuda.jit(device=True, inline="always")
def _ld_bf16(h):
    """bfloat16 bits (uint16) -> float32: the bits are the top half of a float32."""
    return _i2f((nt.int64(h) & 0xFFFF) << 16)


@cuda.jit(device=True, inline="always")
def _st_bf16(f):
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN of the same sign."""
    u = _fbits(f)
    if f != f:
        return nt.uint16(((u >> 16) | 0x40) & 0xFFFF)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return nt.uint16((u >> 16) & 0xFFFF)


@cuda.jit(device=True, inline="always")
def _ld_f(x):
    return nt.float32(x)


@cuda.jit(device=True, inline="always")
def _st_f32(f):
    return nt.float32(f)


@cuda.jit(device=True, inline="always")
def _st_f16(f):
    return nt.float16(f)


@cuda.jit(device=True, inline="always")
def _key(f):
    """Order-preserving map of a float32 onto 0 .. 2**32 - 1 (as int64): a > b iff key(a) > key(b);
    NaN maps to 0, below -inf, as the reference's argsort of -score puts NaN last (and the CUDA C
    ``order_key``). Its bits alone would put a positive NaN above +inf."""
    if f != f:
        return 0
    u = _fbits(f)
    if u >= 0x80000000:
        return u ^ 0xFFFFFFFF
    return u | 0x80000000


# ---------------------------------------------------------------------------------------------
# block-wide helpers: every thread of the block must call them (they hold barriers)

@cuda.jit(device=True, inline="always")
def _scan(buf, tid, v):
    """Exclusive prefix sum of ``v`` over the block (Hillis-Steele in ``buf[NT]``) and the total."""
    buf[tid] = v
    cuda.syncthreads()
    off = 1
    while off < NT:
        x = buf[tid - off] if tid >= off else 0
        cuda.syncthreads()
        buf[tid] += x
        cuda.syncthreads()
        off *= 2
    incl = buf[tid]
    tot = buf[NT - 1]
    cuda.syncthreads()
    return incl - v, tot


@cuda.jit(device=True, inline="always")
def _reduce_rows(red, tid):
    """``red[r * NT] = sum(red[r * NT : (r + 1) * NT])`` for the R rows of ``red[R * NT]``."""
    cuda.syncthreads()
    stride = NT // 2
    while stride > 0:
        if tid < stride:
            for r in range(R):
                red[r * NT + tid] += red[r * NT + tid + stride]
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True, inline="always")
def _fmin(a, v):
    """min(a, v) of float32s that propagates NaN as NumPy's does (once a is NaN it stays NaN)."""
    if v < a or v != v:
        return v
    return a


@cuda.jit(device=True, inline="always")
def _fmax(a, v):
    """max(a, v) of float32s that propagates NaN as NumPy's does."""
    if v > a or v != v:
        return v
    return a


@cuda.jit(device=True, inline="always")
def _quest_store(acc, group, shared, scores, b, kvh, u):
    """Write the Quest scores acc[:group] of page u: summed over the group (shared) or per head."""
    if shared != 0:
        tot = F0
        for j in range(group):
            tot += acc[j]
        scores[b, kvh, u] = tot
    else:
        for j in range(group):
            scores[b, kvh * group + j, u] = acc[j]


@cuda.jit(device=True, inline="always")
def _kv_page_row(dense, page_table, b, t, ps):
    """(page, row) of token ``t`` of sequence ``b``: a dense cache is a paged one with page = b."""
    if dense:
        return b, t
    return page_table[b, t // ps], t % ps


# ---------------------------------------------------------------------------------------------
# kernels, specialised per value dtype through the ``ld`` / ``st`` closures

@cache
def build(dtype: str) -> SimpleNamespace:
    """Every kernel for value dtype ``dtype`` (lazy ``cuda.jit``: compiled on first launch per
    argument types). ``SimpleNamespace`` of dispatchers; ``.py_funcs`` maps names to Python
    functions for ``compile_ptx``."""
    if dtype not in DTYPES:
        raise ValueError(f"numba_cuda kernels: dtype {dtype!r} is not one of {DTYPES}")
    if dtype == "bfloat16":
        ld, st = _ld_bf16, _st_bf16
    elif dtype == "float16":
        ld, st = _ld_f, _st_f16
    else:
        ld, st = _ld_f, _st_f32

    @cuda.jit(device=True, inline="always")
    def dots(x, m, w, js, nj, red, tid):
        """``red[r * NT] = x[m] . w[js[r]]`` for ``r < nj`` (float32), reduced over the block."""
        acc = cuda.local.array(R, nt.float32)
        for r in range(R):
            acc[r] = F0
        for d in range(tid, x.shape[1], NT):
            xv = ld(x[m, d])
            for r in range(nj):
                acc[r] += xv * ld(w[js[r], d])
        for r in range(R):
            red[r * NT + tid] = acc[r]
        _reduce_rows(red, tid)

    @cuda.jit(device=True, inline="always")
    def gated_batch(x, m, w_up, w_down, js, hs, nj, red, tid, n0, acc):
        """One batch of nj gate entries (columns js, gate values hs): acc[cc] += hs[r] *
        (x[m] . w_up[js[r]]) * w_down[js[r], n] for the thread's columns n; ends on a barrier
        because the batch's shared reduction slots are refilled next."""
        dots(x, m, w_up, js, nj, red, tid)
        n_out = w_down.shape[1]
        for r in range(nj):
            h = hs[r] * red[r * NT]
            for cc in range(CPT):
                n = n0 + tid + cc * NT
                if n < n_out:
                    acc[cc] += h * ld(w_down[js[r], n])
        cuda.syncthreads()

    # ---- pack ------------------------------------------------------------------------------
    @cuda.jit(device=True, inline="always")
    def packed_value(x, m, c, relu):
        """x[m, c] as float32, through the ReLU when relu != 0 (what pack stores, before the threshold)."""
        a = ld(x[m, c])
        if relu != 0 and a <= F0:
            a = F0
        return a

    @cuda.jit(device=True, inline="always")
    def kept_rank(x, m, c0, off, width, relu, thr, buf, tid):
        """Whether column c0 + off (off < width) of row m is kept (not |act(x)| <= thr: NaN is kept),
        its rank among the kept entries of this chunk of NT columns (a block scan), and their count."""
        keep = 0
        if off < width:
            a = packed_value(x, m, c0 + off, relu)
            if not (abs(a) <= thr):
                keep = 1
        rank, tot = _scan(buf, tid, keep)
        return keep, rank, tot

    def pack_tiles(x, thr, relu, tile, values, cols, counts, ovc):
        """Grid (M, n_tiles), one block per (row, tile).
        x[M, K] value; thr float32 (an entry is kept iff not |a| <= thr); relu 0/1;
        out: values[M, nt, cap] (raw x elements; padding 0), cols[M, nt, cap] int16 (padding 0),
        counts[M, nt] int32 = min(kept, cap), ovc[M * nt] int32 = kept - counts (overflowing)."""
        m = cuda.blockIdx.x
        t = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        buf = cuda.shared.array(NT, nt.int32)
        cap = values.shape[2]
        c0 = t * tile
        width = min(tile, x.shape[1] - c0)
        base = 0
        for o0 in range(0, width, NT):
            off = o0 + tid
            keep, rank, tot = kept_rank(x, m, c0, off, width, relu, thr, buf, tid)
            rank += base
            if keep != 0 and rank < cap:
                values[m, t, rank] = x[m, c0 + off]  # kept entries equal act(x): copy the raw bits
                cols[m, t, rank] = nt.int16(off)
            base += tot
        cnt = min(base, cap)
        for s in range(cnt + tid, cap, NT):
            values[m, t, s] = st(F0)
            cols[m, t, s] = nt.int16(0)
        if tid == 0:
            counts[m, t] = cnt
            ovc[m * counts.shape[1] + t] = base - cnt

    def pack_scan(ovc, n_rows, n_tiles, indptr, ovoff):
        """One block. ovc[M * nt] int32 -> ovoff[M * nt] int64 exclusive prefix (row-major, so
        the overflow CSR is sorted by row then column), indptr[M + 1] (int32/int64)."""
        tid = cuda.threadIdx.x
        buf = cuda.shared.array(NT, nt.int64)
        n = n_rows * n_tiles
        run = 0
        for i0 in range(0, n, NT):
            i = i0 + tid
            v = 0
            if i < n:
                v = nt.int64(ovc[i])
            ex, tot = _scan(buf, tid, v)
            if i < n:
                ovoff[i] = run + ex
            run += tot
        cuda.syncthreads()
        for m in range(tid, n_rows + 1, NT):
            if m == n_rows:
                indptr[m] = run
            elif n_tiles > 0:
                indptr[m] = ovoff[m * n_tiles]
            else:
                indptr[m] = 0

    def pack_overflow(x, thr, relu, tile, cap, ovc, ovoff, indices, data):
        """Grid (M, n_tiles). Writes the kept entries of rank >= cap of each full tile to the
        overflow CSR at ovoff[m * nt + t] + rank - cap: indices (global column), data (raw x)."""
        m = cuda.blockIdx.x
        t = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        buf = cuda.shared.array(NT, nt.int32)
        i = m * cuda.gridDim.y + t
        if ovc[i] == 0:  # block-uniform exit: no barrier is skipped by only some threads
            return
        start = ovoff[i]
        c0 = t * tile
        width = min(tile, x.shape[1] - c0)
        base = 0
        for o0 in range(0, width, NT):
            off = o0 + tid
            keep, rank, tot = kept_rank(x, m, c0, off, width, relu, thr, buf, tid)
            rank += base
            if keep != 0 and rank >= cap:
                indices[start + rank - cap] = c0 + off
                data[start + rank - cap] = x[m, c0 + off]
            base += tot

    # ---- unpack ----------------------------------------------------------------------------
    def unpack(values, cols, counts, tile, has_ovf, indptr, indices, data, out):
        """Grid (M,). out[M, K] value: zeros, then the filled slots and the overflow of row m."""
        m = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        for c in range(tid, out.shape[1], NT):
            out[m, c] = st(F0)
        cuda.syncthreads()  # the zeros land before the scatter (global memory, one block)
        cap = values.shape[2]
        n = counts.shape[1] * cap
        for j in range(tid, n, NT):
            t = j // cap
            s = j - t * cap
            if s < counts[m, t]:
                out[m, t * tile + cols[m, t, s]] = values[m, t, s]
        if has_ovf != 0:
            for e in range(indptr[m] + tid, indptr[m + 1], NT):
                out[m, indices[e]] = data[e]

    # ---- spmm ------------------------------------------------------------------------------
    def spmm_ell(values, cols, counts, tile, has_ovf, indptr, indices, data, w, out):
        """Grid (M, ceil(N / NT)); thread per output column (coalesced rows of W).
        out[m, n] = sum over stored (m, k, v) of v * w[k, n], float32 accumulation."""
        m = cuda.blockIdx.x
        n = cuda.blockIdx.y * NT + cuda.threadIdx.x
        if n >= w.shape[1]:
            return
        acc = F0
        for t in range(counts.shape[1]):
            k0 = t * tile
            for s in range(counts[m, t]):
                acc += ld(values[m, t, s]) * ld(w[k0 + cols[m, t, s], n])
        if has_ovf != 0:
            for e in range(indptr[m], indptr[m + 1]):
                acc += ld(data[e]) * ld(w[indices[e], n])
        out[m, n] = st(acc)

    def spmm_csr(indptr, indices, data, w, out):
        """Grid (M, ceil(N / NT)): the CSR rows, as spmm_ell."""
        m = cuda.blockIdx.x
        n = cuda.blockIdx.y * NT + cuda.threadIdx.x
        if n >= w.shape[1]:
            return
        acc = F0
        for e in range(indptr[m], indptr[m + 1]):
            acc += ld(data[e]) * ld(w[indices[e], n])
        out[m, n] = st(acc)

    # ---- sddmm -----------------------------------------------------------------------------
    def sddmm_ell(x, w, cols, counts, tile, out_values):
        """Grid (M, n_tiles), one block per (row, tile); R slots per shared-memory reduction.
        out_values[m, t, s] = x[m] . w[t * tile + cols[m, t, s]] for s < counts, else 0."""
        m = cuda.blockIdx.x
        t = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        red = cuda.shared.array(_RED, nt.float32)
        js = cuda.local.array(R, nt.int64)
        cap = out_values.shape[2]
        c = counts[m, t]
        for s0 in range(0, cap, R):
            nj = min(R, c - s0) if c > s0 else 0
            for r in range(nj):
                js[r] = t * tile + cols[m, t, s0 + r]
            dots(x, m, w, js, nj, red, tid)
            if tid < R and s0 + tid < cap:
                out_values[m, t, s0 + tid] = st(red[tid * NT]) if tid < nj else st(F0)
            cuda.syncthreads()

    def sddmm_csr(x, w, indptr, indices, out_data):
        """Grid (M,): out_data[e] = x[m] . w[indices[e]] for the entries e of row m."""
        m = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        red = cuda.shared.array(_RED, nt.float32)
        js = cuda.local.array(R, nt.int64)
        e0 = indptr[m]
        e1 = indptr[m + 1]
        for s0 in range(e0, e1, R):
            nj = min(R, e1 - s0)
            for r in range(nj):
                js[r] = indices[s0 + r]
            dots(x, m, w, js, nj, red, tid)
            if tid < nj:
                out_data[s0 + tid] = st(red[tid * NT])
            cuda.syncthreads()

    # ---- spmm_t ----------------------------------------------------------------------------
    def spmm_t_ell(values, cols, counts, tile, has_ovf, indptr, indices, data, dy, acc):
        """Grid (M, ceil(N / NT)). acc[K, N] float32 (zeroed) += v * dy[m] for stored (m, k, v):
        float32 atomics into the row of W's gradient."""
        m = cuda.blockIdx.x
        n = cuda.blockIdx.y * NT + cuda.threadIdx.x
        if n >= dy.shape[1]:
            return
        g = ld(dy[m, n])
        for t in range(counts.shape[1]):
            k0 = t * tile
            for s in range(counts[m, t]):
                cuda.atomic.add(acc, (k0 + cols[m, t, s], n), ld(values[m, t, s]) * g)
        if has_ovf != 0:
            for e in range(indptr[m], indptr[m + 1]):
                cuda.atomic.add(acc, (indices[e], n), ld(data[e]) * g)

    def spmm_t_csr(indptr, indices, data, dy, acc):
        """Grid (M, ceil(N / NT)): the CSR rows, as spmm_t_ell."""
        m = cuda.blockIdx.x
        n = cuda.blockIdx.y * NT + cuda.threadIdx.x
        if n >= dy.shape[1]:
            return
        g = ld(dy[m, n])
        for e in range(indptr[m], indptr[m + 1]):
            cuda.atomic.add(acc, (indices[e], n), ld(data[e]) * g)

    # ---- gated_ffn -------------------------------------------------------------------------
    @cuda.jit(device=True, inline="always")
    def gated_csr_row(x, m, indptr, indices, data, w_up, w_down, js, hs, red, tid, n0, acc):
        """Row m of a CSR gate (gated_ell's overflow, every row of gated_csr), R entries per batch."""
        e1 = indptr[m + 1]
        for s0 in range(indptr[m], e1, R):
            nj = min(R, e1 - s0)
            for r in range(nj):
                js[r] = indices[s0 + r]
                hs[r] = ld(data[s0 + r])
            gated_batch(x, m, w_up, w_down, js, hs, nj, red, tid, n0, acc)

    @cuda.jit(device=True, inline="always")
    def gated_store(out, m, n0, tid, acc):
        """out[m, n] = acc for the thread's CPT columns n inside the matrix."""
        n_out = out.shape[1]
        for cc in range(CPT):
            n = n0 + tid + cc * NT
            if n < n_out:
                out[m, n] = st(acc[cc])

    def gated_ell(x, values, cols, counts, tile, has_ovf, indptr, indices, data, w_up, w_down, out):
        """Grid (M, ceil(N / (NT * CPT))). For each stored (m, j, g): h = g * (x[m] . w_up[j])
        (R dots per shared reduction), then out[m, n] += h * w_down[j, n] for the block's columns."""
        m = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        n0 = cuda.blockIdx.y * NT * CPT
        red = cuda.shared.array(_RED, nt.float32)
        js = cuda.local.array(R, nt.int64)
        hs = cuda.local.array(R, nt.float32)
        acc = cuda.local.array(CPT, nt.float32)
        for cc in range(CPT):
            acc[cc] = F0
        for t in range(counts.shape[1]):
            c = counts[m, t]
            for s0 in range(0, c, R):
                nj = min(R, c - s0)
                for r in range(nj):
                    js[r] = t * tile + cols[m, t, s0 + r]
                    hs[r] = ld(values[m, t, s0 + r])
                gated_batch(x, m, w_up, w_down, js, hs, nj, red, tid, n0, acc)
        if has_ovf != 0:
            gated_csr_row(x, m, indptr, indices, data, w_up, w_down, js, hs, red, tid, n0, acc)
        gated_store(out, m, n0, tid, acc)

    def gated_csr(x, indptr, indices, data, w_up, w_down, out):
        """Grid (M, ceil(N / (NT * CPT))): the CSR rows, as gated_ell."""
        m = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        n0 = cuda.blockIdx.y * NT * CPT
        red = cuda.shared.array(_RED, nt.float32)
        js = cuda.local.array(R, nt.int64)
        hs = cuda.local.array(R, nt.float32)
        acc = cuda.local.array(CPT, nt.float32)
        for cc in range(CPT):
            acc[cc] = F0
        gated_csr_row(x, m, indptr, indices, data, w_up, w_down, js, hs, red, tid, n0, acc)
        gated_store(out, m, n0, tid, acc)

    # ---- select_topk -----------------------------------------------------------------------
    @cuda.jit(device=True, inline="always")
    def stage_queries(q, qs, b, kvh, group, tid):
        """qs[j * D + d] = q[b, kvh * group + j, d] (float32) for the group's query heads, then a
        barrier; returns D."""
        d_n = q.shape[2]
        for i in range(tid, group * d_n, NT):
            j = i // d_n
            qs[i] = ld(q[b, kvh * group + j, i - j * d_n])
        cuda.syncthreads()
        return d_n

    def topk_scores_exact(q, k, page_table, lengths, ps, dense, group, shared, scores):
        """Grid (ceil(S / NT), Hkv, B); thread per token t < lengths[b]; the group's query rows
        staged in shared memory. scores[b, g, t] float32: q . k summed over the group (shared,
        g = kv head) or per query head (g = h)."""
        b = cuda.blockIdx.z
        kvh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        t = cuda.blockIdx.x * NT + tid
        qs = cuda.shared.array(_QS, nt.float32)
        d_n = stage_queries(q, qs, b, kvh, group, tid)
        if t >= lengths[b]:
            return
        page, row = _kv_page_row(dense, page_table, b, t, ps)
        tot = F0
        for j in range(group):
            a = F0
            for d in range(d_n):
                a += qs[j * d_n + d] * ld(k[page, row, kvh, d])
            if shared != 0:
                tot += a
            else:
                scores[b, kvh * group + j, t] = a
        if shared != 0:
            scores[b, kvh, t] = tot

    def topk_scores_int8(q, codes, kscales, lengths, group, shared, scores):
        """topk_scores_exact over the int8 copy of the keys (KeyCodes: codes[B, S, Hkv, D] int8 in
        token order, kscales[B, S, Hkv] float32): the key t stands for codes[b, t, kvh] *
        kscales[b, t, kvh], so scores[b, g, t] = kscales[b, t, kvh] * (q . codes[b, t, kvh]),
        summed over the group (shared) or per query head; a NaN scale (a non-finite key) gives NaN."""
        b = cuda.blockIdx.z
        kvh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        t = cuda.blockIdx.x * NT + tid
        qs = cuda.shared.array(_QS, nt.float32)
        d_n = stage_queries(q, qs, b, kvh, group, tid)
        if t >= lengths[b]:
            return
        ks = kscales[b, t, kvh]
        tot = F0
        for j in range(group):
            a = F0
            for d in range(d_n):
                a += qs[j * d_n + d] * nt.float32(codes[b, t, kvh, d])
            if shared != 0:
                tot += a
            else:
                scores[b, kvh * group + j, t] = a * ks
        if shared != 0:
            scores[b, kvh, t] = tot * ks

    def rescore_pool(q, k, page_table, lengths, ps, dense, group, shared, sink, window, pool, pool_counts,
                     scores):
        """Grid (G, B), one block per selection row: the exact score (q . k from the keys, summed over
        the group when shared) of each non-forced unit of the row's pool (``pool``/``pool_counts``:
        topk_select's rows of the ``rescore`` best by the int8 score) into ``scores[b, g, t]``, after
        setting the row to NaN (ranked below every score: units outside the pool are never chosen
        over one in it). Forced units are left NaN: topk_select keeps them by position."""
        g = cuda.blockIdx.x
        b = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        for t in range(tid, scores.shape[2], NT):
            scores[b, g, t] = _FNAN
        cuda.syncthreads()
        length = lengths[b]
        kvh = g if shared != 0 else g // group
        h0 = g * group if shared != 0 else g
        nh = group if shared != 0 else 1
        d_n = q.shape[2]
        for e in range(tid, pool_counts[b, g], NT):
            t = pool[b, g, e]
            if t < sink or (window > 0 and t >= length - window):
                continue
            page, row = _kv_page_row(dense, page_table, b, t, ps)
            tot = F0
            for j in range(nh):
                a = F0
                for d in range(d_n):
                    a += ld(q[b, h0 + j, d]) * ld(k[page, row, kvh, d])
                tot += a
            scores[b, g, t] = tot

    def topk_scores_quest(q, k, page_table, lengths, ps, dense, group, shared, ups, scores):
        """Grid (ceil(U / NT), Hkv, B); thread per Quest page u of ``ups`` tokens (< lengths[b]):
        scores[b, g, u] = sum_d max(q_d * min_d, q_d * max_d) over the page's valid keys."""
        b = cuda.blockIdx.z
        kvh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        u = cuda.blockIdx.x * NT + tid
        qs = cuda.shared.array(_QS, nt.float32)
        acc = cuda.local.array(MAX_GROUP, nt.float32)
        d_n = stage_queries(q, qs, b, kvh, group, tid)
        length = lengths[b]
        t0 = u * ups
        if t0 >= length:
            return
        t1 = min(t0 + ups, length)
        for j in range(group):
            acc[j] = F0
        for d in range(d_n):
            lo = POS_INF
            hi = NEG_INF
            for t in range(t0, t1):
                page, row = _kv_page_row(dense, page_table, b, t, ps)
                v = ld(k[page, row, kvh, d])
                lo = _fmin(lo, v)
                hi = _fmax(hi, v)
            for j in range(group):
                qv = qs[j * d_n + d]
                acc[j] += max(qv * lo, qv * hi)
        _quest_store(acc, group, shared, scores, b, kvh, u)

    def topk_scores_quest_bounds(q, kmin, kmax, lengths, group, shared, ups, scores):
        """topk_scores_quest with the pages' min/max read from ``PageBounds`` (kmin, kmax[B, P, Hkv, D]
        value dtype, from ``page_bounds``) instead of computed from the keys: same grid, same float32
        operations in the same order, so the same scores as topk_scores_quest on the same cache."""
        b = cuda.blockIdx.z
        kvh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        u = cuda.blockIdx.x * NT + tid
        qs = cuda.shared.array(_QS, nt.float32)
        acc = cuda.local.array(MAX_GROUP, nt.float32)
        d_n = stage_queries(q, qs, b, kvh, group, tid)
        if u * ups >= lengths[b]:
            return
        for j in range(group):
            acc[j] = F0
        for d in range(d_n):
            lo = ld(kmin[b, u, kvh, d])
            hi = ld(kmax[b, u, kvh, d])
            for j in range(group):
                qv = qs[j * d_n + d]
                acc[j] += max(qv * lo, qv * hi)
        _quest_store(acc, group, shared, scores, b, kvh, u)

    # ---- page_bounds -----------------------------------------------------------------------
    def page_bounds(k, page_table, lengths, ps, dense, ups, start, has_start, fresh, kmin, kmax):
        """Grid (P, Hkv, B), one block per (logical page j of ``ups`` tokens, KV head, sequence),
        threads over D (coalesced key rows). kmin, kmax[B, P, Hkv, D] value dtype:
        kmin[b, j, h, d] = min of k[b, t, h, d] over j * ups <= t < min((j + 1) * ups, lengths[b])
        (kmax: max; NaN propagates; exact: the float32 of a stored value converts back to itself)
        for the pages j >= start[b] // ups (every page when has_start == 0) below
        ceil(lengths[b] / ups); the pages past the length are written 0 when fresh != 0, else
        left as they are. start[B] int32 (a 1-element dummy when has_start == 0)."""
        j = cuda.blockIdx.x
        kvh = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        d_n = kmin.shape[3]
        length = lengths[b]
        t0 = j * ups
        if t0 >= length:
            if fresh != 0:
                for d in range(tid, d_n, NT):
                    kmin[b, j, kvh, d] = st(F0)
                    kmax[b, j, kvh, d] = st(F0)
            return
        if has_start != 0 and j < start[b] // ups:
            return
        t1 = min(t0 + ups, length)
        for d in range(tid, d_n, NT):
            lo = POS_INF
            hi = NEG_INF
            for t in range(t0, t1):
                page, row = _kv_page_row(dense, page_table, b, t, ps)
                v = ld(k[page, row, kvh, d])
                lo = _fmin(lo, v)
                hi = _fmax(hi, v)
            kmin[b, j, kvh, d] = st(lo)
            kmax[b, j, kvh, d] = st(hi)

    # ---- decode ----------------------------------------------------------------------------
    def decode_split(q, k, v, page_table, lengths, ps, dense, idx, idx_counts, mode, ups, hpb, group,
                     scale, out, lse, part_o, part_lse):
        """Grid (n_split, G, B), one block per (sequence b, selection row g, split): the query heads
        h = g * hpb .. g * hpb + hpb - 1 (a whole GQA group when the selection is shared, so each
        selected K and V row is read once for the group) over key slots split * SPLIT ..
        (split + 1) * SPLIT. mode 0: every token < lengths[b]; 1: tokens idx[b, g, :counts];
        2: pages idx[b, g, :counts] of ``ups`` tokens. Online softmax in float32; NT keys per step:
        thread per key for the scores, threads over D for V (coalesced rows).
        n_split == 1: out[b, h] (value dtype), lse[b, h]; else the normalised partials
        part_o[b, h, split, D], part_lse[b, h, split] (float32; empty: 0 and -inf)."""
        split = cuda.blockIdx.x
        g = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        qs = cuda.shared.array(_QS, nt.float32)
        sc = cuda.shared.array(_SC, nt.float32)
        tok = cuda.shared.array(NT, nt.int64)
        m_sh = cuda.shared.array(MAX_GROUP, nt.float32)
        l_sh = cuda.shared.array(MAX_GROUP, nt.float32)
        a_sh = cuda.shared.array(MAX_GROUP, nt.float32)
        o = cuda.local.array(_OD, nt.float32)
        d_n = q.shape[2]
        h0 = g * hpb
        kvh = h0 // group
        for i in range(tid, hpb * d_n, NT):
            j = i // d_n
            qs[i] = ld(q[b, h0 + j, i - j * d_n]) * scale
        if tid < hpb:
            m_sh[tid] = NEG_INF
            l_sh[tid] = F0
        for i in range(_OD):
            o[i] = F0
        length = lengths[b]
        if mode == 0:
            n_slots = length
        elif mode == 1:
            n_slots = idx_counts[b, g]
        else:
            n_slots = idx_counts[b, g] * ups
        s0 = split * SPLIT
        s1 = min(s0 + SPLIT, n_slots)
        cuda.syncthreads()
        for base in range(s0, s1, NT):
            u = base + tid
            t = -1
            if u < s1:
                if mode == 0:
                    t = u
                elif mode == 1:
                    t = idx[b, g, u]
                else:
                    t = idx[b, g, u // ups] * ups + u % ups
                    if t >= length:
                        t = -1
            tok[tid] = t
            if t >= 0:
                page, row = _kv_page_row(dense, page_table, b, t, ps)
                for j in range(hpb):
                    a = F0
                    for d in range(d_n):
                        a += qs[j * d_n + d] * ld(k[page, row, kvh, d])
                    sc[j * NT + tid] = a
            else:
                for j in range(hpb):
                    sc[j * NT + tid] = NEG_INF
            cuda.syncthreads()
            if tid < hpb:
                m_old = m_sh[tid]
                m_new = m_old  # the running maximum; a NaN score never becomes it (it makes p NaN)
                for i in range(NT):
                    x = sc[tid * NT + i]
                    if x > m_new:
                        m_new = x
                alpha = F1  # while every score so far is -inf: keep the state (exp(-inf + inf) is NaN)
                if m_new != NEG_INF:
                    alpha = math.exp(m_old - m_new)
                m_sh[tid] = m_new
                a_sh[tid] = alpha
            cuda.syncthreads()
            for j in range(hpb):
                p = F0
                x = sc[j * NT + tid]
                if t >= 0 and x != NEG_INF:  # a -inf score weighs 0; NaN and +inf give NaN
                    p = math.exp(x - m_sh[j])
                sc[j * NT + tid] = p
            cuda.syncthreads()
            if tid < hpb:
                sm = F0
                for i in range(NT):
                    sm += sc[tid * NT + i]
                l_sh[tid] = l_sh[tid] * a_sh[tid] + sm
            for dd in range(DPT):
                d = tid + dd * NT
                if d >= d_n:
                    break
                for j in range(hpb):
                    o[j * DPT + dd] *= a_sh[j]
                for i in range(NT):
                    ti = tok[i]
                    if ti >= 0:
                        page, row = _kv_page_row(dense, page_table, b, ti, ps)
                        vv = ld(v[page, row, kvh, d])
                        for j in range(hpb):
                            o[j * DPT + dd] += sc[j * NT + i] * vv
            cuda.syncthreads()
        single = part_lse.shape[2] == 1
        for j in range(hpb):
            # l > 0: the softmax; l == 0 (no key, or every score -inf): out = o, the sum of 0 * v
            # (0, or NaN from a non-finite value), lse = -inf; l NaN (a NaN or +inf score): NaN
            lj = l_sh[j]
            inv = F1
            if lj > F0:
                inv = F1 / lj
            elif lj != F0:
                inv = F_NAN
            for dd in range(DPT):
                d = tid + dd * NT
                if d >= d_n:
                    break
                if single:
                    out[b, h0 + j, d] = st(o[j * DPT + dd] * inv)
                else:
                    part_o[b, h0 + j, split, d] = o[j * DPT + dd] * inv
            if tid == 0:
                ls = NEG_INF
                if lj > F0:
                    ls = m_sh[j] + math.log(lj)
                elif lj != F0:
                    ls = F_NAN
                if single:
                    lse[b, h0 + j] = ls
                else:
                    part_lse[b, h0 + j, split] = ls

    def decode_merge(part_o, part_lse, out, lse):
        """Grid (Hq, B): out[b, h] = sum_s w_s * part_o[b, h, s] / sum_s w_s, w_s = exp(lse_s - max)
        (exactly 0 for an empty split, whose part_o still enters as 0 * part_o: NaN stays NaN);
        lse = logsumexp; a NaN split makes out and lse NaN."""
        h = cuda.blockIdx.x
        b = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        n_split = part_lse.shape[2]
        mx = NEG_INF
        nan = False
        for s in range(n_split):
            ls = part_lse[b, h, s]
            if ls != ls:
                nan = True
            elif ls > mx:
                mx = ls
        tot = F0
        for s in range(n_split):
            ls = part_lse[b, h, s]
            if ls != NEG_INF:
                tot += math.exp(ls - mx)
        ltot = NEG_INF
        inv = F1
        if nan:
            ltot = F_NAN
            inv = F_NAN
        elif tot > F0:
            ltot = mx + math.log(tot)
            inv = F1 / tot
        for d in range(tid, out.shape[2], NT):
            acc = F0
            for s in range(n_split):
                ls = part_lse[b, h, s]
                w = F0
                if ls != NEG_INF:
                    w = math.exp(ls - mx)
                acc += w * part_o[b, h, s, d]
            out[b, h, d] = st(acc * inv)
        if tid == 0:
            lse[b, h] = ltot

    # ---- merge_attention -------------------------------------------------------------------
    def merge(o1, lse1, o2, lse2, out, lse):
        """Grid-stride over the rows x max(D, 1) elements of o1, o2[rows, D]; lse1, lse2[rows]
        float32 or float64; out[rows, D] value, lse[rows] float32 (written by the d == 0 thread)."""
        n_d = o1.shape[1]
        dd = max(n_d, 1)
        n = o1.shape[0] * dd
        i = cuda.blockIdx.x * NT + cuda.threadIdx.x
        stride = cuda.gridDim.x * NT
        while i < n:
            r = i // dd
            d = i - r * dd
            a = nt.float32(lse1[r])
            c = nt.float32(lse2[r])
            # the reference's logaddexp; a side with lse -inf weighs exactly 0 but still enters as
            # 0 * o (NaN stays NaN); NaN or +inf lse give NaN weights
            if a != a or c != c:
                ls = F_NAN
            elif a == POS_INF or c == POS_INF:
                ls = POS_INF
            elif a == NEG_INF and c == NEG_INF:
                ls = NEG_INF
            else:
                mx = max(a, c)
                ls = mx + math.log(math.exp(a - mx) + math.exp(c - mx))
            w1 = F0
            w2 = F0
            if a != NEG_INF:
                w1 = math.exp(a - ls)
            if c != NEG_INF:
                w2 = math.exp(c - ls)
            if d < n_d:
                out[r, d] = st(w1 * ld(o1[r, d]) + w2 * ld(o2[r, d]))
            if d == 0:
                lse[r] = ls
            i += stride

    # ---- small helpers ---------------------------------------------------------------------
    def cast_out(acc, out):
        """Grid-stride: out[i, j] = st(acc[i, j]) (float32 accumulator -> value dtype)."""
        n_c = acc.shape[1]
        n = acc.shape[0] * n_c
        i = cuda.blockIdx.x * NT + cuda.threadIdx.x
        while i < n:
            r = i // n_c
            out[r, i - r * n_c] = st(acc[r, i - r * n_c])
            i += cuda.gridDim.x * NT

    py_funcs = {
        "pack_tiles": pack_tiles, "pack_scan": pack_scan, "pack_overflow": pack_overflow, "unpack": unpack,
        "spmm_ell": spmm_ell, "spmm_csr": spmm_csr, "sddmm_ell": sddmm_ell, "sddmm_csr": sddmm_csr,
        "spmm_t_ell": spmm_t_ell, "spmm_t_csr": spmm_t_csr, "gated_ell": gated_ell, "gated_csr": gated_csr,
        "topk_scores_exact": topk_scores_exact, "topk_scores_int8": topk_scores_int8, "rescore_pool": rescore_pool,
        "topk_scores_quest": topk_scores_quest,
        "topk_scores_quest_bounds": topk_scores_quest_bounds, "page_bounds": page_bounds,
        "decode_split": decode_split, "decode_merge": decode_merge, "merge": merge, "cast_out": cast_out,
    }
    ns = SimpleNamespace(**{name: cuda.jit(fn) for name, fn in py_funcs.items()})
    ns.py_funcs = py_funcs
    ns.dtype = dtype
    return ns


# ---------------------------------------------------------------------------------------------
# dtype-free kernels

def _fill(a, val):
    """Grid-stride: a[i] = val over a 1-D array."""
    i = cuda.blockIdx.x * NT + cuda.threadIdx.x
    while i < a.shape[0]:
        a[i] = val
        i += cuda.gridDim.x * NT


def _topk_select(scores, lengths, ups, sink, window, k, indices, counts):
    """Grid (G, B), one block per selection row. Units u < ceil(lengths[b] / ups) (tokens when
    ups == 1); forced: units holding one of the first ``sink`` or last ``window`` tokens; of the
    others the k with the largest scores[b, g, u] (float32): exact k-th largest by a 4-pass radix
    select on the order-preserving uint32 keys (256-bin shared histograms), then one ascending
    compaction pass (block scans) writes indices[b, g, :count] sorted, padding -1, and
    counts[b, g] = n_forced + min(k, n_candidates)."""
    g = cuda.blockIdx.x
    b = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    buf = cuda.shared.array(NT, nt.int64)
    hist = cuda.shared.array(256, nt.int32)
    shv = cuda.shared.array(2, nt.int64)
    length = lengths[b]
    n_u = (length + ups - 1) // ups
    sink_end = min(sink, length)
    win_start = max(length - window, 0)
    k_max = indices.shape[2]
    # forced units: counted with block scans
    n_forced = 0
    for u0 in range(0, n_u, NT):
        u = u0 + tid
        f = 0
        if u < n_u:
            a = u * ups
            z = min(a + ups, length) - 1
            if a < sink_end or (window > 0 and z >= win_start):
                f = 1
        ex, tot = _scan(buf, tid, f)
        n_forced += tot
    n_cand = n_u - n_forced
    ke = min(k, n_cand)
    mode = 2
    if ke <= 0:
        mode = 0
    elif ke == n_cand:
        mode = 1
    thr = nt.int64(0)
    need = nt.int64(0)
    if mode == 2:
        pmask = nt.int64(0)
        kk = nt.int64(ke)
        for pss in range(4):
            shift = 24 - 8 * pss
            for i in range(tid, 256, NT):
                hist[i] = 0
            cuda.syncthreads()
            for u in range(tid, n_u, NT):
                a = u * ups
                z = min(a + ups, length) - 1
                if not (a < sink_end or (window > 0 and z >= win_start)):
                    key = _key(scores[b, g, u])
                    if (key & pmask) == thr:
                        cuda.atomic.add(hist, (key >> shift) & 255, 1)
            cuda.syncthreads()
            if tid == 0:
                cum = nt.int64(0)
                dsel = 0
                for dd in range(255, -1, -1):
                    c = hist[dd]
                    if cum + c >= kk:
                        dsel = dd
                        break
                    cum += c
                shv[0] = dsel
                shv[1] = kk - cum
            cuda.syncthreads()
            thr = thr | (shv[0] << shift)
            pmask = pmask | (255 << shift)
            kk = shv[1]
            cuda.syncthreads()
        need = kk
    base = 0
    tbase = 0
    for u0 in range(0, n_u, NT):
        u = u0 + tid
        isf = 0
        gt = 0
        eq = 0
        if u < n_u:
            a = u * ups
            z = min(a + ups, length) - 1
            if a < sink_end or (window > 0 and z >= win_start):
                isf = 1
            elif mode == 1:
                gt = 1
            elif mode == 2:
                key = _key(scores[b, g, u])
                if key > thr:
                    gt = 1
                elif key == thr:
                    eq = 1
        er, etot = _scan(buf, tid, eq)
        take = 0
        if isf != 0 or gt != 0 or (eq != 0 and tbase + er < need):
            take = 1
        pr, ptot = _scan(buf, tid, take)
        if take != 0 and base + pr < k_max:
            indices[b, g, base + pr] = u
        base += ptot
        tbase += etot
    base = min(base, k_max)
    for p in range(base + tid, k_max, NT):
        indices[b, g, p] = -1
    if tid == 0:
        counts[b, g] = base


_F1 = np.float32(1.0)
_FINF = np.float32(np.inf)


@cuda.jit(device=True, inline="always")
def _block_reduce(red, tid, v, take_max):
    """The max (``take_max``) or the sum of the float32 ``v`` over the block (a tree in
    ``red[NT]``); every thread gets it. NaN never wins a max (the callers pass none)."""
    red[tid] = v
    cuda.syncthreads()
    stride = NT // 2
    while stride > 0:
        if tid < stride:
            o = red[tid + stride]
            if take_max:
                if o > red[tid]:
                    red[tid] = o
            else:
                red[tid] += o
        cuda.syncthreads()
        stride //= 2
    r = red[0]
    cuda.syncthreads()
    return r


def _mass_of_every_key(ph, lengths, group, shared, scale, mass):
    """Grid (G, B), one block per selection row: ``mass[b, g, t]`` for ``t < lengths[b]`` = the mean
    over the row's query heads (the group's when ``shared``, else query head g alone) of each head's
    softmax of ``scale * ph[b, h, t]`` over every key of the sequence (``ph[B, Hq, S]``: each query
    head's own q . k, from topk_scores_exact with shared = 0), the reference's ``softmax_mass``:
    NaN scores carry no mass, a head whose maximum is +inf gives its mass to its +inf keys in equal
    shares, a head with every score -inf gives none. In float32 (the reference ranks float64
    masses: masses under float32's smallest (about 1e-45) tie at 0 here, taken in position order).
    ``topk_select`` then keeps the forced units and the ``k`` of highest mass:
    ``select_topk(candidates=c)`` with ``c`` covering every key."""
    g = cuda.blockIdx.x
    b = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    red = cuda.shared.array(NT, nt.float32)
    length = lengths[b]
    nh = group if shared != 0 else 1
    h0 = g * group if shared != 0 else g
    for t in range(tid, length, NT):
        mass[b, g, t] = F0
    for i in range(nh):
        h = h0 + i
        m = -_FINF
        for t in range(tid, length, NT):
            v = scale * ph[b, h, t]
            if v > m:  # NaN never is
                m = v
        m = _block_reduce(red, tid, m, True)
        if m == -_FINF:  # the same for every thread: no key of this head is known to matter
            continue
        z = F0
        for t in range(tid, length, NT):
            v = scale * ph[b, h, t]
            if m == _FINF:
                if v == _FINF:
                    z += _F1
            elif v == v:
                z += math.exp(v - m)
        z = _block_reduce(red, tid, z, False)
        inv = _F1 / (z * nt.float32(nh))
        for t in range(tid, length, NT):
            v = scale * ph[b, h, t]
            p = F0
            if m == _FINF:
                if v == _FINF:
                    p = _F1
            elif v == v:
                p = math.exp(v - m)
            mass[b, g, t] += p * inv


def _top_p_cut(mass, lengths, sink, window, top_p, k_min, n_sort, indices, counts, ws_m, ws_p, ws_keep, use_ws):
    """Grid (G, B), one block per selection row, after ``topk_select`` chose the forced units and
    the ``k`` non-forced of highest ``mass[b, g, u]``: keep of those the fewest, in descending mass,
    that bring the row's kept mass (the forced units' to start) to ``top_p``, at least ``k_min``
    (the reference's ``top_p_count``), in place: ``indices`` stay ascending, padded with -1, and
    ``counts`` is updated. The row's non-forced entries (``n_sort``, a power of two, at least as
    many) are sorted by descending mass (bitonic; ties by position), their running sum taken in
    float32 on one thread. The sort runs in shared memory when ``use_ws == 0`` (``n_sort`` and the
    row's units <= CUT_CAP), else in the row's slices of the workspaces ``ws_m``/``ws_p``
    ``[B * G, >= n_sort]`` and ``ws_keep`` ``[B * G, >= k + sink + window]`` in global memory
    (any size; slower)."""
    g = cuda.blockIdx.x
    b = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    if use_ws != 0:
        row = b * cuda.gridDim.x + g
        sm = ws_m[row]
        sp = ws_p[row]
        keep = ws_keep[row]
    else:
        sm = cuda.shared.array(CUT_CAP, nt.float32)
        sp = cuda.shared.array(CUT_CAP, nt.int32)
        keep = cuda.shared.array(CUT_CAP, nt.int32)
    buf = cuda.shared.array(NT, nt.int64)
    red = cuda.shared.array(NT, nt.float32)
    shv = cuda.shared.array(1, nt.int32)
    length = lengths[b]
    n_sel = counts[b, g]
    sink_end = min(sink, length)
    win_start = max(length - window, 0)
    # the forced entries' mass, and the non-forced entries (mass, place in the row) packed in front
    fm = F0
    base = 0
    for e0 in range(0, n_sel, NT):
        e = e0 + tid
        isf = 0
        free = 0
        if e < n_sel:
            u = indices[b, g, e]
            if u < sink_end or (window > 0 and u >= win_start):
                isf = 1
                fm += mass[b, g, u]
            else:
                free = 1
        pr, tot = _scan(buf, tid, free)
        if free != 0:
            sm[base + pr] = mass[b, g, indices[b, g, e]]
            sp[base + pr] = e
        base += tot
        if e < n_sel:
            keep[e] = isf
    n_free = base
    for i in range(n_free + tid, n_sort, NT):  # padding sorts last
        sm[i] = -_FINF
        sp[i] = n_sort + i
    fm = _block_reduce(red, tid, fm, False)
    cuda.syncthreads()
    # bitonic sort of n_sort entries: descending mass, ties by ascending place
    size = 2
    while size <= n_sort:
        stride = size // 2
        while stride > 0:
            for i in range(tid, n_sort, NT):
                j = i ^ stride
                if j > i:
                    first = (i & size) == 0  # this run is sorted descending (else ascending)
                    mi, mj = sm[i], sm[j]
                    before = mi > mj or (mi == mj and sp[i] < sp[j])  # i belongs before j (descending)
                    if before != first:
                        sm[i], sm[j] = mj, mi
                        sp[i], sp[j] = sp[j], sp[i]
            cuda.syncthreads()
            stride //= 2
        size *= 2
    # how many: the fewest whose running sum reaches top_p, clamped to [k_min, n_free]
    if tid == 0:
        need = n_free
        if fm >= top_p:
            need = 0
        else:
            cum = fm
            for i in range(n_free):
                cum += sm[i]
                if cum >= top_p:
                    need = i + 1
                    break
        shv[0] = min(max(need, k_min), n_free)
    cuda.syncthreads()
    n = shv[0]
    for i in range(tid, n_free, NT):
        if i < n:
            keep[sp[i]] = 1
    cuda.syncthreads()
    # compact the kept entries in place (ascending, as they were): reads before writes, chunk by chunk
    out = 0
    for e0 in range(0, n_sel, NT):
        e = e0 + tid
        kv_ = 0
        u = -1
        if e < n_sel:
            kv_ = keep[e]
            u = indices[b, g, e]
        pr, tot = _scan(buf, tid, kv_)
        if kv_ != 0:
            indices[b, g, out + pr] = u
        out += tot
        cuda.syncthreads()
    for e in range(out + tid, indices.shape[2], NT):
        indices[b, g, e] = -1
    if tid == 0:
        counts[b, g] = out


fill = cuda.jit(_fill)
topk_select = cuda.jit(_topk_select)
mass_of_every_key = cuda.jit(_mass_of_every_key)
top_p_cut = cuda.jit(_top_p_cut)
COMMON_PY_FUNCS = {"fill": _fill, "topk_select": _topk_select, "mass_of_every_key": _mass_of_every_key,
                   "top_p_cut": _top_p_cut}
