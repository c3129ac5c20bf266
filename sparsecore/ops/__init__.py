"""The public ops. Each builds its ``Inputs``, which the dispatcher validates and routes to the first
backend that can run it (or to ``backend=``, a backend or variant name). Arrays come back as the
kind that went in. The meaning of each op is NumPy code in :mod:`sparsecore.reference`."""

from __future__ import annotations

from typing import Any

from ..formats.codes import KeyCodes
from ..formats.csr import CSR
from ..formats.kv import DenseKV, PageBounds, PagedKV
from ..formats.tiled_ell import TiledELL
from ..formats.topk import TopKIndex
from . import inputs as I
from .decode_plan import DecodePlan
from .dispatcher import BACKEND_PRIORITY as BACKEND_PRIORITY
from .dispatcher import OPS as OPS
from .dispatcher import BackendOp as BackendOp
from .dispatcher import dispatch
from .dispatcher import implementations as implementations
from .dispatcher import register as register
from .dispatcher import select as select
from .op_plan import OpPlan

#: the public face, re-exported by ``sparsecore`` (``from .ops import *``): one function per op of the
#: table (a test checks that every op has one here) and the plans. The dispatcher's names (dispatch,
#: select, implementations, register, BackendOp, BACKEND_PRIORITY, OPS) are importable from here too.
__all__ = ["pack", "gated_pack", "unpack", "spmm", "threshold_spmm", "threshold_mlp", "sddmm", "spmm_t", "gated_ffn",
           "page_bounds", "select_topk", "sparse_decode", "dense_decode", "merge_attention", "DecodePlan", "OpPlan"]

Sparse = TiledELL | CSR
KV = DenseKV | PagedKV


def pack(x: Any, *, threshold: float = 0.0, activation: str | None = None, tile: int = 256,
         capacity: int | None = None, backend: str | None = None) -> TiledELL:
    """Lossless TiledELL of the entries of ``act(x)`` with ``abs > threshold`` (NaN is kept)::

        a = np.maximum(x, 0) if activation == "relu" else x
        keep = ~(np.abs(a) <= threshold)

    ``tile`` is a power of two (2..32768); ``capacity`` slots per (row, tile), default
    ``max(tile // 8, 1)``;
    entries past a full tile go to the overflow CSR, never dropped.
    """
    return dispatch(I.PackInputs(x, threshold, activation, tile, capacity), backend)


def gated_pack(gate: Any, up: Any, *, threshold: float = 0.0, activation: str | None = "relu", tile: int = 256,
               capacity: int | None = None, backend: str | None = None) -> TiledELL:
    """:func:`pack` of a gated FFN's hidden state, in one call (activation, product and pack)::

        g = np.maximum(gate, 0) if activation == "relu" else gate     # activation: "relu" or None
        h = (g.astype(np.float32) * up.astype(np.float32)).astype(gate.dtype)   # float64 stays float64
        return pack(h, threshold=threshold, tile=tile, capacity=capacity)

    ``gate`` and ``up`` are ``[M, K]`` of one dtype (``x @ w_gate.T`` and ``x @ w_up.T``); the result
    feeds :func:`spmm` with ``w_down.T`` (a ReLU-gated FFN's down projection).
    """
    return dispatch(I.GatedPackInputs(gate, up, threshold, activation, tile, capacity), backend)


def unpack(a: TiledELL, *, backend: str | None = None) -> Any:
    """The dense ``[M, K]`` matrix of ``a`` (slots and overflow)."""
    return dispatch(I.UnpackInputs(a), backend)


def spmm(a: Sparse, w: Any, *, backend: str | None = None) -> Any:
    """``A @ W``: ``A[M, K]`` TiledELL or CSR, ``W[K, N]`` dense; gathers the rows of ``W``::

        out[m] = sum over stored (m, k, v) of v * W[k]
    """
    return dispatch(I.SpmmInputs(a, w), backend)


def threshold_spmm(x: Any, w: Any, *, threshold: float = 0.0, backend: str | None = None) -> Any:
    """:func:`spmm` of ``pack(x, threshold=threshold)`` in one call, without the packed matrix: a
    decode step's down projection with its input thresholded (TEAL-style training-free sparsity)::

        keep = ~(np.abs(x) <= threshold)                         # NaN is kept
        out[m] = sum over k with keep[m, k] of x[m, k] * W[k]

    ``x[M, K]`` and ``w[K, N]`` (the transpose of a LLaMA ``down_proj.weight``) of one dtype; the
    result ``[M, N]`` has that dtype. ``threshold`` is a finite number ``>= 0``.
    """
    return dispatch(I.ThresholdSpmmInputs(x, w, threshold), backend)


def threshold_mlp(x: Any, w_gate_up: Any, w_down: Any, *, input_threshold: float = 0.0, threshold: float = 0.0,
                  activation: str = "silu", kept: Any = None, backend: str | None = None) -> Any:
    """A LLaMA-style gated MLP with its input and its hidden state thresholded, in one call (no packed
    matrix, no hidden tensor): the decode step of a SiLU model with training-free (TEAL-style) sparsity::

        keep_x = ~(np.abs(x) <= input_threshold)                 # NaN is kept
        gu = (x * keep_x) @ w_gate_up                            # a dropped input never meets W
        g, u = gu[:, :K], gu[:, K:]
        h = (g / (1 + np.exp(-g)) if activation == "silu" else np.maximum(g, 0)) * u
        keep_h = ~(np.abs(h) <= threshold)
        out = (h * keep_h) @ w_down                              # [M, N], x's dtype
        kept[m] = keep_h[m].sum()                                # when kept[M] (int64) is given

    ``x[M, D]``, ``w_gate_up[D, 2K]`` (``[gate_proj.weight.T | up_proj.weight.T]``), ``w_down[K, N]``
    (``down_proj.weight.T``), one dtype; ``activation`` ``"silu"`` or ``"relu"``; the thresholds are
    finite numbers ``>= 0`` (0 drops exact zeros only). Backends compute ``h`` in float32, so an entry
    within rounding of ``threshold`` may be kept where the float64 reference drops it.
    """
    return dispatch(I.ThresholdMlpInputs(x, w_gate_up, w_down, input_threshold, threshold, activation, kept), backend)


def sddmm(x: Any, w: Any, pattern: Sparse, *, backend: str | None = None) -> Sparse:
    """``x @ W.T`` at ``pattern``'s positions only (``x[M, D]``, ``W[K, D]``); the result has the
    pattern's layout and ``x``'s dtype::

        value at stored (m, k) = x[m] @ W[k]
    """
    return dispatch(I.SddmmInputs(x, w, pattern), backend)


def spmm_t(a: Sparse, dy: Any, *, backend: str | None = None) -> Any:
    """``A.T @ dy``, ``[K, N]`` (the weight gradient of :func:`spmm`)::

        out[k] = sum over stored (m, k, v) of v * dy[m]
    """
    return dispatch(I.SpmmTInputs(a, dy), backend)


def gated_ffn(x: Any, gate: Sparse, w_up: Any, w_down: Any, *, backend: str | None = None) -> Any:
    """Fused up+down projection of a gated FFN over the gate's non-zeros only::

        out[m] = sum over stored (m, j, g) of g * (x[m] @ w_up[j]) * w_down[j]

    ``x[M, D]``, ``gate[M, K]`` (already activated, e.g. ``pack(x @ w_gate.T, activation="relu")``),
    ``w_up[K, D]``, ``w_down[K, N]`` (the transpose of a LLaMA ``down_proj.weight``).
    """
    return dispatch(I.GatedFfnInputs(x, gate, w_up, w_down), backend)


def page_bounds(kv: KV, page_size: int | None = None, *, out: PageBounds | None = None, start: Any = None,
                backend: str | None = None) -> PageBounds:
    """Quest metadata of ``kv``: per logical page of ``page_size`` tokens, the element-wise min and
    max of its keys (see :class:`PageBounds`)::

        kmin[b, j] = K[b, j * ps : min((j + 1) * ps, lengths[b])].min(axis=0)   # [Hkv, D]
        kmax[b, j] = K[b, j * ps : min((j + 1) * ps, lengths[b])].max(axis=0)

    Without ``out``: new buffers with ``P = ceil(max_len / ps)`` pages, pages past a sequence's
    length 0. With ``out`` (bounds of this cache from an earlier call, ``out.page_size`` is used):
    updated in place and returned; ``start[B]`` int32 (``0 <= start[b] <= lengths[b]``: the tokens
    before ``start[b]`` are unchanged since ``out`` was computed, e.g. the lengths before a decode
    step appended tokens) limits the work to pages ``start[b] // ps`` to ``ceil(lengths[b] / ps) - 1``;
    pages past the length are left as they are. ``page_size`` defaults to the paged cache's, or 16.
    """
    result = dispatch(I.PageBoundsInputs(kv, page_size, out, start), backend)
    return result if out is None else out


def select_topk(q: Any, kv: KV, k: int, *, method: str = "exact", sink: int = 0, window: int = 0,
                shared: bool = True, page_size: int | None = None, bounds: PageBounds | None = None,
                top_p: float | None = None, k_min: int = 0, scale: float | None = None,
                codes: KeyCodes | None = None, rescore: int = 0, candidates: int = 0,
                tail_sample: int | None = None, backend: str | None = None) -> TopKIndex:
    """The keys each decode query attends to: the first ``sink`` and last ``window`` tokens always,
    plus the ``k`` best others::

        method="exact": score[t] = q[b, h] . K[b, t, h // group]                 (tokens)
        method="quest": score[j] = sum_i max(q_i * kmin[j, i], q_i * kmax[j, i]) (pages of page_size)
        shared=True: scores summed over the query heads of a KV group, G = Hkv; else G = Hq

    ``k`` counts units chosen by score in addition to the forced ones (``0 <= k <=`` the cache's
    capacity in units); ``page_size`` (quest only) defaults to ``bounds.page_size``, the paged
    cache's, or 16. ``bounds`` (quest only, from :func:`page_bounds` of this cache and page size):
    the pages' ``kmin/kmax`` are read from it instead of computed from the keys (2 / page_size of
    the key bytes; the result is the same).

    Adaptive budget (``top_p``, method="exact" or "int8"): keep, besides the forced units, as few keys
    as cover ``top_p`` of the estimated attention mass, at least ``k_min`` and at most ``k``::

        mass = softmax(scale * s_h) per query head h (its own scores); shared: mean over the group
        keep = forced | the fewest top-mass others with mass[keep].sum() >= top_p, clamped to [k_min, k]

    ``scale`` (top_p only) defaults to ``1 / sqrt(D)``. Counts are ragged, ``k_max`` is as for ``k``.
    ``candidates=c`` (``k <= c``; with or without top_p; select-then-prune, after Twilight): the ``c``
    best by the method's ranking (one shared score per key) are ranked again by ``mass``, each
    head's softmax over the forced units, the candidates and every ``tail_sample``-th other key
    (default 16; each stands for that many keys in the softmax's sum; 0: none, the candidates' own
    mass as in Twilight), and the ``k`` of highest mass are kept (with top_p: as few as cover it,
    as above). The other keys are scored per head only in that sample, so this costs about what the
    plain ranking does, and it keeps what the group's heads attend to rather than what their summed
    scores favour. ``c`` at least a row's length (any value above the cache's capacity, e.g. the
    model's context) ranks every key of the row by its mass: docs/selection.md's most accurate
    fixed budget, each key scored once per query head.

    ``method="int8"``: exact ranking over the int8 copy ``codes`` of the keys (:func:`quantize_keys`),
    ``score[t] = scales[b, t, h // group] * (q[b, h] . codes[b, t, h // group])``; with ``rescore``
    (``>= k``), the ``rescore`` best by that score are re-scored from the keys and the ``k`` best of
    them kept.
    """
    return dispatch(I.SelectTopkInputs(q, kv, k, method, sink, window, shared, page_size, bounds, top_p, k_min,
                                       scale, codes, rescore, candidates, tail_sample), backend)


def sparse_decode(q: Any, kv: KV, index: TopKIndex, *, scale: float | None = None,
                  backend: str | None = None) -> tuple[Any, Any]:
    """``(out[B, Hq, D], lse[B, Hq])``: softmax attention of each query head over its selected keys::

        s = scale * K[b, sel, h // group] @ q[b, h]
        out[b, h] = softmax(s) @ V[b, sel, h // group];  lse[b, h] = log(sum(exp(s)))

    ``sel`` is row ``h // group`` of ``index`` when shared (``G == Hkv``), row ``h`` when per head.
    An empty selection gives ``out = 0``, ``lse = -inf``. ``scale`` defaults to ``1 / sqrt(D)``.
    """
    return dispatch(I.SparseDecodeInputs(q, kv, index, scale), backend)


def dense_decode(q: Any, kv: KV, *, scale: float | None = None, backend: str | None = None
                 ) -> tuple[Any, Any]:
    """:func:`sparse_decode` over every key ``t < lengths[b]``."""
    return dispatch(I.DenseDecodeInputs(q, kv, scale), backend)


def merge_attention(o1: Any, lse1: Any, o2: Any, lse2: Any, *, backend: str | None = None
                    ) -> tuple[Any, Any]:
    """Combine two partial attentions over disjoint key sets by their log-sum-exp::

        lse = np.logaddexp(lse1, lse2)
        out = o1 * exp(lse1 - lse)[..., None] + o2 * exp(lse2 - lse)[..., None]
    """
    return dispatch(I.MergeAttentionInputs(o1, lse1, o2, lse2), backend)
