"""Decode and merge inputs with NaN and infinities in every position, shared by the host, simulator
and compile-emulated tiers, and the float64 oracle of the non-finite contract (docs/ops.md).

Each case is small: B 2, Hq 4, Hkv 2, D 8, a cache of 24 tokens (lengths 24 and 13), so the numba_cuda
simulator (16 keys per split) and the CUDA C emulation run it in a few splits. ``long=True`` makes
sequence 0 1100 tokens, which numba_cpu cuts into splits (256 keys or more each).
Component 0 of every query is positive, so a key whose component 0 is -inf scores -inf and one whose
component 0 is +inf scores +inf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from sparsecore import DenseKV, PagedKV, TopKIndex

NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
NAN, INF = np.nan, np.inf


def _nan_key(q, k, v):
    k[0, 5, 0, 3] = NAN          # one key of KV head 0, sequence 0: heads 0, 1 of sequence 0 are NaN


def _nan_query(q, k, v):
    q[1, 2, 4] = NAN             # query head 2 of sequence 1: NaN


def _neg_inf_key(q, k, v):
    k[0, 3, 1, 0] = -INF         # scores -inf: weight 0, the rest of the attention unchanged


def _all_neg_inf(q, k, v):
    k[1, :, 0, 0] = -INF         # every key of sequence 1, KV head 0: out 0, lse -inf


def _all_neg_inf_nan_value(q, k, v):
    k[1, :, 0, 0] = -INF
    v[1, 2, 0, 1] = NAN          # weight 0 * NaN: out[..., 1] NaN, lse -inf


def _neg_inf_key_nan_value(q, k, v):
    k[0, 3, 1, 0] = -INF
    v[0, 3, 1, 5] = NAN          # 0 * NaN stays NaN in column 5


def _pos_inf_key(q, k, v):
    k[0, 7, 0, 0] = INF          # a +inf score: NaN


def _inf_value(q, k, v):
    v[0, 4, 1, 2] = INF          # column 2 of heads 2, 3: +inf


def _nan_value(q, k, v):
    v[1, 6, 0, 1] = NAN


def _mixed(q, k, v):
    k[0, 2, 0, 0] = -INF
    k[0, 20, 1, 0] = INF
    v[1, 0, 1, 3] = -INF
    v[1, 1, 1, 3] = INF         # +inf + -inf in one column: NaN


POISONS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {
    "nan-key": _nan_key, "nan-query": _nan_query, "neg-inf-key": _neg_inf_key, "all-neg-inf": _all_neg_inf,
    "all-neg-inf-nan-value": _all_neg_inf_nan_value, "neg-inf-key-nan-value": _neg_inf_key_nan_value,
    "pos-inf-key": _pos_inf_key, "inf-value": _inf_value, "nan-value": _nan_value, "mixed": _mixed,
}


def decode_case(poison: str, dtype: str, *, paged: bool = False, long: bool = False, long_len: int = 1100,
                seed: int = 0) -> tuple[np.ndarray, DenseKV | PagedKV]:
    """``(q, kv)`` of one poisoned case (``long``: sequence 0 has ``long_len`` tokens); positions past
    a length hold NaN (never read)."""
    rng = np.random.default_rng(seed)
    b, hq, hkv, d = 2, 4, 2, 8
    s = long_len if long else 24
    lengths = np.array([s, 13], np.int32)
    q = rng.uniform(-1, 1, (b, hq, d))
    q[:, :, 0] = np.abs(q[:, :, 0]) + 0.25
    k = rng.uniform(-1, 1, (b, s, hkv, d))
    v = rng.uniform(-1, 1, (b, s, hkv, d))
    POISONS[poison](q, k, v)
    k[1, 13:] = v[1, 13:] = NAN
    npd = NP[dtype]
    q, k, v = q.astype(npd), k.astype(npd), v.astype(npd)
    if not paged:
        return q, DenseKV(k, v, lengths)
    ps = 4
    n_pages = -(-s // ps) + -(-13 // ps) + 1                # one spare page, all NaN
    kp = np.full((n_pages, ps, hkv, d), NAN, npd)
    vp = np.full((n_pages, ps, hkv, d), NAN, npd)
    order = np.random.default_rng(seed + 1).permutation(n_pages - 1)
    table = np.full((b, -(-s // ps)), -1, np.int32)
    used = 0
    for i, n in enumerate(lengths):
        for j in range(-(-int(n) // ps)):
            p = int(order[used])
            used += 1
            table[i, j] = p
            rows = min(ps, int(n) - j * ps)
            kp[p, :rows], vp[p, :rows] = k[i, j * ps:j * ps + rows], v[i, j * ps:j * ps + rows]
    return q, PagedKV(kp, vp, table, lengths)


def indices_for(kv: DenseKV | PagedKV, *, groups: int, page_size: int | None, keep: float = 1.0, seed: int = 0
                ) -> TopKIndex:
    """A TopKIndex selecting a random ``keep`` share of every row's units (all of them with 1.0)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(kv.lengths)
    unit = page_size or 1
    n_units = [-(-int(n) // unit) for n in lengths]
    k_max = max(n_units + [1])
    idx = np.full((len(lengths), groups, k_max), -1, np.int32)
    cnt = np.zeros((len(lengths), groups), np.int32)
    for b, n in enumerate(n_units):
        for g in range(groups):
            sel = np.flatnonzero(rng.random(n) < keep) if keep < 1 else np.arange(n)
            sel = rng.permutation(sel)
            idx[b, g, :len(sel)] = sel
            cnt[b, g] = len(sel)
    return TopKIndex(idx, cnt, "token" if page_size is None else "page", page_size)


def oracle_attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """The contract of docs/ops.md for one query head, written out in float64 loops."""
    q = q.astype(np.float64)
    d = values.shape[1] if values.ndim == 2 else q.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        s = [scale * float(np.sum(q * kk.astype(np.float64))) for kk in keys]
        if any(x != x or x == INF for x in s):
            return np.full(d, NAN), NAN
        out = np.zeros(d)
        if not s or max(s) == -INF:
            for vv in values:
                out += 0.0 * vv.astype(np.float64)
            return out, -INF
        m = max(s)
        w = [0.0 if x == -INF else float(np.exp(x - m)) for x in s]
        for wi, vv in zip(w, values):
            out += wi * vv.astype(np.float64)
        return out / sum(w), m + float(np.log(sum(w)))


def oracle_decode(q: np.ndarray, kv: DenseKV | PagedKV, index: TopKIndex | None, scale: float | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(out, lse)`` in float64 of dense (index None) or sparse decode, from :func:`oracle_attend`."""
    bsz, hq, d = q.shape
    group = hq // kv.num_kv_heads
    scale = 1 / np.sqrt(d) if scale is None else scale
    out, lse = np.zeros((bsz, hq, d)), np.zeros((bsz, hq))
    for b in range(bsz):
        n = int(kv.lengths[b])
        if isinstance(kv, DenseKV):
            keys, vals = kv.k[b, :n], kv.v[b, :n]
        else:
            t = np.arange(n)
            pages = kv.page_table[b, t // kv.page_size]
            keys, vals = kv.k_pages[pages, t % kv.page_size], kv.v_pages[pages, t % kv.page_size]
        for h in range(hq):
            if index is None:
                sel = np.arange(n)
            else:
                g = h // group if index.groups == kv.num_kv_heads else h
                sel = index.indices[b, g, :index.counts[b, g]].astype(np.int64)
                if index.granularity == "page":
                    ps = index.page_size
                    sel = np.array([p * ps + i for p in sel for i in range(ps) if p * ps + i < n], np.int64)
            out[b, h], lse[b, h] = oracle_attend(q[b, h], keys[sel, h // group], vals[sel, h // group], scale)
    return out, lse


def merge_case(dtype: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(o1, lse1, o2, lse2)`` over 16 rows of D 3 holding every pairing of lse in {finite, -inf,
    +inf, NaN} and a NaN or infinite o on some rows."""
    rng = np.random.default_rng(seed)
    specials = [0.5, -INF, INF, NAN]
    l1 = np.array([a for a in specials for _ in specials], np.float32)
    l2 = np.array([b for _ in specials for b in specials], np.float32)
    l1[0], l2[0] = 1.0, -2.0
    o1 = rng.uniform(-1, 1, (16, 3))
    o2 = rng.uniform(-1, 1, (16, 3))
    o1[4, 0] = NAN      # a NaN o of a -inf side: 0 * NaN = NaN
    o2[4, 2] = INF
    o1[5, 1] = -INF     # both sides -inf, an infinite o: 0 * inf = NaN
    return o1.astype(NP[dtype]), l1, o2.astype(NP[dtype]), l2


def oracle_merge(o1: Any, l1: Any, o2: Any, l2: Any) -> tuple[np.ndarray, np.ndarray]:
    o1, o2 = np.asarray(o1, np.float64), np.asarray(o2, np.float64)
    out, lse = np.zeros(o1.shape), np.zeros(o1.shape[:-1])
    for r in range(o1.shape[0]):
        a, c = float(l1[r]), float(l2[r])
        if a != a or c != c:
            ls = NAN
        elif INF in (a, c):
            ls = INF
        elif a == c == -INF:
            ls = -INF
        else:
            m = max(a, c)
            ls = m + np.log(np.exp(a - m) + np.exp(c - m))
        with np.errstate(invalid="ignore"):
            w1 = 0.0 if a == -INF else np.exp(a - ls)
            w2 = 0.0 if c == -INF else np.exp(c - ls)
            out[r] = w1 * o1[r] + w2 * o2[r]
        lse[r] = ls
    return out, lse
