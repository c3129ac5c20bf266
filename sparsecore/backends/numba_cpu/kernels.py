"""Numba parallel CPU kernels. Imported only when numba is installed.

Value buffers arrive as float32, or as uint16 bit patterns (float16 and bfloat16), which ``load``
turns into float32 through a 65536-entry table; every kernel accumulates in float32 and writes
float32 (the launcher rounds to the output dtype once). Formats are passed buffer by buffer; a
TiledELL without overflow is given an empty CSR, so no kernel needs an optional argument.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

_OPTS = {"cache": True, "nogil": True}
_PAR = {"cache": True, "nogil": True, "parallel": True, "fastmath": {"contract", "reassoc"}}
# the body of a parallel kernel's task, compiled once as a plain function and called by two launchers:
# ``xxx`` (prange over the tasks) and ``xxx_serial`` (the same tasks in a loop, for small calls that
# should not wake the thread pool). A small prange body also keeps numba's parallel compile short.
_TASK = {"cache": True, "nogil": True, "fastmath": {"contract", "reassoc"}}


def load(a, idx, lut):  # noqa: ARG001 - the overload below is what numba compiles
    raise NotImplementedError


@overload(load)
def _load(a, idx, lut):
    if a.dtype == types.uint16:
        return lambda a, idx, lut: lut[a[idx]]
    return lambda a, idx, lut: np.float32(a[idx])


@njit(inline="always")
def _f32(n, value):
    """``np.full(n, value, np.float32)`` from ``np.empty(n, np.float32)`` and a loop. Task scratch is
    allocated only through ``np.empty`` of 1-D float32 / bool / int64 buffers: numba compiles each
    allocation signature (``np.zeros`` 2-D, ``np.full``, ``np.ones`` of bool...) for 0.1-0.3 s on a
    first call, so fewer signatures make a cold first call about a second shorter."""
    a = np.empty(n, np.float32)
    for i in range(n):
        a[i] = value
    return a


@njit(inline="always")
def _flags(n, value):
    """``np.full(n, value, np.bool_)`` the same way as :func:`_f32`."""
    a = np.empty(n, np.bool_)
    for i in range(n):
        a[i] = value
    return a


# ---------------------------------------------------------------------------------------------
# FFN: pack, unpack, spmm, sddmm, spmm_t, gated_ffn


@njit(**_TASK)
def _pack_count_row(m, x, threshold, relu, tile, capacity, lut, counts, row_overflow):
    k = x.shape[1]
    over = 0
    for t in range(counts.shape[1]):
        c = 0
        for j in range(t * tile, min((t + 1) * tile, k)):
            a = load(x, (m, j), lut)
            if relu and a < 0:
                a = np.float32(0)
            if not abs(a) <= threshold:  # NaN is kept
                c += 1
        counts[m, t] = min(c, capacity)
        over += max(c - capacity, 0)
    row_overflow[m] = over


@njit(**_PAR)
def pack_count(x, threshold, relu, tile, capacity, lut, counts, row_overflow):
    """Pass 1: slots used per (row, tile) and overflow entries per row."""
    for m in prange(x.shape[0]):
        _pack_count_row(m, x, threshold, relu, tile, capacity, lut, counts, row_overflow)


@njit(**_TASK)
def pack_count_serial(x, threshold, relu, tile, capacity, lut, counts, row_overflow):
    for m in range(x.shape[0]):
        _pack_count_row(m, x, threshold, relu, tile, capacity, lut, counts, row_overflow)


@njit(**_TASK)
def _pack_fill_row(m, x, threshold, relu, tile, capacity, lut, values, cols, o_ptr, o_idx, o_val):
    k = x.shape[1]
    zero = x.dtype.type(0)
    p = o_ptr[m]
    for t in range(values.shape[1]):
        c = 0
        for j in range(t * tile, min((t + 1) * tile, k)):
            a = load(x, (m, j), lut)
            if relu and a < 0:
                raw = zero
                a = np.float32(0)
            else:
                raw = x[m, j]
            if not abs(a) <= threshold:
                if c < capacity:
                    values[m, t, c] = raw
                    cols[m, t, c] = j - t * tile
                else:
                    o_idx[p] = j
                    o_val[p] = raw
                    p += 1
                c += 1


@njit(**_PAR)
def pack_fill(x, threshold, relu, tile, capacity, lut, values, cols, o_ptr, o_idx, o_val):
    """Pass 2: first ``capacity`` kept columns of a tile to its slots, the rest to the overflow.
    :func:`pack_count_serial` / :func:`pack_fill_serial`: the same rows on the calling thread."""
    for m in prange(x.shape[0]):
        _pack_fill_row(m, x, threshold, relu, tile, capacity, lut, values, cols, o_ptr, o_idx, o_val)


@njit(**_TASK)
def pack_fill_serial(x, threshold, relu, tile, capacity, lut, values, cols, o_ptr, o_idx, o_val):
    for m in range(x.shape[0]):
        _pack_fill_row(m, x, threshold, relu, tile, capacity, lut, values, cols, o_ptr, o_idx, o_val)


@njit(**_OPTS)
def gated_product(gate, up, relu, out):
    """out = act(gate) * up, float32 (gated_pack's hidden state; one rounding, as the reference)."""
    m_rows, k = gate.shape
    for m in range(m_rows):
        for j in range(k):
            g = gate[m, j]
            if relu and g < 0:
                g = np.float32(0)
            out[m, j] = g * up[m, j]


@njit(**_PAR)
def unpack(values, cols, counts, tile, o_ptr, o_idx, o_val, out):
    m_rows, n_tiles, _ = values.shape
    for m in prange(m_rows):
        out[m, :] = 0
        for t in range(n_tiles):
            for s in range(counts[m, t]):
                out[m, t * tile + cols[m, t, s]] = values[m, t, s]
        for p in range(o_ptr[m], o_ptr[m + 1]):
            out[m, o_idx[p]] = o_val[p]


@njit(inline="always")
def _dot(x, m, w, k, lut):
    acc = np.float32(0)
    for d in range(x.shape[1]):
        acc += load(x, (m, d), lut) * load(w, (k, d), lut)
    return acc


@njit(**_OPTS)
def group_by_column(values, cols, counts, tile, o_ptr, o_idx, o_val, k_cols, chunk_rows, lut):
    """The stored entries in (row chunk, column, row) order, by a counting sort.

    Returns ``ptr[n_chunks * K + 1]`` (entries of chunk c and column j are
    ``ptr[c * K + j] : ptr[c * K + j + 1]``), their ``rows``, ``vals`` (float32) and ``pos``: where
    each entry lives in the input (flat slot index, or ``M * n_tiles * capacity`` + overflow index).
    Walking a column's entries together lets a kernel read each row of a weight once per chunk.
    """
    m_rows, n_tiles, cap = values.shape
    n_chunks = max(1, -(-m_rows // chunk_rows))
    ptr = np.zeros(n_chunks * k_cols + 1, np.int64)
    for m in range(m_rows):
        c0 = (m // chunk_rows) * k_cols + 1
        for t in range(n_tiles):
            for s in range(counts[m, t]):
                ptr[c0 + t * tile + cols[m, t, s]] += 1
        for p in range(o_ptr[m], o_ptr[m + 1]):
            ptr[c0 + o_idx[p]] += 1
    for j in range(n_chunks * k_cols):
        ptr[j + 1] += ptr[j]
    fill = ptr[:-1].copy()
    n = ptr[-1]
    rows = np.empty(n, np.int64)
    vals = np.empty(n, np.float32)
    pos = np.empty(n, np.int64)
    n_slots = m_rows * n_tiles * cap
    for m in range(m_rows):
        c0 = (m // chunk_rows) * k_cols
        for t in range(n_tiles):
            for s in range(counts[m, t]):
                q = fill[c0 + t * tile + cols[m, t, s]]
                fill[c0 + t * tile + cols[m, t, s]] += 1
                rows[q] = m
                vals[q] = load(values, (m, t, s), lut)
                pos[q] = (m * n_tiles + t) * cap + s
        for p in range(o_ptr[m], o_ptr[m + 1]):
            q = fill[c0 + o_idx[p]]
            fill[c0 + o_idx[p]] += 1
            rows[q] = m
            vals[q] = load(o_val, p, lut)
            pos[q] = n_slots + p
    return ptr, rows, vals, pos


@njit(**_PAR)
def spmm_grouped(ptr, rows, vals, w, lut, chunk_rows, block, out):
    """out = A @ W from column-grouped entries. A task is (row chunk, column block of W): it streams
    its block of every needed W row once and adds it into the chunk's output rows, which stay in
    cache; no two tasks write the same output element."""
    k_cols = w.shape[0]
    m_rows, n = out.shape
    n_chunks = -(-m_rows // chunk_rows)
    n_blocks = -(-n // block)
    for task in prange(n_chunks * n_blocks):
        c = task // n_blocks
        n0 = np.uint64((task % n_blocks) * block)
        n1 = np.uint64(min(n, (task % n_blocks + 1) * block))
        for mi in range(c * chunk_rows, min((c + 1) * chunk_rows, m_rows)):
            m = np.uint64(mi)
            for nn in range(n0, n1):
                out[m, nn] = 0
        for j in range(k_cols):
            jj = np.uint64(j)
            for p in range(ptr[c * k_cols + j], ptr[c * k_cols + j + 1]):
                m = np.uint64(rows[p])
                v = vals[p]
                for nn in range(n0, n1):
                    out[m, nn] += v * load(w, (jj, nn), lut)


@njit(**_PAR)
def dots_grouped(ptr, rows, x, w, lut, out):
    """out[p] = x[rows[p]] . w[j] for the entries p of column j: each w row is read once per chunk
    while the rows of x it meets stay in cache."""
    k_cols = w.shape[0]
    n_chunks = (ptr.shape[0] - 1) // max(k_cols, 1)
    for task in prange(n_chunks * k_cols):
        for p in range(ptr[task], ptr[task + 1]):
            out[p] = _dot(x, rows[p], w, task % k_cols, lut)


@njit(**_PAR)
def scatter_positions(pos, vals, slots, overflow):
    """Put the grouped results back where their entries live (slots, then overflow)."""
    n_slots = slots.shape[0]
    for p in prange(pos.shape[0]):
        if pos[p] < n_slots:
            slots[pos[p]] = vals[p]
        else:
            overflow[pos[p] - n_slots] = vals[p]


@njit(**_PAR)
def spmm_t_grouped(ptr, rows, vals, dy, lut, out):
    """out[j] = sum of v * dy[m] over the entries of column j (one chunk: all rows)."""
    for j in prange(out.shape[0]):
        row = out[j]
        row[:] = 0
        for p in range(ptr[j], ptr[j + 1]):
            v = vals[p]
            m = rows[p]
            for n in range(row.shape[0]):
                row[n] += v * load(dy, (m, n), lut)


# Decode-size FFN calls (a few rows): one serial pass over the stored entries, no grouping, no thread
# pool. Each entry's weight row is read once per row of A, which costs nothing when A has few rows.
_ROWS = {"cache": True, "nogil": True, "fastmath": {"contract"}}


@njit(**_ROWS)
def _spmm_row(m, values, cols, counts, tile, o_ptr, o_idx, o_val, w, lut, acc, js, vs, out):
    """out[m] = sum over the stored (m, j, v) of v * W[j] (slots, then overflow).

    First gathers the row's entries into ``js``/``vs`` (scratch of at least the row's stored entries),
    checking every index before anything reads through it (a count past the capacity, an offset
    outside its tile or past K, an overflow pointer or column out of range): returns False at the
    first bad one, True when done; a launcher that gets False names the fault (the format's
    check_bounds), so a planned call needs no separate bounds pass. Then adds the weight rows four
    entries at a time: four rows of W streamed together keep more loads in flight and load and store
    the sums a quarter as often (1.1-2x faster than one row at a time at decode sizes)."""
    n_tiles, cap = values.shape[1], values.shape[2]
    n = w.shape[1]
    k = w.shape[0]
    c = 0
    for t in range(n_tiles):
        cnt = counts[m, t]
        if cnt < 0 or cnt > cap:
            return False
        for s in range(cnt):
            off = np.int64(cols[m, t, s])
            j = t * tile + off
            if off < 0 or off >= tile or j >= k:
                return False
            js[c] = j
            vs[c] = load(values, (m, t, s), lut)
            c += 1
    p0, p1 = o_ptr[m], o_ptr[m + 1]
    if p0 < 0 or p1 < p0 or p1 > o_idx.shape[0]:
        return False
    for p in range(p0, p1):
        j = o_idx[p]
        if j < 0 or j >= k:
            return False
        js[c] = j
        vs[c] = load(o_val, p, lut)
        c += 1
    for nn in range(n):  # the row's sums in a buffer of their own: LLVM sees no aliasing with W
        acc[nn] = 0      # and vectorises the adds
    i = 0
    while i + 4 <= c:
        j0, j1, j2, j3 = js[i], js[i + 1], js[i + 2], js[i + 3]
        v0, v1, v2, v3 = vs[i], vs[i + 1], vs[i + 2], vs[i + 3]
        for nn in range(n):
            acc[nn] += (v0 * load(w, (j0, nn), lut) + v1 * load(w, (j1, nn), lut)
                        + v2 * load(w, (j2, nn), lut) + v3 * load(w, (j3, nn), lut))
        i += 4
    while i < c:
        j0, v0 = js[i], vs[i]
        for nn in range(n):
            acc[nn] += v0 * load(w, (j0, nn), lut)
        i += 1
    for nn in range(n):
        out[m, nn] = acc[nn]
    return True


@njit(inline="always")
def _row_scratch(values, o_idx):
    """Entry scratch for :func:`_spmm_row`: room for every slot of a row and every overflow entry."""
    size = values.shape[1] * values.shape[2] + o_idx.shape[0]
    return np.empty(size, np.int64), np.empty(size, np.float32)


@njit(**_ROWS)
def spmm_rows(values, cols, counts, tile, o_ptr, o_idx, o_val, w, lut, out):
    """:func:`_spmm_row` for every row, on the calling thread (decode sizes); False when an index
    is out of range (see there)."""
    m_rows = values.shape[0]
    if o_ptr.shape[0] < m_rows + 1 or o_val.shape[0] < o_idx.shape[0]:
        return False
    acc = np.empty(w.shape[1], np.float32)
    js, vs = _row_scratch(values, o_idx)
    for m in range(m_rows):
        if not _spmm_row(m, values, cols, counts, tile, o_ptr, o_idx, o_val, w, lut, acc, js, vs, out):
            return False
    return True


@njit(**_PAR)
def spmm_rows_par(values, cols, counts, tile, o_ptr, o_idx, o_val, w, lut, out):
    """:func:`_spmm_row` with the rows in parallel: each row the serial kernel's sums in its order
    (same bits), for a few rows with much work (a wide W)."""
    m_rows = values.shape[0]
    if o_ptr.shape[0] < m_rows + 1 or o_val.shape[0] < o_idx.shape[0]:
        return False
    ok = _flags(m_rows, True)
    for m in prange(m_rows):
        js, vs = _row_scratch(values, o_idx)
        ok[m] = _spmm_row(m, values, cols, counts, tile, o_ptr, o_idx, o_val, w, lut,
                          np.empty(w.shape[1], np.float32), js, vs, out)
    for m in range(m_rows):
        if not ok[m]:
            return False
    return True


#: rows of x that one task of threshold_spmm accumulates together (each kept row of W is read once
#: for all of them): its float32 sums, THRESHOLD_ROWS x N, stay in a core's cache
THRESHOLD_ROWS = 16


@njit(**_ROWS)
def _threshold_spmm_rows(r0, r1, x, threshold, w, lut, acc, out):
    """out[m] = sum over k with not abs(x[m, k]) <= threshold of x[m, k] * W[k], for rows r0..r1-1
    together: k outer (a kept row of W is read once for the block), each row's sum in k order (so the
    bits do not depend on how rows are blocked)."""
    n = w.shape[1]
    for i in range((r1 - r0) * n):
        acc[i] = 0
    for j in range(x.shape[1]):
        for m in range(r0, r1):
            v = load(x, (m, j), lut)
            if not abs(v) <= threshold:  # NaN is kept
                a = acc[(m - r0) * n:(m - r0 + 1) * n]
                for nn in range(n):
                    a[nn] += v * load(w, (j, nn), lut)
    for m in range(r0, r1):
        base = (m - r0) * n
        for nn in range(n):
            out[m, nn] = acc[base + nn]


@njit(**_ROWS)
def threshold_spmm_rows(x, threshold, w, lut, out):
    """:func:`_threshold_spmm_rows` over blocks of THRESHOLD_ROWS rows, on the calling thread."""
    m_n = x.shape[0]
    acc = np.empty(min(m_n, THRESHOLD_ROWS) * w.shape[1], np.float32)
    for r0 in range(0, m_n, THRESHOLD_ROWS):
        _threshold_spmm_rows(r0, min(r0 + THRESHOLD_ROWS, m_n), x, threshold, w, lut, acc, out)


@njit(**_PAR)
def threshold_spmm(x, threshold, w, lut, out):
    """:func:`_threshold_spmm_rows` with the blocks in parallel (same sums, same order: same bits)."""
    m_n = x.shape[0]
    for blk in prange(-(-m_n // THRESHOLD_ROWS)):
        r0 = blk * THRESHOLD_ROWS
        _threshold_spmm_rows(r0, min(r0 + THRESHOLD_ROWS, m_n), x, threshold, w, lut,
                             np.empty(THRESHOLD_ROWS * w.shape[1], np.float32), out)


@njit(**_ROWS)
def _threshold_mlp_block(x, t_in, w_gu, relu, t_h, w_down, lut, acc, gu, h, kept, out):
    """One block of rows (views: ``x``, ``gu``, ``h``, ``kept``, ``out`` hold the block's rows) of
    threshold_mlp: the kept inputs' rows of ``w_gu``, the activation in float32, the kept hidden
    entries' rows of ``w_down``; each sum in the order of threshold_spmm's."""
    r = x.shape[0]
    k = w_down.shape[0]
    _threshold_spmm_rows(0, r, x, t_in, w_gu, lut, acc, gu)
    for m in range(r):
        n_kept = 0
        for j in range(k):
            g = gu[m, j]
            if relu:
                a = np.float32(0) if g <= 0 else g  # NaN is kept
            else:
                a = g / (np.float32(1) + np.exp(-g))
            v = a * gu[m, k + j]
            h[m, j] = v
            if not abs(v) <= t_h:
                n_kept += 1
        kept[m] = n_kept
    _threshold_spmm_rows(0, r, h, t_h, w_down, lut, acc, out)


@njit(**_ROWS)
def threshold_mlp_rows(x, t_in, w_gu, relu, t_h, w_down, lut, kept, out):
    """:func:`_threshold_mlp_block` over blocks of THRESHOLD_ROWS rows, on the calling thread."""
    m_n = x.shape[0]
    rows = min(m_n, THRESHOLD_ROWS)
    k = w_down.shape[0]
    acc = np.empty(rows * max(w_gu.shape[1], w_down.shape[1]), np.float32)
    gu = np.empty((rows, w_gu.shape[1]), np.float32)
    h = np.empty((rows, k), np.float32)
    for r0 in range(0, m_n, THRESHOLD_ROWS):
        r1 = min(r0 + THRESHOLD_ROWS, m_n)
        _threshold_mlp_block(x[r0:r1], t_in, w_gu, relu, t_h, w_down, lut, acc, gu[:r1 - r0], h[:r1 - r0],
                             kept[r0:r1], out[r0:r1])


@njit(**_PAR)
def threshold_mlp(x, t_in, w_gu, relu, t_h, w_down, lut, kept, out):
    """:func:`_threshold_mlp_block` with the blocks in parallel (same sums: same bits)."""
    m_n = x.shape[0]
    k = w_down.shape[0]
    for blk in prange(-(-m_n // THRESHOLD_ROWS)):
        r0 = blk * THRESHOLD_ROWS
        r1 = min(r0 + THRESHOLD_ROWS, m_n)
        _threshold_mlp_block(x[r0:r1], t_in, w_gu, relu, t_h, w_down, lut,
                             np.empty(THRESHOLD_ROWS * max(w_gu.shape[1], w_down.shape[1]), np.float32),
                             np.empty((r1 - r0, w_gu.shape[1]), np.float32), np.empty((r1 - r0, k), np.float32),
                             kept[r0:r1], out[r0:r1])


@njit(**_ROWS)
def gated_rows(values, cols, counts, tile, o_ptr, o_idx, o_val, x, w_up, w_down, lut, out):
    """out[m] = sum over the stored (m, j, g) of g * (x[m] . w_up[j]) * w_down[j], row by row."""
    m_rows, n_tiles, _ = values.shape
    n = w_down.shape[1]
    acc = np.empty(n, np.float32)  # as spmm_rows: sums in a buffer of their own
    for m in range(m_rows):
        for nn in range(n):
            acc[nn] = 0
        for t in range(n_tiles):
            for s in range(counts[m, t]):
                j = t * tile + cols[m, t, s]
                h = load(values, (m, t, s), lut) * _dot(x, m, w_up, j, lut)
                for nn in range(n):
                    acc[nn] += h * load(w_down, (j, nn), lut)
        for p in range(o_ptr[m], o_ptr[m + 1]):
            j = o_idx[p]
            h = load(o_val, p, lut) * _dot(x, m, w_up, j, lut)
            for nn in range(n):
                acc[nn] += h * load(w_down, (j, nn), lut)
        for nn in range(n):
            out[m, nn] = acc[nn]


@njit(**_ROWS)
def sddmm_rows(cols, counts, tile, o_ptr, o_idx, x, w, lut, slots, overflow):
    """x[m] . W[j] at every stored (m, j): into ``slots`` (the pattern's slot layout, flat) and
    ``overflow`` (the pattern's overflow order); padding slots stay as they are (zero)."""
    m_rows, n_tiles, cap = cols.shape
    for m in range(m_rows):
        for t in range(n_tiles):
            for s in range(counts[m, t]):
                slots[(m * n_tiles + t) * cap + s] = _dot(x, m, w, t * tile + cols[m, t, s], lut)
        for p in range(o_ptr[m], o_ptr[m + 1]):
            overflow[p] = _dot(x, m, w, o_idx[p], lut)


@njit(**_ROWS)
def spmm_t_rows(values, cols, counts, tile, o_ptr, o_idx, o_val, dy, lut, out):
    """out = A.T @ dy: every stored (m, j, v) adds v * dy[m] to out[j]."""
    m_rows, n_tiles, _ = values.shape
    n = dy.shape[1]
    out[:] = 0
    for m in range(m_rows):
        for t in range(n_tiles):
            for s in range(counts[m, t]):
                v = load(values, (m, t, s), lut)
                j = t * tile + cols[m, t, s]
                for nn in range(n):
                    out[j, nn] += v * load(dy, (m, nn), lut)
        for p in range(o_ptr[m], o_ptr[m + 1]):
            v = load(o_val, p, lut)
            j = o_idx[p]
            for nn in range(n):
                out[j, nn] += v * load(dy, (m, nn), lut)


# ---------------------------------------------------------------------------------------------
# Decode. A dense cache is passed as pages: k[B, S, Hkv, D] is k_pages with page_size S and
# page_table[b, 0] = b, so one kernel serves both layouts.


@njit(inline="always")
def _kv_row(page_table, b, t, page_size):
    return page_table[b, t // page_size], t % page_size


@njit(**_TASK)
def _decode_task(task, q, k_pages, v_pages, page_table, lengths, indices, counts, unit, dense, shared,
                 scale, n_split, lut, o_part, lse_part):
    """One task of :func:`decode_partial`: (sequence b, selection row u, split s), in three passes
    over the split's tokens: every head's score of every token (the K rows read back to back, so
    their cache misses overlap), each head's maximum and weights ``exp(score - max)``, then the
    weighted sum of the V rows (each read once for the row's heads). One pass with a running
    maximum made each V read wait on its key's score: 2-3 memory latencies per selected key."""
    bsz, hq, d = q.shape
    page_size = k_pages.shape[1]
    hkv = k_pages.shape[2]
    group = hq // hkv
    rows = hkv if (dense or shared) else hq
    nh = group if (dense or shared) else 1
    b = task // (rows * n_split)
    u = (task // n_split) % rows
    s = task % n_split
    h0 = u * nh
    kvh = h0 // group
    length = lengths[b]
    n_entries = -(-length // unit) if dense else counts[b, u]
    chunk = -(-n_entries // n_split)
    e0 = s * chunk
    e1 = min(e0 + chunk, n_entries)
    qv = np.empty(nh * d, np.float32)  # [nh, D] row-major; 1-D scratch only (see _f32)
    for i in range(nh):
        for j in range(d):
            qv[i * d + j] = load(q, (b, h0 + i, j), lut) * scale
    n = 0  # the split's tokens, their K/V rows in pg/rw
    for e in range(e0, e1):
        first = e * unit if dense else indices[b, u, e] * unit
        n += min(first + unit, length) - first
    pg = np.empty(n, np.int64)
    rw = np.empty(n, np.int64)
    c = 0
    for e in range(e0, e1):
        first = e * unit if dense else indices[b, u, e] * unit
        for t in range(first, min(first + unit, length)):
            pg[c], rw[c] = _kv_row(page_table, b, t, page_size)
            c += 1
    w = np.empty(nh * n, np.float32)  # [nh, n]: the scores, then the weights
    for c in range(n):
        kr = k_pages[pg[c], rw[c], kvh]
        for i in range(nh):
            sc = np.float32(0)
            for j in range(d):
                sc += qv[i * d + j] * load(kr, j, lut)
            w[i * n + c] = sc
    acc = _f32(nh * d, 0)
    mx = _f32(nh, -np.inf)
    den = _f32(nh, 0)
    for i in range(nh):
        wi = w[i * n:(i + 1) * n]
        m = np.float32(-np.inf)
        bad = False  # a NaN or +inf score: the row's out and lse are NaN (+inf: exp(inf - inf))
        for c in range(n):
            x = wi[c]
            bad |= (x != x) | (x == np.inf)
            m = max(m, x)
        if bad:
            den[i] = np.nan
            continue
        mx[i] = m
        tot = np.float32(0)
        for c in range(n):  # -inf: weight exactly 0 (also when every score is -inf)
            x = wi[c]
            p = np.float32(0) if x == -np.inf else np.float32(math.exp(x - m))
            wi[c] = p
            tot += p
        den[i] = tot
    for c in range(n):  # every selected value enters as weight * v (0 * inf is NaN)
        vr = v_pages[pg[c], rw[c], kvh]
        for i in range(nh):
            p = w[i * n + c]
            for j in range(d):
                acc[i * d + j] += p * load(vr, j, lut)
    for i in range(nh):
        _finish_row(acc[i * d:(i + 1) * d], den[i], mx[i], o_part[b, h0 + i, s], lse_part[b, h0 + i, s:s + 1])


@njit(**_PAR)
def decode_partial(q, k_pages, v_pages, page_table, lengths, indices, counts, unit, dense, shared,
                   scale, n_split, lut, o_part, lse_part):
    """Softmax attention over one split of each selection row: scores, then weights, then values.

    A task is (sequence b, selection row u, split s). A shared row serves the ``group`` query heads
    of KV head u, so every selected K and V row is read once for the whole group. ``unit`` is the
    number of tokens per index entry (1 for tokens, page_size for page granularity); ``dense``
    means every token < length, without an index. :func:`decode_partial_serial` runs the same
    tasks on the calling thread (small calls: no thread pool).
    """
    n = o_part.shape[0] * (k_pages.shape[2] if (dense or shared) else q.shape[1]) * n_split
    for task in prange(n):
        _decode_task(task, q, k_pages, v_pages, page_table, lengths, indices, counts, unit, dense, shared, scale,
                     n_split, lut, o_part, lse_part)


@njit(**_TASK)
def decode_partial_serial(q, k_pages, v_pages, page_table, lengths, indices, counts, unit, dense, shared,
                          scale, n_split, lut, o_part, lse_part):
    n = o_part.shape[0] * (k_pages.shape[2] if (dense or shared) else q.shape[1]) * n_split
    for task in range(n):
        _decode_task(task, q, k_pages, v_pages, page_table, lengths, indices, counts, unit, dense, shared, scale,
                     n_split, lut, o_part, lse_part)


@njit(inline="always")
def _finish_row(acc, den, mx, out, lse):
    """Normalise one softmax state (docs/ops.md, non-finite values): den > 0 the softmax;
    den == 0 (no key, or every score -inf) out = acc (0, or NaN from 0 * a non-finite value) and
    lse = -inf; den NaN (a NaN or +inf score) out = lse = NaN."""
    if den > 0:
        for j in range(out.shape[0]):
            out[j] = acc[j] / den
        lse[0] = mx + math.log(den)
    elif den == 0:
        for j in range(out.shape[0]):
            out[j] = acc[j]
        lse[0] = -np.inf
    else:
        for j in range(out.shape[0]):
            out[j] = np.nan
        lse[0] = np.nan


@njit(**_TASK)
def _merge_task(bh, o_part, lse_part, out, lse):
    """One (b, h) of :func:`merge_splits`."""
    bsz, hq, n_split, d = o_part.shape
    b = bh // hq
    h = bh % hq
    m = -np.inf
    nan = False
    for s in range(n_split):
        x = lse_part[b, h, s]
        if x != x:
            nan = True
        elif x > m:
            m = x
    acc = _f32(d, 0)
    tot = np.float32(0)
    if not nan:
        for s in range(n_split):
            x = lse_part[b, h, s]
            w = np.float32(0) if x == -np.inf else np.float32(math.exp(x - m))
            tot += w
            for j in range(d):
                acc[j] += w * o_part[b, h, s, j]
    _finish_row(acc, np.float32(np.nan) if nan else tot, m, out[b, h], lse[b:b + 1, h])


@njit(**_PAR)
def merge_splits(o_part, lse_part, out, lse):
    """Log-sum-exp merge of the splits of each (b, h). A NaN split makes the result NaN; a split
    with lse = -inf has weight 0, but its out still enters as 0 * out (NaN stays NaN)."""
    for bh in prange(o_part.shape[0] * o_part.shape[1]):
        _merge_task(bh, o_part, lse_part, out, lse)


@njit(**_TASK)
def merge_splits_serial(o_part, lse_part, out, lse):
    for bh in range(o_part.shape[0] * o_part.shape[1]):
        _merge_task(bh, o_part, lse_part, out, lse)


@njit(**_PAR)
def merge_pair(o1, lse1, o2, lse2, lut, out, lse):
    """The reference's merge: lse = logaddexp(lse1, lse2), out = o1 * w1 + o2 * w2 with the weight
    of a side whose lse is -inf exactly 0 (0 * NaN stays NaN); NaN or +inf lse give NaN weights."""
    for r in prange(o1.shape[0]):
        a = np.float64(lse1[r])
        c = np.float64(lse2[r])
        if a != a or c != c:
            ls = np.nan
        elif a == np.inf or c == np.inf:
            ls = np.inf
        elif a == -np.inf and c == -np.inf:
            ls = -np.inf
        else:
            m = max(a, c)
            ls = m + math.log(math.exp(a - m) + math.exp(c - m))
        w1 = 0.0 if a == -np.inf else math.exp(a - ls)
        w2 = 0.0 if c == -np.inf else math.exp(c - ls)
        for j in range(o1.shape[1]):
            out[r, j] = w1 * load(o1, (r, j), lut) + w2 * load(o2, (r, j), lut)
        lse[r] = ls


@njit(**_OPTS)
def _kth_largest(a, k):
    """The ``k``-th largest value of ``a`` (1 <= k <= len(a); ``a`` is reordered): quickselect with a
    median-of-three pivot. Written out because numba's ``np.partition`` takes about ten seconds to
    compile, which every first ``select_topk`` of a process would pay."""
    lo, hi = 0, a.shape[0] - 1
    want = k - 1  # position in descending order
    while lo < hi:
        mid = (lo + hi) // 2
        x, y, z = a[lo], a[mid], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            return a[want]
    return a[want]


@njit(**_OPTS)
def _take_top(score, free, k, chosen):
    """Mark in ``chosen`` the ``k`` free positions of highest score, NaN below -inf (the reference's
    argsort of -score puts NaN last); ties at the k-th score are taken in position order. Long rows
    with a small ``k`` first estimate a threshold from a sample of every 16th score and select among
    the scores at or above it: when at least ``k`` are, the k-th largest of the row is among them, so
    the result is the same as from every score (otherwise every score is used). Its buffers have the
    scores' dtype, so the float64 masses of the adaptive budget and the mass ranking are compared at
    the precision the reference ranks them (in float32, masses below about 1e-45 would all be 0 and
    tie, and close ones would round together)."""
    n = score.shape[0]
    c = 0
    for i in range(n):
        if free[i]:
            c += 1
    if k >= c:
        for i in range(n):
            if free[i]:
                chosen[i] = True
        return
    if k == 0:
        return
    lo = -np.inf
    stride = 16
    if c >= 2048 and k * 8 <= c:
        smp = np.empty(-(-n // stride), score.dtype)
        m = 0
        for i in range(0, n, stride):
            if free[i]:
                v = score[i]
                smp[m] = v if v == v else -np.inf
                m += 1
        want = k // stride
        rank = min(m, want + 2 * int(math.sqrt(want)) + 8)
        if m > 0:
            lo = _kth_largest(smp[:m], rank)
    cand = np.empty(n, score.dtype)
    pos = np.empty(n, np.int64)
    c = 0
    if lo > -np.inf:  # NaN and -inf never reach a finite threshold: one compare per score
        lo_t = np.empty(1, score.dtype)  # the threshold in the scores' own dtype (no conversion per score)
        lo_t[0] = lo
        thr_lo = lo_t[0]
        for i in range(n):
            v = score[i]
            if v >= thr_lo and free[i]:
                cand[c] = v
                pos[c] = i
                c += 1
    if c < k:  # no sample, or its threshold was too high: every free score
        c = 0
        for i in range(n):
            if free[i]:
                v = score[i]
                cand[c] = v if v == v else -np.inf
                pos[c] = i
                c += 1
    work = np.empty(c, score.dtype)  # _kth_largest reorders its input; cand is read again below
    for i in range(c):
        work[i] = cand[i]
    thr = _kth_largest(work, k)
    taken = 0
    for i in range(c):
        if cand[i] > thr:
            chosen[pos[i]] = True
            taken += 1
    for i in range(c):  # ties at the threshold; at -inf the true -inf scores before the NaN ones
        if taken == k:
            break
        if cand[i] == thr and (thr != -np.inf or score[pos[i]] == score[pos[i]]):
            chosen[pos[i]] = True
            taken += 1
    if thr == -np.inf:
        for i in range(c):
            if taken == k:
                break
            if score[pos[i]] != score[pos[i]]:
                chosen[pos[i]] = True
                taken += 1


@njit(**_TASK)
def _page_bounds_task(task, k_pages, page_table, lengths, first, ps, lut, kmin, kmax):
    """One (sequence, page) of :func:`page_bounds`."""
    page_size = k_pages.shape[1]
    hkv = k_pages.shape[2]
    d = k_pages.shape[3]
    n_p = kmin.shape[1]
    b = task // n_p
    j = task % n_p
    length = lengths[b]
    if j < first[b] or j * ps >= length:
        return
    t0 = j * ps
    lo = np.empty((hkv, d), np.float32)
    hi = np.empty((hkv, d), np.float32)
    pg, r = _kv_row(page_table, b, t0, page_size)
    for h in range(hkv):
        for i in range(d):
            kmin[b, j, h, i] = k_pages[pg, r, h, i]
            kmax[b, j, h, i] = k_pages[pg, r, h, i]
            lo[h, i] = load(k_pages, (pg, r, h, i), lut)
            hi[h, i] = lo[h, i]
    for t in range(t0 + 1, min(t0 + ps, length)):
        pg, r = _kv_row(page_table, b, t, page_size)
        for h in range(hkv):
            for i in range(d):
                v = load(k_pages, (pg, r, h, i), lut)
                if lo[h, i] == lo[h, i] and (v < lo[h, i] or v != v):
                    lo[h, i] = v
                    kmin[b, j, h, i] = k_pages[pg, r, h, i]
                if hi[h, i] == hi[h, i] and (v > hi[h, i] or v != v):
                    hi[h, i] = v
                    kmax[b, j, h, i] = k_pages[pg, r, h, i]


@njit(**_PAR)
def page_bounds(k_pages, page_table, lengths, first, ps, lut, kmin, kmax):
    """Per (sequence b, logical page j of ``ps`` tokens) with ``first[b] <= j < ceil(lengths[b] / ps)``:
    ``kmin/kmax[b, j, h, i]`` = the stored bits of the smallest / largest ``K[b, t, h, i]`` over the
    page's valid tokens (compared as float32; exact, no rounding; NaN wins, like NumPy's min/max).
    Tokens in the outer loop: each key row is read once, contiguously."""
    for task in prange(kmin.shape[0] * kmin.shape[1]):
        _page_bounds_task(task, k_pages, page_table, lengths, first, ps, lut, kmin, kmax)


@njit(**_TASK)
def page_bounds_serial(k_pages, page_table, lengths, first, ps, lut, kmin, kmax):
    """The tasks of :func:`page_bounds` that have a page to compute, on the calling thread: only
    pages ``first[b] <= j < ceil(lengths[b] / ps)`` are visited (a decode step's update touches one
    page of each sequence; calling the task for every page cost about 60 ns a page)."""
    n_p = kmin.shape[1]
    for b in range(kmin.shape[0]):
        for j in range(max(first[b], 0), min(n_p, -(-np.int64(lengths[b]) // ps))):
            _page_bounds_task(b * n_p + j, k_pages, page_table, lengths, first, ps, lut, kmin, kmax)


@njit(inline="always")
def _select_row(task, q, k_pages, lengths, counts, shared):
    """What a selection task works on: task = b * rows + u is selection row u of sequence b, which
    serves query heads h0 .. h0 + nh - 1 (the group, or one head) of KV head kvh over length keys."""
    group = q.shape[1] // k_pages.shape[2]
    rows = counts.shape[1]
    nh = group if shared else 1
    b = task // rows
    u = task % rows
    h0 = u * nh
    return b, u, h0, nh, h0 // group, lengths[b]


@njit(inline="always")
def _group_query(q, b, h0, nh, lut):
    """The query summed over the selection row's heads: sum_h q_h . k = (sum_h q_h) . k."""
    d = q.shape[2]
    qs = _f32(d, 0)
    for i in range(nh):
        for j in range(d):
            qs[j] += load(q, (b, h0 + i, j), lut)
    return qs


@njit(inline="always")
def _forced(n_units, length, unit, sink, window):
    """``(free, chosen)`` of a selection row of ``n_units`` units of ``unit`` tokens: the units of the
    first ``sink`` and the last ``window`` tokens chosen, every other unit free."""
    free = _flags(n_units, True)
    chosen = _flags(n_units, False)
    for t in range(min(sink, length)):
        chosen[t // unit] = True
    for t in range(max(length - window, 0), length):
        chosen[t // unit] = True
    for p in range(n_units):
        free[p] = not chosen[p]
    return free, chosen


@njit(inline="always")
def _write_row(b, u, chosen, indices, counts):
    """The chosen units of row (b, u) in ascending order, padded with -1, and their count."""
    c = 0
    for p in range(chosen.shape[0]):
        if chosen[p]:
            indices[b, u, c] = p
            c += 1
    counts[b, u] = c
    for e in range(c, indices.shape[2]):
        indices[b, u, e] = -1


@njit(inline="always")
def _select_write(b, u, length, unit, k, sink, window, score, indices, counts):
    """The tail of a selection row: the forced sink and window units, then the ``k`` best-scored
    others, written by :func:`_write_row`."""
    free, chosen = _forced(score.shape[0], length, unit, sink, window)
    _take_top(score, free, k, chosen)
    _write_row(b, u, chosen, indices, counts)


@njit(**_TASK)
def _select_task(task, q, k_pages, page_table, lengths, k, sink, window, shared, lut, indices, counts):
    """One row of :func:`select_topk` (exact: every key's score): (sequence b, selection row u)."""
    d = q.shape[2]
    page_size = k_pages.shape[1]
    b, u, h0, nh, kvh, length = _select_row(task, q, k_pages, lengths, counts, shared)
    score = np.empty(length, np.float32)
    qs = _group_query(q, b, h0, nh, lut)
    for t in range(length):
        pg, r = _kv_row(page_table, b, t, page_size)
        sc = np.float32(0)
        for j in range(d):
            sc += qs[j] * load(k_pages, (pg, r, kvh, j), lut)
        score[t] = sc
    _select_write(b, u, length, 1, k, sink, window, score, indices, counts)


@njit(**_TASK)
def _select_quest_task(task, q, k_pages, page_table, lengths, k, sink, window, shared, unit, bmin, bmax, lut,
                       indices, counts):
    """One row of :func:`select_quest` (pages of ``unit`` tokens scored by their upper bound)."""
    d = q.shape[2]
    page_size = k_pages.shape[1]
    b, u, h0, nh, kvh, length = _select_row(task, q, k_pages, lengths, counts, shared)
    n_units = -(-length // unit)
    score = np.empty(n_units, np.float32)
    lo = np.empty(d, np.float32)
    hi = np.empty(d, np.float32)
    # NumPy's max(q * lo, q * hi) is NaN when a product is: a NaN query or bound, or 0 * inf; the
    # bound loop below uses plain max (vector code), so these cases are found apart and give NaN
    q_nan = 0
    q_zero = np.zeros(d, np.int32)
    any_zero = 0
    for i in range(nh):
        for j in range(d):
            qj = load(q, (b, h0 + i, j), lut)
            q_nan += qj != qj
            q_zero[j] |= qj == 0
            any_zero |= qj == 0
    for p in range(n_units):
        if bmin.shape[0] > 0:
            for j in range(d):
                lo[j] = load(bmin, (b, p, kvh, j), lut)
                hi[j] = load(bmax, (b, p, kvh, j), lut)
        else:
            for j in range(d):
                lo[j] = np.inf
                hi[j] = -np.inf
        bad = q_nan  # a NaN key component (NumPy's min/max keep it), a NaN bound, or 0 * inf
        if bmin.shape[0] == 0:
            for t in range(p * unit, min((p + 1) * unit, length)):
                pg, r = _kv_row(page_table, b, t, page_size)
                for j in range(d):  # plain min/max (vector code), NaNs counted on the side
                    kv_ = load(k_pages, (pg, r, kvh, j), lut)
                    lo[j] = kv_ if kv_ < lo[j] else lo[j]
                    hi[j] = kv_ if kv_ > hi[j] else hi[j]
                    bad += kv_ != kv_
        for j in range(d):
            bad += (lo[j] != lo[j]) | (hi[j] != hi[j])
        if any_zero:  # 0 * inf
            for j in range(d):
                inf = (lo[j] == np.inf) | (lo[j] == -np.inf) | (hi[j] == np.inf) | (hi[j] == -np.inf)
                bad += q_zero[j] & inf
        bound = np.float32(0)
        for i in range(nh):
            for j in range(d):
                qj = load(q, (b, h0 + i, j), lut)
                x, y = qj * lo[j], qj * hi[j]
                bound += x if x > y else y
        score[p] = bound if bad == 0 else np.float32(np.nan)
    _select_write(b, u, length, unit, k, sink, window, score, indices, counts)


@njit(**_PAR)
def select_topk(q, k_pages, page_table, lengths, k, sink, window, shared, lut, indices, counts):
    """Exact top-k per row (token scores: the row's summed query dot every key), plus the forced
    sink and window; rows written in ascending order, padded with -1. :func:`select_topk_serial`:
    the same rows on the calling thread. Quest is :func:`select_quest`, a kernel of its own so that
    a first call compiles only the scoring it uses."""
    for task in prange(counts.shape[0] * counts.shape[1]):
        _select_task(task, q, k_pages, page_table, lengths, k, sink, window, shared, lut, indices, counts)


@njit(**_TASK)
def select_topk_serial(q, k_pages, page_table, lengths, k, sink, window, shared, lut, indices, counts):
    for task in range(counts.shape[0] * counts.shape[1]):
        _select_task(task, q, k_pages, page_table, lengths, k, sink, window, shared, lut, indices, counts)


@njit(**_PAR)
def select_quest(q, k_pages, page_table, lengths, k, sink, window, shared, unit, bmin, bmax, lut, indices, counts):
    """Quest top-k per row: pages of ``unit`` tokens scored by the upper bound
    ``sum_h sum_i max(q_hi * min_i, q_hi * max_i)``, plus the forced sink and window pages. The
    pages' min/max come from ``bmin/bmax[B, P, Hkv, D]`` (stored PageBounds) when they are not
    empty, else from the keys. :func:`select_quest_serial`: on the calling thread."""
    for task in prange(counts.shape[0] * counts.shape[1]):
        _select_quest_task(task, q, k_pages, page_table, lengths, k, sink, window, shared, unit, bmin, bmax, lut,
                           indices, counts)


@njit(**_TASK)
def select_quest_serial(q, k_pages, page_table, lengths, k, sink, window, shared, unit, bmin, bmax, lut, indices,
                        counts):
    for task in range(counts.shape[0] * counts.shape[1]):
        _select_quest_task(task, q, k_pages, page_table, lengths, k, sink, window, shared, unit, bmin, bmax, lut,
                           indices, counts)


@njit(inline="always")
def _pass4(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale):
    """Heads c .. c+3 (queries ``qf[0:4d]``) against every key of the row: one load of a key row
    serves four dot products (four independent sums), keys walked page by page (no division)."""
    page_size = k_pages.shape[1]
    for p in range(-(-length // page_size)):
        pg = page_table[b, p]
        t0 = p * page_size
        for r in range(min(page_size, length - t0)):
            kr = k_pages[pg, r, kvh]
            s0 = np.float32(0)
            s1 = np.float32(0)
            s2 = np.float32(0)
            s3 = np.float32(0)
            for j in range(d):
                kj = load(kr, j, lut)
                s0 += qf[j] * kj
                s1 += qf[d + j] * kj
                s2 += qf[2 * d + j] * kj
                s3 += qf[3 * d + j] * kj
            x[c, t0 + r] = s0 * scale
            x[c + 1, t0 + r] = s1 * scale
            x[c + 2, t0 + r] = s2 * scale
            x[c + 3, t0 + r] = s3 * scale


@njit(inline="always")
def _pass3(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale):
    """:func:`_pass4` for three heads."""
    page_size = k_pages.shape[1]
    for p in range(-(-length // page_size)):
        pg = page_table[b, p]
        t0 = p * page_size
        for r in range(min(page_size, length - t0)):
            kr = k_pages[pg, r, kvh]
            s0 = np.float32(0)
            s1 = np.float32(0)
            s2 = np.float32(0)
            for j in range(d):
                kj = load(kr, j, lut)
                s0 += qf[j] * kj
                s1 += qf[d + j] * kj
                s2 += qf[2 * d + j] * kj
            x[c, t0 + r] = s0 * scale
            x[c + 1, t0 + r] = s1 * scale
            x[c + 2, t0 + r] = s2 * scale


@njit(inline="always")
def _pass2(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale):
    """:func:`_pass4` for two heads."""
    page_size = k_pages.shape[1]
    for p in range(-(-length // page_size)):
        pg = page_table[b, p]
        t0 = p * page_size
        for r in range(min(page_size, length - t0)):
            kr = k_pages[pg, r, kvh]
            s0 = np.float32(0)
            s1 = np.float32(0)
            for j in range(d):
                kj = load(kr, j, lut)
                s0 += qf[j] * kj
                s1 += qf[d + j] * kj
            x[c, t0 + r] = s0 * scale
            x[c + 1, t0 + r] = s1 * scale


@njit(inline="always")
def _pass1(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale):
    """:func:`_pass4` for one head."""
    page_size = k_pages.shape[1]
    for p in range(-(-length // page_size)):
        pg = page_table[b, p]
        t0 = p * page_size
        for r in range(min(page_size, length - t0)):
            kr = k_pages[pg, r, kvh]
            s0 = np.float32(0)
            for j in range(d):
                s0 += qf[j] * load(kr, j, lut)
            x[c, t0 + r] = s0 * scale


@njit(inline="always")
def _head_scores(q, k_pages, page_table, b, h0, nh, kvh, length, scale, lut, kscales, x, mx):
    """``x[i, t] = scale * q[b, h0 + i] . k[t]`` for the row's ``nh`` query heads (NaN as -inf) and
    ``mx[i] = max_t x[i, t]``; with ``kscales`` not empty, ``k_pages`` are int8 codes ``[B, S, Hkv, D]``
    (and ``page_table`` the dense one) and each score is multiplied by ``kscales[b, t, kvh]``. Up to
    four heads are scored in one pass over the keys (:func:`_pass4`; a loop of its own per width, so
    that each compiles to straight vector code): 2-2.5x faster than a pass per head at 8K keys and
    three heads."""
    d = q.shape[2]
    qf = np.empty(4 * d, np.float32)
    c = 0
    while c < nh:
        w = min(4, nh - c)
        for e in range(w):
            for j in range(d):
                qf[e * d + j] = load(q, (b, h0 + c + e, j), lut)
        if w == 4:
            _pass4(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale)
        elif w == 3:
            _pass3(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale)
        elif w == 2:
            _pass2(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale)
        else:
            _pass1(k_pages, page_table, b, kvh, length, qf, d, lut, x, c, scale)
        c += w
    coded = kscales.shape[0] > 0
    for i in range(nh):
        m = np.float32(-np.inf)
        for t in range(length):
            v = x[i, t] * kscales[b, t, kvh] if coded else x[i, t]
            v = -np.inf if v != v else v
            x[i, t] = v
            m = max(m, v)
        mx[i] = m


#: exp on [-ln2/2, ln2/2] as 2^n * e^r: ln 2 split in two (Cody-Waite) so that r is exact enough
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@njit(inline="always")
def _exp_shifted(row, m, n, bits):
    """``row[:n] = exp(row[:n] - m)`` in float32 (``m`` the row's finite maximum, so every argument
    is <= 0; -inf gives 0), in two loops the compiler vectorises: ``r = v - n ln2`` and e^r by a
    degree-6 Taylor polynomial (relative error about 1e-7, under float32's own rounding of the scores
    it exponentiates), then the power of two built from its bits (``bits``: ``n`` float32 of scratch).
    Arguments under -87 (e^-87 is about float32's smallest normal) give exactly 0: they carry no
    mass a float32 score could tell from 0. ``math.exp`` per element was about 3.5 ns; this about 1."""
    ib = bits.view(np.int32)
    for t in range(n):
        v = row[t] - m
        keep = v > np.float32(-87)
        v = max(v, np.float32(-87))
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - k * _LN2_HI - k * _LN2_LO
        p = np.float32(1) + r * (np.float32(1) + r * (np.float32(0.5) + r * (np.float32(1 / 6) + r * (
            np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720))))))
        row[t] = p
        ib[t] = ((np.int32(k) + np.int32(127)) << np.int32(23)) if keep else np.int32(0)
    for t in range(n):
        row[t] *= bits[t]


@njit(**_TASK)
def _select_top_p_task(task, q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p, scale,
                       lut, indices, counts):
    """One row of :func:`select_top_p`: (sequence b, selection row u)."""
    b, u, h0, nh, kvh, length = _select_row(task, q, k_pages, lengths, counts, shared)
    # each head's own scaled scores (NaN as -inf: it carries no mass), then its softmax
    x = np.empty((nh, length), np.float32)
    mx = _f32(nh, -np.inf)
    _head_scores(q, k_pages, page_table, b, h0, nh, kvh, length, scale, lut, kscales, x, mx)
    mass = np.zeros(length, np.float64)
    bits = np.empty(length, np.float32)
    none = np.empty(0, np.float32)
    for i in range(nh):
        _add_head_mass(x[i], length, none, 0, mx[i], np.float32(1), nh, mass, bits)
    free, chosen = _forced(length, length, 1, sink, window)
    forced_mass = 0.0
    for t in range(length):
        if chosen[t]:
            forced_mass += mass[t]
    _take_top(mass, free, k, chosen)  # the k candidates of highest mass; the budget is a prefix of them
    if top_p == np.inf and k_min <= k:  # a fixed budget (the mass ranking): all k of them, no heap
        _write_row(b, u, chosen, indices, counts)
        return
    n_sel = 0
    for t in range(length):
        if chosen[t] and free[t]:
            n_sel += 1
    pos = np.empty(n_sel, np.int64)
    heap = np.empty(n_sel, np.float64)
    c = 0
    for t in range(length):
        if chosen[t] and free[t]:
            pos[c] = t
            heap[c] = mass[t]
            chosen[t] = False  # taken back below, in descending mass, as many as the budget needs
            c += 1
    _take_by_mass(heap, pos, n_sel, forced_mass, n_sel, k_min, top_p, chosen)
    _write_row(b, u, chosen, indices, counts)


@njit(inline="always")
def _add_head_mass(row, n, srow, n_s, m, weight, nh, mass, bits):
    """``mass[:n] += softmax(row[:n]) / nh`` for one query head, the softmax's sum also over the
    sample ``srow[:n_s]`` with each sampled score counted ``weight`` times; ``m`` the maximum of both
    (-inf: the head carries no mass; +inf: the +inf scores share it all). ``row`` and ``srow`` are
    overwritten with their exponentials; ``bits``: float32 scratch of at least ``max(n, n_s)``."""
    if m == -np.inf:
        return
    if m == np.inf:  # an infinite score takes all of the head's mass
        for e in range(n):
            row[e] = 1.0 if row[e] == np.inf else 0.0
        for e in range(n_s):
            srow[e] = 1.0 if srow[e] == np.inf else 0.0
    else:
        _exp_shifted(row, m, n, bits)
        _exp_shifted(srow, m, n_s, bits)
    z = 0.0
    for e in range(n):
        z += row[e]
    zs = 0.0
    for e in range(n_s):
        zs += srow[e]
    inv = 1.0 / ((z + weight * zs) * nh)
    for e in range(n):
        mass[e] += row[e] * inv


@njit(inline="always")
def _take_by_mass(heap, pos, size, cum, k, k_min, top_p, keep):
    """``keep[pos[i]] = True`` for the units of ``heap[:size]`` (their masses) in descending mass,
    at most ``k``, until the kept mass (``cum`` to start: the forced units') reaches ``top_p`` and
    ``k_min`` are taken: a max-heap, O(size + taken * log size), not a sort of every unit."""
    for i in range(size // 2 - 1, -1, -1):
        _sift_down(heap, pos, i, size)
    taken = 0
    while size > 0 and taken < k and (taken < k_min or cum < top_p):
        keep[pos[0]] = True
        cum += heap[0]
        taken += 1
        size -= 1
        heap[0], pos[0] = heap[size], pos[size]
        _sift_down(heap, pos, 0, size)


@njit(inline="always")
def _sift_down(heap, pos, i, size):
    """Restore the max-heap property of ``heap[:size]`` (``pos`` moved alongside) below node ``i``."""
    while True:
        big = i
        left = 2 * i + 1
        if left < size and heap[left] > heap[big]:
            big = left
        if left + 1 < size and heap[left + 1] > heap[big]:
            big = left + 1
        if big == i:
            return
        heap[i], heap[big] = heap[big], heap[i]
        pos[i], pos[big] = pos[big], pos[i]
        i = big


@njit(**_PAR)
def select_top_p(q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p, scale, lut,
                 indices, counts):
    """Adaptive-budget exact selection per row: the forced sink and window, plus the fewest of the
    ``k`` highest-mass other tokens (at least ``k_min``) whose estimated attention mass (each query
    head's softmax of its scaled scores, averaged over the row's heads, in float64) brings the kept
    mass to ``top_p``; rows in ascending order, padded with -1. With ``kscales[B, S, Hkv]`` not empty
    the scores are the int8 ones (``k_pages`` = the codes ``[B, S, Hkv, D]``, ``page_table`` the dense
    table, each score times its key's scale). :func:`select_top_p_serial`: the same rows on the calling
    thread."""
    for task in prange(counts.shape[0] * counts.shape[1]):
        _select_top_p_task(task, q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p,
                           scale, lut, indices, counts)


@njit(**_TASK)
def select_top_p_serial(q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p, scale, lut,
                        indices, counts):
    for task in range(counts.shape[0] * counts.shape[1]):
        _select_top_p_task(task, q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p,
                           scale, lut, indices, counts)


@njit(**_TASK)
def _select_int8_task(task, q, k_pages, page_table, lengths, codes, scales, k, rescore, sink, window, shared, lut,
                      indices, counts):
    """One row of :func:`select_int8`: (sequence b, selection row u)."""
    d = q.shape[2]
    page_size = k_pages.shape[1]
    b, u, h0, nh, kvh, length = _select_row(task, q, k_pages, lengths, counts, shared)
    qs = _group_query(q, b, h0, nh, lut)
    score = np.empty(length, np.float32)
    for t in range(length):
        acc = np.float32(0)
        for j in range(d):
            acc += qs[j] * np.float32(codes[b, t, kvh, j])
        score[t] = acc * scales[b, t, kvh]
    free, chosen = _forced(length, length, 1, sink, window)
    if rescore > k:
        pool = _flags(length, False)
        _take_top(score, free, rescore, pool)
        for t in range(length):  # the pool's exact scores; everything else is out
            if pool[t]:
                pg, r = _kv_row(page_table, b, t, page_size)
                acc = np.float32(0)
                for j in range(d):
                    acc += qs[j] * load(k_pages, (pg, r, kvh, j), lut)
                score[t] = acc
        _take_top(score, pool, k, chosen)
    else:
        _take_top(score, free, k, chosen)
    _write_row(b, u, chosen, indices, counts)


@njit(**_PAR)
def select_int8(q, k_pages, page_table, lengths, codes, scales, k, rescore, sink, window, shared, lut, indices,
                counts):
    """Top-k per row by the int8 scores ``scales[b, t, h] * (q . codes[b, t, h])`` (summed over the
    group when shared), plus the forced sink and window; with ``rescore > k`` the ``rescore`` best are
    re-scored from the keys and their ``k`` best kept. :func:`select_int8_serial`: on the calling thread."""
    for task in prange(counts.shape[0] * counts.shape[1]):
        _select_int8_task(task, q, k_pages, page_table, lengths, codes, scales, k, rescore, sink, window, shared, lut,
                          indices, counts)


@njit(**_TASK)
def select_int8_serial(q, k_pages, page_table, lengths, codes, scales, k, rescore, sink, window, shared, lut, indices,
                       counts):
    for task in range(counts.shape[0] * counts.shape[1]):
        _select_int8_task(task, q, k_pages, page_table, lengths, codes, scales, k, rescore, sink, window, shared, lut,
                          indices, counts)


@njit(inline="always")
def _unit_scores(q_f, nh, d, k_pages, page_table, b, t, kvh, kscales, coded, scale, lut, x, e):
    """``x[i, e] = scale * q_f[i] . k[t]`` (times the key's int8 scale when coded) for the ``nh``
    query heads of a row, NaN as -inf."""
    pg, r = _kv_row(page_table, b, t, k_pages.shape[1])
    kr = k_pages[pg, r, kvh]
    ks = kscales[b, t, kvh] if coded else np.float32(1)
    for i in range(nh):
        acc = np.float32(0)
        for j in range(d):
            acc += q_f[i * d + j] * load(kr, j, lut)
        v = acc * scale * ks
        x[i, e] = -np.inf if v != v else v


@njit(**_TASK)
def _rank_by_mass_task(task, q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p, scale,
                       tail, lut, cind, ccnt, indices, counts):
    """One row of :func:`rank_by_mass`: (sequence b, selection row u)."""
    d = q.shape[2]
    b, u, h0, nh, kvh, length = _select_row(task, q, k_pages, lengths, counts, shared)
    n = ccnt[b, u]
    if n == 0:
        counts[b, u] = 0
        for e in range(indices.shape[2]):
            indices[b, u, e] = -1
        return
    coded = kscales.shape[0] > 0
    qf = np.empty(nh * d, np.float32)
    for i in range(nh):
        for j in range(d):
            qf[i * d + j] = load(q, (b, h0 + i, j), lut)
    # each head's scaled scores of the row's units, then of every tail-th other token (the sample)
    x = np.empty((nh, n), np.float32)
    for e in range(n):
        _unit_scores(qf, nh, d, k_pages, page_table, b, cind[b, u, e], kvh, kscales, coded, scale, lut, x, e)
    n_s = 0
    inrow = _flags(length if tail > 0 else 0, False)
    if tail > 0:
        for e in range(n):
            inrow[cind[b, u, e]] = True
        for t in range(0, length, tail):
            if not inrow[t]:
                n_s += 1
    xs = np.empty((nh, n_s), np.float32)
    if n_s > 0:
        c = 0
        for t in range(0, length, tail):
            if not inrow[t]:
                _unit_scores(qf, nh, d, k_pages, page_table, b, t, kvh, kscales, coded, scale, lut, xs, c)
                c += 1
    weight = np.float32(max(tail, 1))
    mass = np.zeros(n, np.float64)
    bits = np.empty(max(n, n_s), np.float32)
    for i in range(nh):
        row = x[i]
        srow = xs[i]
        m = np.float32(-np.inf)
        for e in range(n):
            m = max(m, row[e])
        for e in range(n_s):
            m = max(m, srow[e])
        _add_head_mass(row, n, srow, n_s, m, weight, nh, mass, bits)
    # forced units stay; the candidates are taken back by descending mass (a max-heap) until the
    # kept mass reaches top_p and k_min are taken
    keep = _flags(n, False)
    forced_mass = 0.0
    n_c = 0
    for e in range(n):
        t = cind[b, u, e]
        if t < sink or t >= length - window:
            keep[e] = True
            forced_mass += mass[e]
        else:
            n_c += 1
    pos = np.empty(n_c, np.int64)
    heap = np.empty(n_c, np.float64)
    c = 0
    for e in range(n):
        if not keep[e]:
            pos[c] = e
            heap[c] = mass[e]
            c += 1
    _take_by_mass(heap, pos, n_c, forced_mass, k, k_min, top_p, keep)
    c = 0
    for e in range(n):  # in the candidates' ascending order
        if keep[e]:
            indices[b, u, c] = cind[b, u, e]
            c += 1
    counts[b, u] = c
    for e in range(c, indices.shape[2]):
        indices[b, u, e] = -1


@njit(**_PAR)
def rank_by_mass(q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p, scale, tail, lut,
                 cind, ccnt, indices, counts):
    """Mass ranking of candidate rows (``cind``/``ccnt``: a ranking's rows from :func:`select_topk` or
    :func:`select_int8`, forced units included) into ``indices``/``counts``: each row's candidates get
    each query head's softmax of its scaled scores over them and, with ``tail > 0``, every
    ``tail``-th other token of the sequence weighted ``tail`` (averaged over the row's heads,
    float64); the row keeps its forced sink and window units plus, by descending mass, at most ``k``
    others: the fewest (at least ``k_min``) that bring the kept mass to ``top_p`` (``inf``: ``k``).
    Rows in ascending order, padded with -1. With ``kscales[B, S, Hkv]`` not empty the scores are the
    int8 ones (``k_pages`` = the codes ``[B, S, Hkv, D]``, ``page_table`` the dense table).
    :func:`rank_by_mass_serial`: on the calling thread."""
    for task in prange(counts.shape[0] * counts.shape[1]):
        _rank_by_mass_task(task, q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p,
                           scale, tail, lut, cind, ccnt, indices, counts)


@njit(**_TASK)
def rank_by_mass_serial(q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p, scale, tail,
                        lut, cind, ccnt, indices, counts):
    for task in range(counts.shape[0] * counts.shape[1]):
        _rank_by_mass_task(task, q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p,
                           scale, tail, lut, cind, ccnt, indices, counts)
