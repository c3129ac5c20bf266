"""NumPy reference of the decode-attention ops: top-k selection, sparse and dense decode, merge.

Shapes: ``q[B, Hq, D]``; a KV cache with ``Hkv`` heads, ``Hq % Hkv == 0``; query head ``h`` reads KV
head ``h // (Hq // Hkv)``. Scores accumulate in float64. Attention over an empty set of keys is
``out = 0``, ``lse = -inf`` (the identity of :func:`merge_attention`).
"""

from __future__ import annotations

import numpy as np

from ..formats.codes import KeyCodes
from ..formats.kv import DenseKV, PageBounds, PagedKV
from ..formats.topk import TopKIndex, topk_capacity

KV = DenseKV | PagedKV


def sequence_kv(kv: KV, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K, V)``, each ``[lengths[b], Hkv, D]``, of sequence ``b`` in token order::

        dense: kv.k[b, :L]
        paged: kv.k_pages[page_table[b, t // page_size], t % page_size] for t in range(L)
    """
    n = int(kv.lengths[b])
    if isinstance(kv, DenseKV):
        return kv.k[b, :n], kv.v[b, :n]
    t = np.arange(n)
    pages = kv.page_table[b, t // kv.page_size]
    return kv.k_pages[pages, t % kv.page_size], kv.v_pages[pages, t % kv.page_size]


def _group_size(q: np.ndarray, kv: KV) -> int:
    return q.shape[1] // kv.num_kv_heads


def head_scores(q: np.ndarray, keys: np.ndarray, group: int) -> np.ndarray:
    """``s[h, t] = q[h] . keys[t, h // group]`` in float64, ``q[Hq, D]``, ``keys[T, Hkv, D]``."""
    kh = keys.astype(np.float64)[:, np.arange(q.shape[0]) // group]  # [T, Hq, D]
    return np.einsum("hd,thd->ht", q.astype(np.float64), kh)


def page_key_bounds(keys: np.ndarray, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Quest metadata of one sequence: element-wise ``(min, max)`` of the keys of each page,
    ``[n_pages, Hkv, D]`` each, over the valid tokens only (the last page may be partial)."""
    n = keys.shape[0]
    n_pages = -(-n // page_size)
    k64 = keys.astype(np.float64)
    lo = np.stack([k64[j * page_size:(j + 1) * page_size].min(axis=0) for j in range(n_pages)]) \
        if n_pages else np.zeros((0,) + keys.shape[1:])
    hi = np.stack([k64[j * page_size:(j + 1) * page_size].max(axis=0) for j in range(n_pages)]) \
        if n_pages else np.zeros((0,) + keys.shape[1:])
    return lo, hi


def page_bounds(kv: KV, page_size: int | None = None, *, out: PageBounds | None = None,
                start: np.ndarray | None = None) -> PageBounds:
    """Quest metadata of the cache (:class:`PageBounds`), pages ``start[b] // ps`` (0 without
    ``start``) to ``ceil(lengths[b] / ps) - 1`` of each sequence written (in place into ``out`` if
    given, else into new zero buffers of ``ceil(max_len / ps)`` pages)::

        kmin[b, j], kmax[b, j] = page_key_bounds(K[b, :lengths[b]], ps)[:, j]   (in the keys' dtype)
    """
    if out is None:
        ps = page_size if page_size is not None else (kv.page_size if isinstance(kv, PagedKV) else 16)
        shape = (kv.batch, -(-kv.max_len // ps), kv.num_kv_heads, kv.head_dim)
        dt = kv.k.dtype if isinstance(kv, DenseKV) else kv.k_pages.dtype
        out = PageBounds(np.zeros(shape, dt), np.zeros(shape, dt), ps)
    ps = out.page_size
    for b in range(kv.batch):
        keys, _ = sequence_kv(kv, b)
        first = 0 if start is None else int(start[b]) // ps
        lo, hi = page_key_bounds(keys[first * ps:], ps)  # pages first, first + 1, ...
        out.kmin[b, first:first + lo.shape[0]] = lo  # exact: min/max of stored values
        out.kmax[b, first:first + hi.shape[0]] = hi
    return out


def quest_bounds(q: np.ndarray, lo: np.ndarray, hi: np.ndarray, group: int) -> np.ndarray:
    """``bound[h, j] = sum_i max(q[h, i] * lo[j, kvh, i], q[h, i] * hi[j, kvh, i])`` with
    ``kvh = h // group``: at least ``q[h] . k`` for every key ``k`` of page ``j``."""
    heads = np.arange(q.shape[0]) // group
    q64 = q.astype(np.float64)[None]  # [1, Hq, D]
    with np.errstate(invalid="ignore"):  # 0 * inf and a NaN bound are NaN: the page ranks last
        return np.maximum(q64 * lo[:, heads], q64 * hi[:, heads]).sum(axis=2).T  # [Hq, n_pages]


def forced_positions(length: int, sink: int, window: int, page_size: int | None = None) -> np.ndarray:
    """Token positions (or, with ``page_size``, the pages holding them) that are always kept: the
    first ``sink`` tokens and the last ``window`` tokens of the sequence; a page selection also
    always keeps the page of the newest token (the one being written), as if ``window >= 1``."""
    if page_size is not None:
        window = max(window, 1)
    t = np.union1d(np.arange(min(sink, length)), np.arange(max(length - window, 0), length))
    return t if page_size is None else np.unique(t // page_size)


#: the mass ranking's default sample of the keys outside the candidates: every 16th (``tail_sample``)
TAIL_SAMPLE = 16


def softmax_mass(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Each row's softmax of ``x[H, T]`` in float64, with non-finite scores given a meaning::

        x = where(isnan(x), -inf, x)              # a NaN score carries no mass (ranks last)
        m = x.max(axis=1)
        m = +inf: mass = (x == +inf) / count(x == +inf)   (the limit: the +inf keys share it all)
        m = -inf: mass = 0                                (no key is known to matter)
        else:     mass = exp(x - m) / sum(exp(x - m))

    ``weights[T]`` (default 1): key ``t`` counts ``weights[t]`` times (``exp`` and the count above
    multiplied by it): a sampled key standing for several.
    """
    x = np.where(np.isnan(x), -np.inf, x.astype(np.float64))
    if x.shape[1] == 0:
        return np.zeros_like(x)
    m = x.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.where(np.isposinf(m), (x == np.inf).astype(np.float64),
                     np.where(np.isneginf(m), 0.0, np.exp(x - np.where(np.isfinite(m), m, 0.0))))
    if weights is not None:
        w = w * weights
    z = w.sum(axis=1, keepdims=True)
    return np.divide(w, z, out=np.zeros_like(w), where=z > 0)


def top_p_count(mass: np.ndarray, forced_mass: float, top_p: float, k_min: int, k: int) -> int:
    """How many of the non-forced units, ``mass`` in descending order, an adaptive row keeps: the
    fewest ``n`` with ``forced_mass + mass[:n].sum() >= top_p``, then clamped to ``[k_min, k]`` (and
    to ``len(mass)``); ``n = k`` when no prefix reaches ``top_p``."""
    cum = forced_mass + np.cumsum(mass)
    if forced_mass >= top_p:
        need = 0
    else:
        reach = np.flatnonzero(cum >= top_p)
        need = int(reach[0]) + 1 if reach.size else k
    return min(max(need, k_min), k, mass.shape[0])


def select_topk(q: np.ndarray, kv: KV, k: int, *, method: str = "exact", sink: int = 0, window: int = 0,
                shared: bool = True, page_size: int | None = None, bounds: PageBounds | None = None,
                top_p: float | None = None, k_min: int = 0, scale: float | None = None,
                codes: KeyCodes | None = None, rescore: int = 0, candidates: int = 0,
                tail_sample: int | None = None) -> TopKIndex:
    """Keys for each query: the ``sink`` first and ``window`` last tokens, plus the ``k`` best others::

        s = q[b, h] . K[b, t, h // group]          # method="exact", tokens
        s = quest_bounds(q, *page_key_bounds(K))    # method="quest", pages of page_size tokens
                                                    # (or bounds.kmin/kmax[b, :n_pages] when given)
        if shared: s = s summed over the query heads of each KV group   (G = Hkv, else G = Hq)
        keep = forced | top-k of s over the non-forced candidates (ties broken arbitrarily)

    ``counts[b, g] = min(n_candidates, n_forced + k)``; ``k_max`` depends on shapes only
    (``min(k + sink + window, S)`` for tokens, in pages for quest); padding is -1.

    Adaptive budget (``top_p`` given, method="exact" or "int8"): ``k`` is the most units chosen by
    score, ``k_min`` the fewest; in between, as few as cover ``top_p`` of the estimated attention mass::

        mass = softmax_mass(scale * s_h)            # per query head h, s_h its own scores, over t < L
                                                    # (int8: the scores of the int8 keys below)
        if shared: mass = mean of mass over the query heads of the group
        order = non-forced units by descending mass (ties broken arbitrarily)
        n = top_p_count(mass[order], mass[forced].sum(), top_p, k_min, k)
        keep = forced | order[:n]

    ``scale`` defaults to ``1 / sqrt(D)`` (the attention's own scale gives the true softmax).

    Mass ranking over candidates (``candidates = c >= k``, method="exact" or "int8"; select-then-
    prune after Twilight): the ``c`` best by the method's ranking above (one score per key, summed
    over the group when shared) are the candidates; each head's softmax is taken over them, the
    forced units and a sample of the rest (every ``r``-th other token standing for ``r`` tokens;
    ``r = tail_sample``, 16 by default, 0 for none: the candidates' own mass), and the candidates
    are ranked by that mass::

        cand = forced | order[:c]                   # order: the ranking of the fixed-k selection
        tail = [t for t in range(0, L, r) if t not in cand]            (none when r = 0)
        mass = softmax_mass(scale * s_h[cand + tail], weights=[1] * len(cand) + [r] * len(tail))[cand]
        # per query head; shared: mean over the group's heads
        by_mass = order[:c] by descending mass
        n = k without top_p, else top_p_count(mass[by_mass], mass[forced].sum(), top_p, k_min, k)
        keep = forced | by_mass[:n]

    (the keys outside the candidates are scored per head only in the sample, 1/r of them: the
    ranking stays one shared dot product per key).

    Reduced-precision ranking (method="int8", ``codes`` from :func:`quantize_keys`)::

        s = q[b, h] . (codes.codes[b, t, h // group] * codes.scales[b, t, h // group])   # NaN scale: NaN
        rescore > k: best = the k best by the exact score among the rescore best by s   (not with top_p)
    """
    bsz, hq, _ = q.shape
    group = _group_size(q, kv)
    n_groups = kv.num_kv_heads if shared else hq
    ps = None
    if method == "quest":
        ps = page_size if page_size is not None else bounds.page_size if bounds is not None else \
            (kv.page_size if isinstance(kv, PagedKV) else 16)
    k_max = topk_capacity(k, sink, window if ps is None else max(window, 1), kv.max_len, ps)
    indices = np.full((bsz, n_groups, k_max), -1, dtype=np.int32)
    counts = np.zeros((bsz, n_groups), dtype=np.int32)
    for b in range(bsz):
        keys, _ = sequence_kv(kv, b)
        if method == "quest":
            if bounds is None:
                lo, hi = page_key_bounds(keys, ps)
            else:
                n_pages = -(-keys.shape[0] // ps)
                lo, hi = (x[b, :n_pages].astype(np.float64) for x in (bounds.kmin, bounds.kmax))
            s = quest_bounds(q[b], lo, hi, group)
        elif top_p is not None and not candidates:
            sc = 1.0 / np.sqrt(q.shape[2]) if scale is None else scale
            src = keys if method == "exact" else int8_keys(codes, b, keys.shape[0])
            s = softmax_mass(sc * head_scores(q[b], src, group))
            if shared:
                s = s.reshape(n_groups, group, -1).mean(axis=1)
        elif method == "int8":
            s = head_scores(q[b], int8_keys(codes, b, keys.shape[0]), group)
            exact = head_scores(q[b], keys, group) if rescore > k else None
            if shared and exact is not None:
                exact = exact.reshape(n_groups, group, -1).sum(axis=1)
        else:
            s = head_scores(q[b], keys, group)
        if shared and (top_p is None or candidates):
            s = s.reshape(n_groups, group, -1).sum(axis=1)
        forced = forced_positions(keys.shape[0], sink, window, ps)
        free = np.ones(s.shape[1], dtype=bool)
        free[forced] = False
        cand = np.flatnonzero(free)
        for g in range(n_groups):
            order = cand[np.argsort(-s[g, cand], kind="stable")]
            if candidates:
                tail = TAIL_SAMPLE if tail_sample is None else tail_sample
                order, mass, forced_mass = _mass_order(q[b], keys, codes, b, method, scale, group, shared, g, forced,
                                                       order[:candidates], tail)
                n = min(k, len(order)) if top_p is None else top_p_count(mass, forced_mass, top_p, k_min, k)
            else:
                n = k if top_p is None else top_p_count(s[g, order], float(s[g, forced].sum()), top_p, k_min, k)
            best = order[:n]
            if method == "int8" and rescore > k:
                pool = order[:rescore]
                best = pool[np.argsort(-exact[g, pool], kind="stable")[:k]]
            sel = np.sort(np.concatenate([forced, best]))
            indices[b, g, :len(sel)] = sel
            counts[b, g] = len(sel)
    return TopKIndex(indices, counts, "token" if ps is None else "page", ps)


def _mass_order(q: np.ndarray, keys: np.ndarray, codes: KeyCodes | None, b: int, method: str,
                 scale: float | None, group: int, shared: bool, g: int, forced: np.ndarray, cands: np.ndarray,
                 tail: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Mass ranking of row ``g``: ``(cands by descending mass, their masses, the forced mass)``, the
    mass being each query head's softmax over ``forced | cands`` and every ``tail``-th other token
    (weighted ``tail``; none for 0), mean over the group when shared."""
    units = np.concatenate([forced, cands]).astype(np.int64)
    n = keys.shape[0]
    sample = np.setdiff1d(np.arange(0, n, tail), units) if tail > 0 else np.zeros(0, np.int64)
    every = np.concatenate([units, sample]).astype(np.int64)
    weights = np.concatenate([np.ones(units.shape[0]), np.full(sample.shape[0], float(tail))])
    sc = 1.0 / np.sqrt(q.shape[1]) if scale is None else scale
    src = keys if method == "exact" else int8_keys(codes, b, n)
    heads = np.arange(g * group, (g + 1) * group) if shared else np.array([g])
    m = softmax_mass(sc * head_scores(q, src[every], group)[heads], weights)[:, :units.shape[0]].mean(axis=0)
    mf, mc = m[:forced.shape[0]], m[forced.shape[0]:]
    order = np.argsort(-mc, kind="stable")
    return cands[order], mc[order], float(mf.sum())


def int8_keys(codes: KeyCodes, b: int, n: int) -> np.ndarray:
    """The keys the int8 copy stands for, ``codes[b, t] * scales[b, t]`` for ``t < n``, float64 (a NaN
    scale gives NaN keys: their scores are NaN)."""
    return np.asarray(codes.codes[b, :n], np.float64) * np.asarray(codes.scales[b, :n], np.float64)[..., None]


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """Softmax attention of one query ``q[D]`` over ``keys, values[T, D]`` in float64, with the
    non-finite contract of docs/ops.md::

        s = scale * keys @ q
        any s NaN or +inf:      out = NaN, lse = NaN
        every s -inf (or T=0):  out = sum over keys of 0 * v (0, or NaN where a value is not finite), lse = -inf
        otherwise:              w = exp(s - max(s)) (0 for s = -inf); out = w @ v / sum(w); lse = log(sum(exp(s)))

    Every selected value is multiplied by its weight, also a weight of 0, so a NaN or an infinity in
    the values of a selected key is never dropped; the rule does not depend on how the keys are split.
    """
    d = values.shape[1]
    if keys.shape[0] == 0:
        return np.zeros(d), -np.inf
    v64 = values.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = scale * (keys.astype(np.float64) @ q.astype(np.float64))
        if np.isnan(s).any() or np.isposinf(s).any():
            return np.full(d, np.nan), float("nan")
        m = s.max()
        if m == -np.inf:
            return (0.0 * v64).sum(axis=0), -np.inf
        p = np.exp(s - m)  # exp(-inf) = 0
        # an elementwise product, not p @ v: a BLAS may skip the zero weights, and 0 * NaN must stay NaN
        return (p[:, None] * v64).sum(axis=0) / p.sum(), float(m + np.log(p.sum()))


def selected_tokens(index: TopKIndex, b: int, g: int, length: int) -> np.ndarray:
    """Token positions of row ``(b, g)`` of ``index`` (pages expanded to their tokens < length)."""
    sel = index.indices[b, g, :index.counts[b, g]].astype(np.int64)
    if index.granularity == "page":
        ps = index.page_size
        span = min(ps, max(length, 0))  # a page's tokens below the length: never more than the length
        sel = (sel[:, None] * ps + np.arange(span)[None, :]).ravel()
        sel = sel[sel < length]
    return sel


def sparse_decode(q: np.ndarray, kv: KV, index: TopKIndex, *, scale: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(out[B, Hq, D], lse[B, Hq])``: softmax attention of each query head over its selected keys::

        g = h // group if index is shared (G == Hkv) else h
        sel = tokens of index.indices[b, g, :index.counts[b, g]]
        s = scale * K[b, sel, h // group] @ q[b, h]
        out[b, h] = softmax(s) @ V[b, sel, h // group];  lse[b, h] = log(sum(exp(s)))

    ``scale`` defaults to ``1 / sqrt(D)``; ``out`` has q's dtype, ``lse`` is float32.
    """
    bsz, hq, d = q.shape
    group = _group_size(q, kv)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    shared = index.groups == kv.num_kv_heads
    out = np.zeros((bsz, hq, d))
    lse = np.zeros((bsz, hq))
    for b in range(bsz):
        keys, values = sequence_kv(kv, b)
        for h in range(hq):
            sel = selected_tokens(index, b, h // group if shared else h, keys.shape[0])
            out[b, h], lse[b, h] = _attend(q[b, h], keys[sel, h // group], values[sel, h // group], scale)
    return out.astype(q.dtype), lse.astype(np.float32)


def dense_decode(q: np.ndarray, kv: KV, *, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``sparse_decode`` over every key ``t < lengths[b]``: the baseline it must equal when the index
    selects everything."""
    bsz, hq, d = q.shape
    group = _group_size(q, kv)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((bsz, hq, d))
    lse = np.zeros((bsz, hq))
    for b in range(bsz):
        keys, values = sequence_kv(kv, b)
        for h in range(hq):
            out[b, h], lse[b, h] = _attend(q[b, h], keys[:, h // group], values[:, h // group], scale)
    return out.astype(q.dtype), lse.astype(np.float32)


def merge_attention(o1: np.ndarray, lse1: np.ndarray, o2: np.ndarray, lse2: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Attention over the union of two disjoint key sets from the two partial results::

        lse = np.logaddexp(lse1, lse2)
        out = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)      # both empty: out = 0, lse = -inf
    """
    l1, l2 = lse1.astype(np.float64), lse2.astype(np.float64)
    # non-finite (docs/ops.md): a side with lse = -inf weighs exactly 0 but enters as 0 * o (NaN stays
    # NaN); a NaN lse gives NaN; a +inf lse gives lse = +inf and out = NaN (exp(inf - inf))
    with np.errstate(invalid="ignore"):
        lse = np.logaddexp(l1, l2)
        w1 = np.where(np.isneginf(l1), 0.0, np.exp(l1 - lse))
        w2 = np.where(np.isneginf(l2), 0.0, np.exp(l2 - lse))
        out = o1.astype(np.float64) * w1[..., None] + o2.astype(np.float64) * w2[..., None]
    return np.asarray(out, o1.dtype), np.asarray(lse, np.float32)  # 0-d stays an array
