"""NumPy reference of the activation-sparse FFN ops: the definition of what each op means.

Everything accumulates in float64 and is cast to the output dtype once at the end. Inputs are NumPy
arrays and formats holding NumPy arrays (the dispatcher hands them over zero-copy).
"""

from __future__ import annotations

import functools

import numpy as np

from ..formats.convert import csr_entries, tiled_ell_entries, tiled_ell_from_mask
from ..formats.csr import CSR
from ..formats.tiled_ell import TiledELL

_TEMP = 1 << 22  # floats per vectorised step: bounds the temporaries to 32 MiB


def pack(x: np.ndarray, *, threshold: float = 0.0, activation: str | None = None, tile: int = 256,
         capacity: int | None = None) -> TiledELL:
    """TiledELL of the entries of ``act(x)`` whose magnitude is above ``threshold``::

        a = np.maximum(x, 0) if activation == "relu" else x
        keep = ~(np.abs(a) <= threshold)          # NaN is kept: nothing is lost silently
        # per (row, tile): the first `capacity` kept columns, ascending, fill the slots;
        # the rest go to the overflow CSR
    """
    capacity = tile // 8 if capacity is None else capacity
    a = np.maximum(x, np.zeros((), x.dtype)) if activation == "relu" else x
    keep = ~(np.abs(a.astype(np.float64)) <= threshold)
    return tiled_ell_from_mask(a, keep, tile, capacity)


def gated_pack(gate: np.ndarray, up: np.ndarray, *, threshold: float = 0.0, activation: str | None = "relu",
               tile: int = 256, capacity: int | None = None) -> TiledELL:
    """:func:`pack` of a gated FFN's hidden state ``act(gate) * up``, fused (``gate``, ``up`` ``[M, K]``,
    one dtype; the product is rounded once, from float32, or float64 for float64 inputs)::

        g = np.maximum(gate, 0) if activation == "relu" else gate
        h = (g.astype(np.float32) * up.astype(np.float32)).astype(gate.dtype)
        return pack(h, threshold=threshold, tile=tile, capacity=capacity)
    """
    acc = np.float64 if gate.dtype == np.float64 else np.float32
    g = np.maximum(gate, np.zeros((), gate.dtype)) if activation == "relu" else gate
    h = (g.astype(acc) * up.astype(acc)).astype(gate.dtype)
    return pack(h, threshold=threshold, tile=tile, capacity=capacity)


def threshold_spmm(x: np.ndarray, w: np.ndarray, *, threshold: float = 0.0) -> np.ndarray:
    """:func:`spmm` of :func:`pack` ``(x, threshold)`` without the packed matrix: the entries of
    ``x[M, K]`` with ``abs > threshold`` (NaN kept) times the rows of ``W[K, N]`` (one dtype)::

        keep = ~(np.abs(x) <= threshold)
        out[m] = sum over k with keep[m, k] of x[m, k] * W[k]

    A dropped entry never meets ``W`` (an ``inf`` in a row of ``W`` only counts where it is kept).
    """
    return spmm(pack(x, threshold=threshold), w)


def threshold_mlp(x: np.ndarray, w_gate_up: np.ndarray, w_down: np.ndarray, *, input_threshold: float = 0.0,
                  threshold: float = 0.0, activation: str = "silu", kept: np.ndarray | None = None) -> np.ndarray:
    """A gated MLP (LLaMA's) with its input and its hidden state thresholded, in one call: TEAL-style
    training-free sparsity of a SiLU model's decode step. ``x[M, D]``, ``w_gate_up[D, 2K]``
    (``[gate_proj.weight.T | up_proj.weight.T]``), ``w_down[K, N]`` (``down_proj.weight.T``), one dtype::

        keep_x = ~(np.abs(x) <= input_threshold)                 # NaN is kept
        gu = (x * keep_x) @ w_gate_up                            # a dropped input never meets W
        g, u = gu[:, :K], gu[:, K:]
        h = (g / (1 + np.exp(-g)) if activation == "silu" else np.maximum(g, 0)) * u
        keep_h = ~(np.abs(h) <= threshold)
        out = (h * keep_h) @ w_down                              # [M, N], x's dtype
        kept[m] = keep_h[m].sum()                                # when ``kept[M]`` (int64) is given

    Computed here in float64 and rounded once; a float32 backend computes ``h`` in float32, so an
    entry within rounding of ``threshold`` may be kept by one and dropped by the other.
    """
    x64 = x.astype(np.float64)
    k = w_down.shape[0]
    gu = _kept_product(x64, ~(np.abs(x64) <= input_threshold), w_gate_up.astype(np.float64))
    g, u = gu[:, :k], gu[:, k:]
    with np.errstate(over="ignore"):
        a = g / (1.0 + np.exp(-g)) if activation == "silu" else np.maximum(g, 0.0)
    h = a * u
    keep = ~(np.abs(h) <= threshold)
    if kept is not None:
        kept[:] = keep.sum(axis=1)
    return _kept_product(h, keep, w_down.astype(np.float64)).astype(x.dtype)


def _kept_product(x64: np.ndarray, keep: np.ndarray, w64: np.ndarray) -> np.ndarray:
    """``sum over k with keep[m, k] of x64[m, k] * w64[k]``: a dropped entry never meets ``w64`` (an
    ``inf`` there counts only where it is kept)."""
    out = np.zeros((x64.shape[0], w64.shape[1]))
    for m in range(x64.shape[0]):
        out[m] = x64[m, keep[m]] @ w64[keep[m]]
    return out


def unpack(a: TiledELL) -> np.ndarray:
    """The dense matrix back: ``out = np.zeros(a.shape); out[rows, cols] = values`` over the filled
    slots (``t * tile + cols[m, t, s]`` for ``s < counts[m, t]``) and the overflow entries."""
    rows, cols, vals = tiled_ell_entries(a)
    out = np.zeros(a.shape, dtype=vals.dtype if len(vals) else a.values.dtype)
    out[rows, cols] = vals
    return out


def _entries(a: TiledELL | CSR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col, value as float64) of every stored entry."""
    r, c, v = tiled_ell_entries(a) if isinstance(a, TiledELL) else csr_entries(a)
    return r, c, v.astype(np.float64)


def _chunks(n: int, width: int):
    step = max(1, _TEMP // max(width, 1))
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def _scatter_add(out: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> None:
    """``out[idx[i]] += rows[i]`` for every i (a sorted segment sum; faster than np.add.at)."""
    if len(idx) == 0:
        return
    order = np.argsort(idx, kind="stable")
    idx, rows = idx[order], rows[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    out[idx[starts]] += np.add.reduceat(rows, starts, axis=0)


def _ieee(fn):
    """Run ``fn`` with NumPy's floating-point warnings off: NaN and infinities follow IEEE arithmetic
    (inf - inf and 0 * inf are NaN, a sum past the output dtype's range is inf), which is the
    non-finite contract of docs/ops.md, not an accident to warn about."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)
    return run


@_ieee
def spmm(a: TiledELL | CSR, w: np.ndarray) -> np.ndarray:
    """``A @ W`` by gathering the rows of ``W[K, N]``::

        out = np.zeros((M, N))
        for m, k, v in entries(a):
            out[m] += v * W[k]
    """
    rows, cols, vals = _entries(a)
    w64 = w.astype(np.float64)
    out = np.zeros((a.shape[0], w.shape[1]))
    for s in _chunks(len(rows), w.shape[1]):
        _scatter_add(out, rows[s], vals[s, None] * w64[cols[s]])
    return out.astype(w.dtype)


@_ieee
def sddmm(x: np.ndarray, w: np.ndarray, pattern: TiledELL | CSR) -> TiledELL | CSR:
    """``(x @ W.T)`` at ``pattern``'s positions only, ``x[M, D]``, ``W[K, D]``; the result has the
    pattern's layout (same slots, counts and overflow structure) and ``x``'s dtype::

        for each stored (m, k) of pattern:  value = x[m] @ W[k]
    """
    x64, w64 = x.astype(np.float64), w.astype(np.float64)

    def dots(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = np.empty(len(r))
        for s in _chunks(len(r), x.shape[1]):
            out[s] = np.einsum("ij,ij->i", x64[r[s]], w64[c[s]])
        return out.astype(x.dtype)

    if isinstance(pattern, CSR):
        r, c, _ = csr_entries(pattern)
        return CSR(pattern.indptr, pattern.indices, dots(r, c), pattern.shape, pattern.sorted)
    filled = np.arange(pattern.capacity)[None, None, :] < pattern.counts[:, :, None]
    m, t, s = np.nonzero(filled)
    values = np.zeros(pattern.values.shape, dtype=x.dtype)
    values[m, t, s] = dots(m.astype(np.int64), t.astype(np.int64) * pattern.tile + pattern.cols[m, t, s])
    overflow = None if pattern.overflow is None else sddmm(x, w, pattern.overflow)
    return TiledELL(values, pattern.cols, pattern.counts, pattern.shape, pattern.tile, overflow, pattern.sorted)


@_ieee
def spmm_t(a: TiledELL | CSR, dy: np.ndarray) -> np.ndarray:
    """``A.T @ dy``, ``[K, N]`` (the weight gradient of ``spmm``)::

        out = np.zeros((K, N))
        for m, k, v in entries(a):
            out[k] += v * dy[m]
    """
    rows, cols, vals = _entries(a)
    dy64 = dy.astype(np.float64)
    out = np.zeros((a.shape[1], dy.shape[1]))
    for s in _chunks(len(rows), dy.shape[1]):
        _scatter_add(out, cols[s], vals[s, None] * dy64[rows[s]])
    return out.astype(dy.dtype)


@_ieee
def gated_ffn(x: np.ndarray, gate: TiledELL | CSR, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """The fused up+down projection of a gated FFN, ``x[M, D]``, ``gate[M, K]``,
    ``w_up[K, D]``, ``w_down[K, D]``::

        out = np.zeros((M, D))
        for m, j, g in entries(gate):
            out[m] += g * (x[m] @ w_up[j]) * w_down[j]

    i.e. ``((gate * (x @ w_up.T)) @ w_down)`` computed only at the gate's non-zeros.
    """
    rows, cols, vals = _entries(gate)
    x64, up64, down64 = x.astype(np.float64), w_up.astype(np.float64), w_down.astype(np.float64)
    out = np.zeros((x.shape[0], w_down.shape[1]))
    for s in _chunks(len(rows), x.shape[1]):
        h = vals[s] * np.einsum("ij,ij->i", x64[rows[s]], up64[cols[s]])
        _scatter_add(out, rows[s], h[:, None] * down64[cols[s]])
    return out.astype(x.dtype)
