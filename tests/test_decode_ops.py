"""Host tier: the decode ops (select_topk, sparse_decode, dense_decode, merge_attention) against plain
NumPy written here, in float64 from the rounded stored inputs. ``sparsecore.reference`` is under test
and never used as the oracle.

Top-k is checked by set and threshold, never by index equality (ties). Caches are NaN past every
length, so a read out of bounds shows up as NaN.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore import TopKIndex
from tests._util import as_f64, assert_close, backend_takes, host_backend_params
from tests.strategies_decode import (
    EDGE_CASES,
    PAGE_SIZES,
    DecodeCase,
    cdiv,
    decode_cases,
    expand_pages,
    full_rows,
    index_from_rows,
    random_rows,
    scales,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
Rows = list[list[np.ndarray]]


@pytest.fixture(scope="module", autouse=True, params=host_backend_params(variants={"numba_cpu": ("parallel",)}))
def _host_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs once per host backend, forced through SPARSECORE_BACKEND (so the ops are
    called exactly as users call them). Small calls run numba_cpu's serial launchers;
    ``numba_cpu:parallel`` makes every call take the parallel (prange) launchers instead."""
    before = os.environ.get("SPARSECORE_BACKEND")
    backend, _, variant = request.param.partition(":")
    os.environ["SPARSECORE_BACKEND"] = backend
    mp = pytest.MonkeyPatch()
    if variant == "parallel":
        import sparsecore.backends.numba_cpu as numba_cpu

        mp.setattr(numba_cpu, "PARALLEL_MIN_WORK", 0)
    from sparsecore.ops import dispatcher

    dispatcher._PLANS.clear()  # a signature's plan keeps the runner made under the other setting
    yield request.param
    mp.undo()
    dispatcher._PLANS.clear()
    if before is None:
        del os.environ["SPARSECORE_BACKEND"]
    else:
        os.environ["SPARSECORE_BACKEND"] = before


def needs(dtype: str) -> None:
    """Set this example aside (with its reason) when the backend under test does not take ``dtype``."""
    backend_takes(os.environ["SPARSECORE_BACKEND"], dtype)


# --- the oracle: plain float64 softmax attention --------------------------------------------------------

def plain_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """``q[D]``, ``keys, values[T, D]`` float64; attention over nothing is (0, -inf)."""
    if keys.shape[0] == 0:
        return np.zeros(q.shape[0]), -np.inf
    s = np.array([scale * float(np.dot(kt, q)) for kt in keys])
    m = s.max()
    w = np.exp(s - m)
    return (w[:, None] * values).sum(axis=0) / w.sum(), m + np.log(w.sum())


def expected_decode(case: DecodeCase, tokens: Callable[[int, int], np.ndarray], scale: float | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``tokens(b, h)``: the positions query head ``h`` of sequence ``b`` attends to."""
    sc_ = 1.0 / np.sqrt(case.head_dim) if scale is None else scale
    out = np.zeros((case.batch, case.hq, case.head_dim))
    lse = np.zeros((case.batch, case.hq))
    for b in range(case.batch):
        for h in range(case.hq):
            kvh = h // case.group  # GQA: query head h reads KV head h // (Hq / Hkv)
            t = np.asarray(tokens(b, h), dtype=np.int64)
            out[b, h], lse[b, h] = plain_attention(case.q64[b, h], case.keys[b][t, kvh], case.values[b][t, kvh], sc_)
    return out, lse


def rows_tokens(case: DecodeCase, rows: Rows, page_size: int | None) -> Callable[[int, int], np.ndarray]:
    groups = len(rows[0])

    def tokens(b: int, h: int) -> np.ndarray:
        g = h // case.group if groups == case.hkv else h
        return expand_pages(rows[b][g], page_size, int(case.lengths[b]))

    return tokens


def lse_dtype(dtype: str) -> str:
    """lse is float32 whatever the value dtype; compare it at float32 precision or the value dtype's."""
    return "float32" if dtype in ("float64", "float32") else dtype


def assert_attention(actual: tuple, expected: tuple, dtype: str, what: str, scale: object = None) -> None:
    out, lse = actual
    assert as_f64(out).shape == expected[0].shape, what
    assert_close(out, expected[0], dtype, what=f"{what}: out", scale=scale)
    assert_close(lse, expected[1], lse_dtype(dtype), what=f"{what}: lse")


def check_outputs_types(case: DecodeCase, res: tuple) -> None:
    out, lse = res
    assert isinstance(out, np.ndarray) and out.dtype == case.q.dtype, (type(out), getattr(out, "dtype", None))
    assert out.shape == case.q.shape
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == case.q.shape[:2]


def make_index(case: DecodeCase, rows: Rows, page_size: int | None, k_max: int | None = None) -> TopKIndex:
    return index_from_rows(rows, k_max=k_max, granularity="token" if page_size is None else "page",
                           page_size=page_size)


def index_page_size(case: DecodeCase, rng: np.random.Generator, granularity: str) -> int | None:
    """Page-granular selections use the paged cache's page size, or any size over a dense cache."""
    if granularity == "token":
        return None
    return case.kv.page_size if case.paged else int(rng.choice(PAGE_SIZES))


# --- properties (shared by the drawn and the named cases) -----------------------------------------------

def check_dense(case: DecodeCase, scale: float | None) -> None:
    needs(case.dtype)
    exp = expected_decode(case, lambda b, h: np.arange(case.lengths[b]), scale)
    res = sc.dense_decode(case.q, case.kv, scale=scale)
    check_outputs_types(case, res)
    assert_attention(res, exp, case.dtype, f"dense_decode {case!r}")
    res_dense = sc.dense_decode(case.q, case.dense, scale=scale)
    assert_attention(res_dense, exp, case.dtype, f"dense_decode (dense copy) {case!r}")
    # paged and dense versions of one cache agree with each other
    assert_attention(res, (as_f64(res_dense[0]), as_f64(res_dense[1])), case.dtype, f"paged vs dense {case!r}")
    empty = case.lengths == 0
    assert (as_f64(res[0])[empty] == 0).all() and np.isneginf(res[1][empty]).all()


def check_sparse_full(case: DecodeCase, rng: np.random.Generator, scale: float | None) -> None:
    needs(case.dtype)
    dense = sc.dense_decode(case.q, case.kv, scale=scale)
    dense64 = (as_f64(dense[0]), as_f64(dense[1]))
    for granularity in ("token", "page"):
        ps = index_page_size(case, rng, granularity)
        for groups in (case.hkv, case.hq):
            rows = [[rng.permutation(r) for r in rr] for rr in full_rows(case, groups=groups, page_size=ps)]
            idx = make_index(case, rows, ps, k_max=int(rng.integers(0, 3)) + max(len(r) for r in rows[0]))
            for kv in (case.kv, case.dense):
                res = sc.sparse_decode(case.q, kv, idx, scale=scale)
                check_outputs_types(case, res)
                assert_attention(res, dense64, case.dtype,
                                 f"sparse_decode all {granularity}s G={groups} page_size={ps} {case!r}")


def check_sparse_subset(case: DecodeCase, rng: np.random.Generator, scale: float | None, p: float) -> None:
    needs(case.dtype)
    for granularity in ("token", "page"):
        ps = index_page_size(case, rng, granularity)
        for groups in (case.hkv, case.hq):
            rows = random_rows(case, rng, groups=groups, page_size=ps, p=p)
            idx = make_index(case, rows, ps, k_max=int(rng.integers(0, 3)) + max(len(r) for rr in rows for r in rr))
            exp = expected_decode(case, rows_tokens(case, rows, ps), scale)
            what = f"sparse_decode subset {granularity} G={groups} page_size={ps} rows={rows} {case!r}"
            res = sc.sparse_decode(case.q, case.kv, idx, scale=scale)
            check_outputs_types(case, res)
            assert_attention(res, exp, case.dtype, what)
            # the order of indices within a row does not matter
            perm = [[rng.permutation(r) for r in rr] for rr in rows]
            res_p = sc.sparse_decode(case.q, case.dense, make_index(case, perm, ps), scale=scale)
            assert_attention(res_p, exp, case.dtype, f"permuted {what}")


def check_shared_vs_per_head(case: DecodeCase, rng: np.random.Generator, scale: float | None) -> None:
    needs(case.dtype)
    for granularity in ("token", "page"):
        ps = index_page_size(case, rng, granularity)
        rows = random_rows(case, rng, groups=case.hkv, page_size=ps, p=0.5)
        per_head = [[rr[h // case.group] for h in range(case.hq)] for rr in rows]
        shared = sc.sparse_decode(case.q, case.kv, make_index(case, rows, ps), scale=scale)
        each = sc.sparse_decode(case.q, case.kv, make_index(case, per_head, ps), scale=scale)
        what = f"shared vs per-head {granularity} page_size={ps} rows={rows} {case!r}"
        assert_attention(each, (as_f64(shared[0]), as_f64(shared[1])), case.dtype, what)
        assert_attention(shared, expected_decode(case, rows_tokens(case, rows, ps), scale), case.dtype, what)


def merge_dtype(dtype: str) -> str:
    """Partials carry a float32 lse, so a merge is at best float32-accurate."""
    return lse_dtype(dtype)


def check_merge_halves(case: DecodeCase, rng: np.random.Generator, scale: float | None) -> None:
    needs(case.dtype)
    for groups in (case.hkv, case.hq):
        ps = index_page_size(case, rng, str(rng.choice(["token", "page"])))
        rows = random_rows(case, rng, groups=groups, page_size=ps, p=0.7)
        masks = [[rng.random(len(r)) < 0.5 for r in rr] for rr in rows]
        rows_a = [[r[m] for r, m in zip(rr, mm)] for rr, mm in zip(rows, masks)]
        rows_b = [[r[~m] for r, m in zip(rr, mm)] for rr, mm in zip(rows, masks)]
        o1, l1 = sc.sparse_decode(case.q, case.kv, make_index(case, rows_a, ps), scale=scale)
        o2, l2 = sc.sparse_decode(case.q, case.kv, make_index(case, rows_b, ps), scale=scale)
        whole = sc.sparse_decode(case.q, case.kv, make_index(case, rows, ps), scale=scale)
        merged = sc.merge_attention(o1, l1, o2, l2)
        assert merged[0].dtype == o1.dtype and merged[1].dtype == np.float32
        mag = np.maximum(np.abs(as_f64(o1)), np.abs(as_f64(o2)))
        what = f"merge of halves G={groups} page_size={ps} {case!r}"
        assert_attention(merged, (as_f64(whole[0]), as_f64(whole[1])), merge_dtype(case.dtype), what, scale=mag)
        exp = expected_decode(case, rows_tokens(case, rows, ps), scale)
        assert_attention(merged, exp, merge_dtype(case.dtype), f"{what} vs plain", scale=np.maximum(mag, 1.0))
        # merging with an empty partial is the identity, on either side
        zero, ninf = np.zeros_like(o1), np.full_like(l1, -np.inf)
        for res in (sc.merge_attention(o1, l1, zero, ninf), sc.merge_attention(zero, ninf, o1, l1)):
            assert np.array_equal(as_f64(res[0]), as_f64(o1)), what
            assert np.array_equal(res[1], l1), what


# --- select_topk: set and threshold --------------------------------------------------------------------

def forced_tokens(length: int, sink: int, window: int) -> set[int]:
    return set(range(min(sink, length))) | set(range(max(length - window, 0), length))


def unit_scores(case: DecodeCase, b: int, page_size: int | None) -> np.ndarray:
    """``[Hq, units]``: q . k per token (exact), or the Quest bound per page, in float64. For Quest also
    checks that the bound really bounds every score of its page."""
    keys, q = case.keys[b], case.q64[b]
    n = keys.shape[0]
    tok = np.array([[float(np.dot(q[h], keys[t, h // case.group])) for t in range(n)] for h in range(case.hq)])
    tok = tok.reshape(case.hq, n)
    if page_size is None:
        return tok
    n_pages = cdiv(n, page_size)
    bound = np.zeros((case.hq, n_pages))
    for j in range(n_pages):
        page = keys[j * page_size:(j + 1) * page_size]
        lo, hi = page.min(axis=0), page.max(axis=0)  # [Hkv, D]
        for h in range(case.hq):
            kvh = h // case.group
            bound[h, j] = np.maximum(q[h] * lo[kvh], q[h] * hi[kvh]).sum()
            true_max = tok[h, j * page_size:(j + 1) * page_size].max()
            assert bound[h, j] >= true_max - 1e-9 * (1 + abs(true_max)), (h, j, bound[h, j], true_max)
    return bound


def check_topk(case: DecodeCase, idx: TopKIndex, *, k: int, method: str, sink: int, window: int, shared: bool,
               page_size: int | None, kv_name: str = "kv") -> None:
    what = (f"select_topk(k={k}, method={method!r}, sink={sink}, window={window}, shared={shared}, "
            f"page_size={page_size}) on {kv_name} of {case!r}")
    assert isinstance(idx, TopKIndex), what
    ind, cnt = np.asarray(as_f64(idx.indices)).astype(np.int64), np.asarray(as_f64(idx.counts)).astype(np.int64)
    groups = case.hkv if shared else case.hq
    assert ind.shape[:2] == (case.batch, groups) and cnt.shape == (case.batch, groups), (ind.shape, what)
    if method == "quest":
        ps = page_size if page_size is not None else (case.kv.page_size if case.paged else 16)
        assert idx.granularity == "page" and idx.page_size == ps, (idx.granularity, idx.page_size, what)
    else:
        ps = None
        assert idx.granularity == "token", what
    for b in range(case.batch):
        n = int(case.lengths[b])
        units = n if ps is None else cdiv(n, ps)
        # a page selection always keeps the page being written (the newest token's), as if window >= 1
        forced = forced_tokens(n, sink, window if ps is None else max(window, 1))
        forced = forced if ps is None else {t // ps for t in forced}
        s = unit_scores(case, b, ps)
        if shared:
            s = s.reshape(case.hkv, case.group, units).sum(axis=1)
        tol = 1e-9 * (1 + (np.abs(s).max() if s.size else 0.0))
        for g in range(groups):
            c = int(cnt[b, g])
            row = ind[b, g, :c].tolist()
            at = f"row [{b}, {g}] = {row} (length {n}, {units} units): {what}"
            assert (ind[b, g, c:] == -1).all(), f"padding not -1 in {at}"
            assert c == min(units, len(forced) + k), f"count {c} != min({units}, {len(forced)} + {k}) in {at}"
            assert len(set(row)) == c, f"duplicates in {at}"
            assert all(0 <= i < units for i in row), f"index out of range in {at}"
            chosen = set(row)
            assert forced <= chosen, f"forced {sorted(forced - chosen)} missing in {at}"
            if ps is not None and n > 0:
                assert (n - 1) // ps in chosen, f"the newest token's page {(n - 1) // ps} missing in {at}"
            free = sorted(chosen - forced)
            left = sorted(set(range(units)) - chosen)
            if free and left:
                worst_in, best_out = s[g, free].min(), s[g, left].max()
                assert worst_in >= best_out - tol, (f"chosen score {worst_in} < unchosen {best_out} in {at}; "
                                                    f"scores {s[g].tolist()}")


@st.composite
def topk_args(draw: st.DrawFn, case: DecodeCase, method: str) -> dict:
    if method == "quest":
        # mostly small pages: several candidate pages per sequence, so the ranking is really tested
        page_size = draw(st.sampled_from([None, 1, 2, 2, 3, 4, 8]))
        ps = page_size if page_size is not None else (case.kv.page_size if case.paged else 16)
        cap = cdiv(case.kv.max_len, ps)
    else:
        page_size, cap = None, case.kv.max_len
    # mostly a k well below the candidate count (where a wrong ranking shows), sometimes anything
    k = draw(st.one_of(st.integers(0, min(cap, 4)), st.integers(0, cap),
                       st.sampled_from([0, min(cap, int(case.lengths.max()))])))
    return dict(k=k, method=method, sink=draw(st.integers(0, 4)), window=draw(st.integers(0, 6)),
                shared=draw(st.booleans()), page_size=page_size)


def run_topk(case: DecodeCase, args: dict) -> None:
    needs(case.dtype)
    idx = sc.select_topk(case.q, case.kv, **args)
    check_topk(case, idx, **args)
    if case.paged:  # the dense copy of the cache, told the paged cache's page size for Quest
        dargs = dict(args)
        if args["method"] == "quest" and args["page_size"] is None:
            dargs["page_size"] = case.kv.page_size
        check_topk(case, sc.select_topk(case.q, case.dense, **dargs), **dargs, kv_name="dense copy")


# --- select_topk with an adaptive budget (top_p): the mass it keeps -----------------------------------

def attention_mass(case: DecodeCase, b: int, scale: float, shared: bool, int8: bool = False) -> np.ndarray:
    """``[G, L]``: each query head's softmax of its scaled scores over the sequence, averaged over the
    query heads of a KV group when shared; float64 from the stored values (``int8``: of the keys'
    int8 copy), written out here."""
    tok = (int8_scores(case, b) if int8 else unit_scores(case, b, None)) * scale  # [Hq, L]
    tok = np.where(np.isnan(tok), -np.inf, tok)  # a NaN score (an int8 key with a NaN scale) has no mass
    mass = np.zeros_like(tok)
    for h in range(case.hq):
        if tok.shape[1]:
            w = np.exp(tok[h] - tok[h].max())
            mass[h] = w / w.sum()
    return mass.reshape(case.hkv, case.group, -1).mean(axis=1) if shared else mass


def int8_scores(case: DecodeCase, b: int) -> np.ndarray:
    """``[Hq, L]``: q . k over the int8 copy of the keys (``int8_keys``), float64."""
    keys, q = int8_keys(case.keys[b]), case.q64[b]
    return np.array([[float(np.dot(q[h], keys[t, h // case.group])) for t in range(keys.shape[0])]
                     for h in range(case.hq)]).reshape(case.hq, keys.shape[0])


def pool_mass(case: DecodeCase, b: int, g: int, units: list[int], scale: float, shared: bool,
              int8: bool = False, tail: int = 16) -> np.ndarray:
    """``[L]``: the mass ranking's mass of row ``(b, g)``: each query head's softmax of its scaled
    scores over ``units`` and every ``tail``-th other token, each of those counted ``tail`` times (0
    outside ``units``), averaged over the group's heads when shared."""
    tok = (int8_scores(case, b) if int8 else unit_scores(case, b, None)) * scale
    tok = np.where(np.isnan(tok), -np.inf, tok)
    heads = range(g * case.group, (g + 1) * case.group) if shared else [g]
    sample = [t for t in range(0, tok.shape[1], tail) if t not in set(units)] if tail else []
    mass = np.zeros(tok.shape[1])
    for h in heads:
        x, xs = tok[h, units], tok[h, sample]
        top = max(x.max() if len(units) else -np.inf, xs.max() if sample else -np.inf)
        if top > -np.inf:
            w, ws = np.exp(x - top), np.exp(xs - top)
            mass[units] += w / (w.sum() + tail * ws.sum()) / len(heads)
    return mass


def check_top_p(case: DecodeCase, idx: TopKIndex, *, k: int, k_min: int, top_p: float, sink: int, window: int,
                shared: bool, scale: float | None, kv_name: str = "kv", int8: bool = False,
                pool: TopKIndex | None = None, tail_sample: int | None = None) -> None:
    """The adaptive budget by its properties: forced kept; ``k_min <= chosen <= k`` (as the candidates
    allow); kept mass >= top_p unless ``k`` are chosen; no chosen key could be dropped with the mass
    still >= top_p (the fewest), unless ``k_min`` asks for it; chosen by mass (threshold). With
    ``pool`` (``candidates``: the fixed-k selection of ``candidates`` units by the same method), the
    mass is each head's softmax over the pool's units and every ``tail_sample``-th other key (16 when
    None): the same properties within the pool (``top_p = inf``: a fixed k ranked by mass)."""
    what = (f"select_topk(k={k}, top_p={top_p}, k_min={k_min}, sink={sink}, window={window}, shared={shared}, "
            f"scale={scale}, pool={pool is not None}, tail_sample={tail_sample}) on {kv_name} of {case!r}")
    assert isinstance(idx, TopKIndex) and idx.granularity == "token", what
    ind, cnt = np.asarray(as_f64(idx.indices)).astype(np.int64), np.asarray(as_f64(idx.counts)).astype(np.int64)
    groups = case.hkv if shared else case.hq
    assert ind.shape == (case.batch, groups, min(k + sink + window, case.kv.max_len)), (ind.shape, what)
    sc_ = 1.0 / np.sqrt(case.head_dim) if scale is None else scale
    for b in range(case.batch):
        n = int(case.lengths[b])
        forced = forced_tokens(n, sink, window)
        mass = attention_mass(case, b, sc_, shared, int8)
        # float32 scores in the kernels: a mass is known to about this much (more for large scores)
        scores = int8_scores(case, b) if int8 else unit_scores(case, b, None)
        finite = np.abs(scores[np.isfinite(scores)]) * sc_
        tol = 1e-5 * (1 + (finite.max() if finite.size else 0.0)) if n else 0.0
        for g in range(groups):
            c = int(cnt[b, g])
            row = ind[b, g, :c].tolist()
            at = f"row [{b}, {g}] = {row} (length {n}): {what}"
            assert (ind[b, g, c:] == -1).all(), f"padding not -1 in {at}"
            assert len(set(row)) == c and all(0 <= t < n for t in row), f"duplicate or out of range in {at}"
            chosen = set(row)
            assert forced <= chosen, f"forced {sorted(forced - chosen)} missing in {at}"
            universe = set(range(n))
            row_mass = mass[g]
            if pool is not None:  # the candidates: the pool's row; the mass: over them and a sample
                pc = int(np.asarray(as_f64(pool.counts))[b, g])
                universe = set(np.asarray(as_f64(pool.indices))[b, g, :pc].astype(np.int64).tolist())
                assert chosen <= universe, f"{sorted(chosen - universe)} chosen outside the candidates in {at}"
                row_mass = pool_mass(case, b, g, sorted(universe), sc_, shared, int8,
                                     16 if tail_sample is None else tail_sample)
            free = sorted(chosen - forced)
            left = sorted(universe - chosen)
            cands = min(len(universe), n) - len(forced)
            assert min(k_min, cands) <= len(free) <= min(k, cands), f"{len(free)} chosen outside [k_min, k] in {at}"
            kept = row_mass[sorted(chosen)].sum()
            assert kept >= top_p - tol or len(free) == min(k, cands), f"mass {kept} < top_p with room left in {at}"
            if len(free) > k_min:
                weakest = row_mass[free].min()
                assert kept - weakest < top_p + tol, f"mass {kept} without {weakest} still >= top_p in {at}"
            if free and left:
                assert row_mass[free].min() >= row_mass[left].max() - tol, f"not chosen by mass in {at}"


@st.composite
def top_p_args(draw: st.DrawFn, case: DecodeCase) -> dict:
    cap = case.kv.max_len
    k = draw(st.one_of(st.integers(0, min(cap, 6)), st.integers(0, cap)))
    return dict(k=k, k_min=draw(st.integers(0, k)), top_p=draw(st.sampled_from([0.05, 0.3, 0.5, 0.9, 0.99, 1.0])),
                sink=draw(st.integers(0, 3)), window=draw(st.integers(0, 4)), shared=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.25, 1.0, 3.0])))


def run_top_p(case: DecodeCase, args: dict, int8: bool = False, candidates: int = 0,
              tail_sample: int | None = None) -> None:
    needs(case.dtype)
    for kv, name in ((case.kv, "kv"), (case.dense, "dense copy")) if case.paged else ((case.kv, "kv"),):
        codes = dict(method="int8", codes=sc.quantize_keys(kv)) if int8 else {}
        pool = None
        if candidates:  # the candidates: the method's fixed-k selection of that many
            fixed = {a: v for a, v in args.items() if a not in ("top_p", "k_min", "scale", "k")}
            pool = sc.select_topk(case.q, kv, candidates, **codes, **fixed)
            codes.update(candidates=candidates, tail_sample=tail_sample)
        got = sc.select_topk(case.q, kv, **codes, **args)
        # a fixed k ranked by mass: as if top_p were never reached
        props = dict(args, top_p=math.inf, k_min=0) if args.get("top_p") is None else args
        check_top_p(case, got, **props, kv_name=name, int8=int8, pool=pool, tail_sample=tail_sample)


# --- select_topk(method="int8"): ranking over the int8 copy of the keys ----------------------------------

def int8_keys(keys: np.ndarray) -> np.ndarray:
    """What quantize_keys means, written out: ``[L, Hkv, D]`` float64 of codes * scale."""
    amax = np.abs(keys).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32).astype(np.float64)
    return np.clip(np.rint(keys / scale), -127, 127) * scale


def check_int8(case: DecodeCase, idx: TopKIndex, *, k: int, rescore: int, sink: int, window: int, shared: bool,
               kv_name: str = "kv") -> None:
    """Forced kept, ``min(units, forced + k)`` keys, the free ones the best by the int8 scores (or,
    with ``rescore > k``, the best by the exact scores among a pool that is the best by the int8 ones)."""
    what = f"select_topk(k={k}, method='int8', rescore={rescore}, sink={sink}, window={window}, " \
           f"shared={shared}) on {kv_name} of {case!r}"
    ind, cnt = np.asarray(as_f64(idx.indices)).astype(np.int64), np.asarray(as_f64(idx.counts)).astype(np.int64)
    groups = case.hkv if shared else case.hq
    assert idx.granularity == "token" and ind.shape[:2] == (case.batch, groups), what
    for b in range(case.batch):
        n = int(case.lengths[b])
        forced = forced_tokens(n, sink, window)
        qk = int8_keys(case.keys[b])
        approx = np.array([[float(np.dot(case.q64[b, h], qk[t, h // case.group])) for t in range(n)]
                           for h in range(case.hq)]).reshape(case.hq, n)
        exact = unit_scores(case, b, None)
        if shared:
            approx = approx.reshape(case.hkv, case.group, n).sum(axis=1)
            exact = exact.reshape(case.hkv, case.group, n).sum(axis=1)
        tol = 1e-5 * (1 + (np.abs(exact).max() if exact.size else 0.0))
        for g in range(groups):
            c = int(cnt[b, g])
            row = ind[b, g, :c].tolist()
            at = f"row [{b}, {g}] = {row} (length {n}): {what}"
            assert (ind[b, g, c:] == -1).all() and len(set(row)) == c, f"padding or duplicates in {at}"
            assert c == min(n, len(forced) + k), f"count {c} in {at}"
            chosen = set(row)
            assert forced <= chosen and all(0 <= t < n for t in row), f"forced missing or out of range in {at}"
            free = sorted(chosen - forced)
            left = sorted(set(range(n)) - chosen)
            if not (free and left):
                continue
            if rescore <= k:
                assert approx[g, free].min() >= approx[g, left].max() - tol, f"not the int8 top-k in {at}"
                continue
            cands = sorted(set(range(n)) - forced)
            pool_thr = np.sort(approx[g, cands])[::-1][min(rescore, len(cands)) - 1]
            assert approx[g, free].min() >= pool_thr - tol, f"a chosen key outside the int8 pool in {at}"
            sure = [t for t in left if approx[g, t] > pool_thr + tol]  # certainly in the pool
            if sure:
                assert exact[g, free].min() >= exact[g, sure].max() - tol, f"pool not re-ranked exactly in {at}"


@st.composite
def int8_args(draw: st.DrawFn, case: DecodeCase) -> dict:
    cap = case.kv.max_len
    k = draw(st.one_of(st.integers(0, min(cap, 4)), st.integers(0, cap)))
    rescore = draw(st.sampled_from([0, k, min(cap, k + 3), min(cap, 2 * k + 1), cap]))
    return dict(k=k, rescore=rescore if rescore >= k else 0, sink=draw(st.integers(0, 3)),
                window=draw(st.integers(0, 4)), shared=draw(st.booleans()))


def run_int8(case: DecodeCase, args: dict) -> None:
    needs(case.dtype)
    codes = sc.quantize_keys(case.kv)
    check_int8(case, sc.select_topk(case.q, case.kv, method="int8", codes=codes, **args), **args)
    if case.paged:  # the same logical tokens: the same codes
        dcodes = sc.quantize_keys(case.dense)
        check_int8(case, sc.select_topk(case.q, case.dense, method="int8", codes=dcodes, **args), **args,
                   kv_name="dense copy")


# --- drawn cases ---------------------------------------------------------------------------------------

@given(case=decode_cases(), scale=scales())
def test_dense_decode_matches_plain_softmax(case: DecodeCase, scale: float | None) -> None:
    check_dense(case, scale)


@given(case=decode_cases(), scale=scales(), seed=st.integers(0, 2**32 - 1))
def test_sparse_decode_every_key_equals_dense(case: DecodeCase, scale: float | None, seed: int) -> None:
    check_sparse_full(case, np.random.default_rng(seed), scale)


@given(case=decode_cases(), scale=scales(), seed=st.integers(0, 2**32 - 1), p=st.sampled_from([0.1, 0.5, 0.9]))
def test_sparse_decode_subset_matches_plain_softmax(case: DecodeCase, scale: float | None, seed: int,
                                                    p: float) -> None:
    check_sparse_subset(case, np.random.default_rng(seed), scale, p)


@given(case=decode_cases(), scale=scales(), seed=st.integers(0, 2**32 - 1))
def test_sparse_decode_shared_equals_per_head(case: DecodeCase, scale: float | None, seed: int) -> None:
    check_shared_vs_per_head(case, np.random.default_rng(seed), scale)


@given(case=decode_cases(), scale=scales(), seed=st.integers(0, 2**32 - 1))
def test_merge_of_disjoint_halves_equals_whole(case: DecodeCase, scale: float | None, seed: int) -> None:
    check_merge_halves(case, np.random.default_rng(seed), scale)


@given(case=decode_cases(), data=st.data())
def test_select_topk_exact(case: DecodeCase, data: st.DataObject) -> None:
    run_topk(case, data.draw(topk_args(case, "exact")))


@given(case=decode_cases(), data=st.data())
def test_select_topk_quest(case: DecodeCase, data: st.DataObject) -> None:
    run_topk(case, data.draw(topk_args(case, "quest")))


@given(case=decode_cases(grid=True), data=st.data())
def test_select_topk_ties(case: DecodeCase, data: st.DataObject) -> None:
    """Grid values: exact float64 scores and many ties; any tie break is right."""
    run_topk(case, data.draw(topk_args(case, data.draw(st.sampled_from(["exact", "quest"])))))


@given(case=decode_cases(), data=st.data())
def test_select_topk_top_p(case: DecodeCase, data: st.DataObject) -> None:
    run_top_p(case, data.draw(top_p_args(case)))


@given(case=decode_cases(grid=True), data=st.data())
def test_select_topk_top_p_ties(case: DecodeCase, data: st.DataObject) -> None:
    run_top_p(case, data.draw(top_p_args(case)))


@given(case=decode_cases(), data=st.data())
def test_select_topk_int8_top_p(case: DecodeCase, data: st.DataObject) -> None:
    """The adaptive budget over the int8 scores: the same properties, with the mass of the int8 keys."""
    run_top_p(case, data.draw(top_p_args(case)), int8=True)


TAIL_SAMPLES = st.sampled_from([None, 0, 1, 2, 3, 16])


@st.composite
def candidates_args(draw: st.DrawFn, case: DecodeCase) -> tuple[dict, int]:
    """``(select_topk args, candidates)``: the adaptive budget or (top_p None) a fixed k, and
    ``k <= candidates <= max_len``."""
    args = draw(top_p_args(case))
    if draw(st.booleans()):
        args = dict(args, top_p=None, k_min=0)
    return args, draw(st.integers(max(args["k"], 1), case.kv.max_len))


@given(case=decode_cases(), data=st.data(), int8=st.booleans(), tail=TAIL_SAMPLES)
def test_select_topk_candidates(case: DecodeCase, data: st.DataObject, int8: bool, tail: int | None) -> None:
    """Mass ranking over candidates (select-then-prune): within the method's fixed-k selection of
    ``candidates`` units, the adaptive budget's properties (or a fixed k's, ranked by mass) with each
    head's softmax over the candidates and a sample of the other keys; exact and int8 scores."""
    args, c = data.draw(candidates_args(case))
    run_top_p(case, args, int8=int8, candidates=c, tail_sample=tail)


@given(case=decode_cases(grid=True), data=st.data(), tail=TAIL_SAMPLES)
def test_select_topk_candidates_ties(case: DecodeCase, data: st.DataObject, tail: int | None) -> None:
    args, c = data.draw(candidates_args(case))
    run_top_p(case, args, candidates=c, tail_sample=tail)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_select_topk_top_p_edge_cases(name: str) -> None:
    case = EDGE_CASES[name]("float32")
    longest = int(case.lengths.max())
    for k in sorted({0, 1, longest}):
        for k_min in sorted({0, k}):
            for top_p in (0.5, 1.0):
                for sink, window in ((0, 0), (1, 2)):
                    for shared in (True, False):
                        for c in sorted({0, max(k, 1), max(longest, 1)}):
                            run_top_p(case, dict(k=k, k_min=k_min, top_p=top_p, sink=sink, window=window,
                                                 shared=shared, scale=None), candidates=c)


def test_select_topk_top_p_one_dominant_key_keeps_one() -> None:
    """A key that holds nearly all the mass is enough at top_p = 0.9; top_p = 1.0 keeps k."""
    rng = np.random.default_rng(3)
    k = rng.standard_normal((1, 32, 1, 8)).astype(np.float32)
    q = np.zeros((1, 2, 8), np.float32)
    q[0, :, 0] = 40.0
    k[0, :, 0, 0] = 0.0
    k[0, 17, 0, 0] = 2.0
    kv = sc.DenseKV(k, k.copy(), np.array([32], np.int32))
    idx = sc.select_topk(q, kv, 8, top_p=0.9)
    assert idx.counts.tolist() == [[1]] and idx.indices[0, 0, 0] == 17 and idx.k_max == 8
    assert sc.select_topk(q, kv, 8, top_p=1.0).counts.tolist() == [[8]]
    assert sc.select_topk(q, kv, 8, top_p=0.9, k_min=3).counts.tolist() == [[3]]
    assert sc.select_topk(q, kv, 8, top_p=0.9, window=2).counts.tolist() == [[3]]


@given(case=decode_cases(), data=st.data())
def test_select_topk_int8(case: DecodeCase, data: st.DataObject) -> None:
    run_int8(case, data.draw(int8_args(case)))


@given(case=decode_cases(grid=True), data=st.data())
def test_select_topk_int8_ties(case: DecodeCase, data: st.DataObject) -> None:
    run_int8(case, data.draw(int8_args(case)))


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_select_topk_int8_edge_cases(name: str) -> None:
    case = EDGE_CASES[name]("float32")
    longest = int(case.lengths.max())
    for k in sorted({0, 1, longest}):
        for rescore in sorted({0, min(case.kv.max_len, k + 2)}):
            for sink, window in ((0, 0), (1, 2)):
                for shared in (True, False):
                    run_int8(case, dict(k=k, rescore=rescore if rescore > k else 0, sink=sink, window=window,
                                        shared=shared))


@given(case=decode_cases(), data=st.data())
def test_quantize_keys_codes_and_update_in_place(case: DecodeCase, data: st.DataObject) -> None:
    """codes * scale is each key within half a step; rewriting from ``start`` equals a fresh copy."""
    codes = sc.quantize_keys(case.kv)
    assert codes.codes.shape == (case.batch, case.kv.max_len, case.hkv, case.head_dim)
    for b in range(case.batch):
        n = int(case.lengths[b])
        got = codes.codes[b, :n].astype(np.float64) * codes.scales[b, :n, :, None].astype(np.float64)
        np.testing.assert_allclose(got, int8_keys(case.keys[b]), rtol=1e-6, atol=1e-30)
        step = codes.scales[b, :n].astype(np.float64)[..., None]
        assert (np.abs(got - case.keys[b]) <= 0.5 * step * (1 + 1e-6)).all()
    start = np.array([data.draw(st.integers(0, int(n))) for n in case.lengths], np.int32)
    stale = sc.KeyCodes(codes.codes.copy(), codes.scales.copy())
    for b in range(case.batch):
        stale.codes[b, start[b]:] = 7
        stale.scales[b, start[b]:] = -1.0
    again = sc.quantize_keys(case.kv, out=stale, start=start)
    assert again is stale
    for b in range(case.batch):
        n = int(case.lengths[b])
        np.testing.assert_array_equal(stale.codes[b, :n], codes.codes[b, :n])
        np.testing.assert_array_equal(stale.scales[b, :n], codes.scales[b, :n])


def test_quantize_keys_nonfinite_key_gets_a_nan_scale() -> None:
    k = np.ones((1, 4, 1, 3), np.float32)
    k[0, 1, 0, 2] = np.nan
    k[0, 2, 0, 0] = np.inf
    codes = sc.quantize_keys(sc.DenseKV(k, k, np.array([4], np.int32)))
    assert np.isnan(codes.scales[0, 1:3, 0]).all() and np.isfinite(codes.scales[0, [0, 3], 0]).all()
    assert (codes.codes[0, 1:3] == 0).all() and (codes.codes[0, 0, 0] == 127).all()
    q = np.ones((1, 1, 3), np.float32)
    idx = sc.select_topk(q, sc.DenseKV(k, k, np.array([4], np.int32)), 2, method="int8", codes=codes)
    assert set(idx.indices[0, 0].tolist()) == {0, 3}  # NaN scores rank last


def test_quantize_keys_compiled_pass_has_the_numpy_bits() -> None:
    """float32 keys of a DenseKV take one compiled pass (with numba); its codes and scales have the
    bits of the NumPy definition (``_quantize``) on exact ties (to even), zeros, tiny and huge keys,
    NaN and infinities, for a fresh copy and for an update from ``start``."""
    from sparsecore.formats import codes as C

    if C._compiled() is None:
        pytest.skip("numba is not installed: quantize_keys runs its NumPy passes only")
    rng = np.random.default_rng(5)
    k = rng.standard_normal((3, 40, 2, 16)).astype(np.float32)
    k[0, 1] = 0.0
    k[0, 2, 0, :] = np.arange(16) - 7.5  # amax 7.5: codes near halves of a step
    k[0, 3, 1, :] = np.arange(16) - 7.5  # with amax 127 below, the scale is 1: k / scale are exact ties
    k[0, 3, 1, 0] = 127.0
    k[1, 4, 0, 3] = np.nan
    k[1, 5, 1, 0] = -np.inf
    k[2, 6] = 1e-38
    k[2, 7] = 3e38
    lengths = np.array([40, 33, 12], np.int32)
    got = sc.quantize_keys(sc.DenseKV(k, k, lengths))
    for b in range(3):
        n = int(lengths[b])
        want_c, want_s = C._quantize(k[b, :n].astype(np.float64))
        np.testing.assert_array_equal(got.codes[b, :n], want_c)
        np.testing.assert_array_equal(got.scales[b, :n].view(np.int32), want_s.view(np.int32))  # NaN bits too
    stale = sc.KeyCodes(np.full_like(got.codes, 9), np.full_like(got.scales, -2.0))
    start = np.array([39, 0, 12], np.int32)
    sc.quantize_keys(sc.DenseKV(k, k, lengths), out=stale, start=start)
    for b in range(3):
        n = int(lengths[b])
        np.testing.assert_array_equal(stale.codes[b, start[b]:n], got.codes[b, start[b]:n])
        assert (stale.codes[b, :start[b]] == 9).all()  # before start: untouched


# --- page_bounds: stored Quest metadata ---------------------------------------------------------------

def with_lengths(kv: sc.DenseKV | sc.PagedKV, lengths: np.ndarray) -> sc.DenseKV | sc.PagedKV:
    """The same buffers seen with other lengths (an earlier state of the cache)."""
    if isinstance(kv, sc.DenseKV):
        return sc.DenseKV(kv.k, kv.v, lengths)
    return sc.PagedKV(kv.k_pages, kv.v_pages, kv.page_table, lengths)


def check_bounds(case: DecodeCase, bounds: sc.PageBounds, ps: int, what: str, *, fresh: bool) -> None:
    """Every page within a length: exactly the min/max of its keys (as stored); past it: 0 if fresh."""
    n_pages = cdiv(case.kv.max_len, ps)
    assert isinstance(bounds, sc.PageBounds) and bounds.page_size == ps, what
    assert bounds.dtype == case.dtype, (bounds.dtype, what)
    lo, hi = as_f64(bounds.kmin), as_f64(bounds.kmax)
    assert lo.shape == hi.shape == (case.batch, n_pages, case.hkv, case.head_dim), (lo.shape, what)
    for b in range(case.batch):
        keys = case.keys[b]
        used = cdiv(keys.shape[0], ps)
        for j in range(used):
            page = keys[j * ps:(j + 1) * ps]
            np.testing.assert_array_equal(lo[b, j], page.min(axis=0), err_msg=f"kmin[{b}, {j}] of {what}")
            np.testing.assert_array_equal(hi[b, j], page.max(axis=0), err_msg=f"kmax[{b}, {j}] of {what}")
        if fresh:
            assert not lo[b, used:].any() and not hi[b, used:].any(), f"pages past length {b} not 0 in {what}"


@given(case=decode_cases(), page_size=st.sampled_from([None, 1, 2, 3, 4, 8, 16]))
def test_page_bounds_are_the_min_and_max_of_each_page(case: DecodeCase, page_size: int | None) -> None:
    needs(case.dtype)
    ps = page_size if page_size is not None else (case.kv.page_size if case.paged else 16)
    check_bounds(case, sc.page_bounds(case.kv, page_size), ps, f"page_bounds(page_size={page_size}) of {case!r}",
                 fresh=True)


@given(case=decode_cases(), page_size=st.sampled_from([1, 2, 3, 8]), data=st.data())
def test_page_bounds_update_in_place_equals_fresh(case: DecodeCase, page_size: int, data: st.DataObject) -> None:
    """Bounds of an earlier, shorter state, updated from ``start`` = the old lengths, are the bounds of
    the grown cache; the update writes into ``out`` and returns it."""
    needs(case.dtype)
    old = np.array([data.draw(st.integers(0, int(n))) for n in case.lengths], np.int32)
    out = sc.page_bounds(with_lengths(case.kv, old), page_size)
    res = sc.page_bounds(case.kv, out=out, start=old)
    assert res is out
    check_bounds(case, out, page_size, f"page_bounds updated from lengths {old.tolist()} of {case!r}", fresh=False)


@given(case=decode_cases(), data=st.data())
def test_select_topk_quest_reads_stored_bounds(case: DecodeCase, data: st.DataObject) -> None:
    """``bounds=page_bounds(kv)`` gives the same selection as bounds computed on the fly, and it is
    right by the oracle."""
    needs(case.dtype)
    args = data.draw(topk_args(case, "quest"))
    ps = args["page_size"] if args["page_size"] is not None else (case.kv.page_size if case.paged else 16)
    bounds = sc.page_bounds(case.kv, ps)
    got = sc.select_topk(case.q, case.kv, **{**args, "page_size": None}, bounds=bounds)
    check_topk(case, got, **{**args, "page_size": ps})
    want = sc.select_topk(case.q, case.kv, **{**args, "page_size": ps})
    np.testing.assert_array_equal(np.asarray(got.counts), np.asarray(want.counts))
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))


@given(case=decode_cases(), method=st.sampled_from(["exact", "quest"]), shared=st.booleans(),
       sink=st.integers(0, 3), window=st.integers(0, 3))
def test_select_topk_k_at_capacity_selects_everything(case: DecodeCase, method: str, shared: bool, sink: int,
                                                     window: int) -> None:
    needs(case.dtype)
    ps = (case.kv.page_size if case.paged else 16) if method == "quest" else None
    k = case.kv.max_len if ps is None else cdiv(case.kv.max_len, ps)
    idx = sc.select_topk(case.q, case.kv, k, method=method, shared=shared, sink=sink, window=window)
    ind, cnt = np.asarray(idx.indices), np.asarray(idx.counts)
    for b, n in enumerate(case.lengths):
        units = int(n) if ps is None else cdiv(int(n), ps)
        for g in range(ind.shape[1]):
            assert sorted(ind[b, g, :cnt[b, g]].tolist()) == list(range(units)), (b, g, ind[b, g], case)
    # and attending over that selection is dense attention
    res = sc.sparse_decode(case.q, case.kv, idx)
    exp = expected_decode(case, lambda b, h: np.arange(case.lengths[b]), None)
    assert_attention(res, exp, case.dtype, f"sparse_decode over select_topk(k=capacity) {case!r}")


@given(o_shape=st.sampled_from([(1, 3), (2, 5), (2, 3, 4), (1, 1, 1, 2)]), dtype=st.sampled_from(
    ["float64", "float32", "float16", "bfloat16"]), lse64=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_merge_attention_matches_formula(o_shape: tuple, dtype: str, lse64: bool, seed: int) -> None:
    """Any partials: the lse-weighted mean, with -inf (empty) partials weighing nothing."""
    needs(dtype)
    rng = np.random.default_rng(seed)
    npd = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    o1 = rng.standard_normal(o_shape).astype(npd)
    o2 = rng.standard_normal(o_shape).astype(npd)
    ldt = np.float64 if lse64 else np.float32
    l1 = np.asarray(rng.standard_normal(o_shape[:-1]) * 4).astype(ldt)
    l2 = np.asarray(rng.standard_normal(o_shape[:-1]) * 4).astype(ldt)
    l1[rng.random(l1.shape) < 0.25] = -np.inf
    l2[rng.random(l2.shape) < 0.25] = -np.inf
    out, lse = sc.merge_attention(o1, l1, o2, l2)
    a, b = as_f64(o1), as_f64(o2)
    x, y = l1.astype(np.float64), l2.astype(np.float64)
    m = np.maximum(x, y)
    m0 = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(divide="ignore"):  # log(0) = -inf when both partials are empty
        exp_lse = m0 + np.log(np.exp(x - m0) + np.exp(y - m0))
    with np.errstate(invalid="ignore"):
        w1 = np.where(np.isneginf(x), 0.0, np.exp(x - exp_lse))
        w2 = np.where(np.isneginf(y), 0.0, np.exp(y - exp_lse))
    exp_out = a * w1[..., None] + b * w2[..., None]
    assert out.dtype == npd and out.shape == o_shape and lse.shape == o_shape[:-1]
    assert_close(lse, exp_lse, lse_dtype(dtype), what="merge lse")
    assert_close(out, exp_out, merge_dtype(dtype), what="merge out", scale=np.maximum(np.abs(a), np.abs(b)))
    both_empty = np.isneginf(x) & np.isneginf(y)
    assert (as_f64(out)[both_empty] == 0).all() and np.isneginf(lse[both_empty]).all()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_merge_attention_single_vector_keeps_array_kind(kind: str) -> None:
    o, lse = np.array([1.0, -2.0, 0.5], np.float32), np.array(0.25, np.float32)
    if kind == "torch":
        o, lse = torch.from_numpy(o), torch.from_numpy(lse)
    out, lse_m = sc.merge_attention(o, lse, o, np.full_like(lse, -np.inf) if kind == "numpy" else -torch.inf + lse)
    want = np.ndarray if kind == "numpy" else torch.Tensor
    assert isinstance(out, want) and isinstance(lse_m, want), (type(out), type(lse_m))
    assert tuple(lse_m.shape) == () and float(lse_m) == 0.25


# --- named edge cases, always run ----------------------------------------------------------------------

EDGE_DTYPES = ("float32", "bfloat16", "float64", "float16")


@pytest.mark.parametrize("dtype", EDGE_DTYPES)
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_decode_edge_cases(name: str, dtype: str) -> None:
    case = EDGE_CASES[name](dtype)
    rng = np.random.default_rng(7)
    for scale in (None, 0.5):
        check_dense(case, scale)
        check_sparse_full(case, rng, scale)
        check_sparse_subset(case, rng, scale, 0.5)
        check_shared_vs_per_head(case, rng, scale)
        check_merge_halves(case, rng, scale)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_select_topk_edge_cases(name: str) -> None:
    case = EDGE_CASES[name]("float32")
    longest = int(case.lengths.max())
    for method in ("exact", "quest"):
        page_sizes = [None] + ([] if case.paged or method == "exact" else [4])
        for page_size in page_sizes:
            ps = (case.kv.page_size if case.paged else 16) if method == "quest" else None
            ps = page_size if page_size is not None else ps
            length_k = longest if ps is None else cdiv(longest, ps)
            for k in sorted({0, 1, length_k}):  # k = 0, k = length (in units)
                for sink, window in ((0, 0), (1, 2), (2, 5), (0, 3)):
                    for shared in (True, False):
                        args = dict(k=k, method=method, sink=sink, window=window, shared=shared,
                                    page_size=page_size)
                        run_topk(case, args)


def test_empty_sequence_gives_zero_and_minus_inf() -> None:
    case = EDGE_CASES["all_empty"]("float32")
    out, lse = sc.dense_decode(case.q, case.kv)
    assert (out == 0).all() and np.isneginf(lse).all()
    idx = sc.select_topk(case.q, case.kv, 2, sink=1, window=1)
    assert (np.asarray(idx.counts) == 0).all()
    out, lse = sc.sparse_decode(case.q, case.kv, idx)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_sparse_decode_rejects_out_of_range_index_on_host() -> None:
    """An index past a length is caught before any NaN row is read."""
    case = EDGE_CASES["empty_sequence"]("float32")
    idx = index_from_rows([[np.array([0])] * case.hkv, [np.array([4, 5])] * case.hkv])
    with pytest.raises(ValueError, match="out of range"):
        sc.sparse_decode(case.q, case.kv, idx)


# --- torch CPU tensors in, torch tensors out -----------------------------------------------------------

def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == BF16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def assert_torch(x: object, dtype: torch.dtype, shape: tuple) -> None:
    assert isinstance(x, torch.Tensor), type(x)
    assert x.dtype == dtype and tuple(x.shape) == tuple(shape) and x.device.type == "cpu", (x.dtype, x.shape)


def check_torch(case: DecodeCase, rng: np.random.Generator, method: str, shared: bool) -> None:
    needs(case.dtype)
    tdt = TORCH_DTYPES[case.dtype]
    q, kv = to_torch(case.q), case.kv.map_arrays(to_torch)
    res_np = sc.dense_decode(case.q, case.kv)
    res_t = sc.dense_decode(q, kv)
    assert_torch(res_t[0], tdt, case.q.shape)
    assert_torch(res_t[1], torch.float32, case.q.shape[:2])
    assert_attention(res_t, (as_f64(res_np[0]), as_f64(res_np[1])), case.dtype, f"torch dense_decode {case!r}")

    cap = case.kv.max_len if method == "exact" else cdiv(case.kv.max_len, case.page_size or 16)
    args = dict(k=int(rng.integers(0, min(cap, 3) + 1)), method=method, sink=1, window=2, shared=shared, page_size=None)
    idx_t = sc.select_topk(q, kv, **args)
    assert isinstance(idx_t.indices, torch.Tensor) and idx_t.indices.dtype == torch.int32
    assert isinstance(idx_t.counts, torch.Tensor) and idx_t.counts.dtype == torch.int32
    check_topk(case, idx_t, **args, kv_name="torch kv")
    idx_np = sc.select_topk(case.q, case.kv, **args)
    assert torch.equal(idx_t.counts, torch.from_numpy(np.asarray(idx_np.counts)))

    res_t = sc.sparse_decode(q, kv, idx_t)
    assert_torch(res_t[0], tdt, case.q.shape)
    assert_torch(res_t[1], torch.float32, case.q.shape[:2])
    idx_back = idx_t.map_arrays(lambda t: t.numpy())
    exp = expected_decode(case, rows_tokens(case, [[idx_back.indices[b, g, :idx_back.counts[b, g]]
                                                    for g in range(idx_back.groups)]
                                                   for b in range(case.batch)], idx_back.page_size), None)
    assert_attention(res_t, exp, case.dtype, f"torch sparse_decode {case!r}")
    res_np = sc.sparse_decode(case.q, case.kv, idx_back)
    assert_attention(res_t, (as_f64(res_np[0]), as_f64(res_np[1])), case.dtype, f"torch vs numpy {case!r}")

    o1, l1 = res_t
    o2, l2 = sc.dense_decode(q, kv)
    merged = sc.merge_attention(o1, l1, o2, l2)
    assert_torch(merged[0], tdt, case.q.shape)
    assert_torch(merged[1], torch.float32, case.q.shape[:2])
    merged_np = sc.merge_attention(*(t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16
                                     else t.numpy() for t in (o1, l1, o2, l2)))
    assert_close(merged[0], merged_np[0], case.dtype, what="torch merge out")
    assert_close(merged[1], merged_np[1], "float32", what="torch merge lse")


@given(case=decode_cases(dtypes=("float32", "bfloat16")), seed=st.integers(0, 2**32 - 1),
       method=st.sampled_from(["exact", "quest"]), shared=st.booleans())
def test_torch_tensors_in_torch_tensors_out(case: DecodeCase, seed: int, method: str, shared: bool) -> None:
    check_torch(case, np.random.default_rng(seed), method, shared)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["empty_sequence", "shared_prefix", "not_multiple", "length_1"])
def test_torch_edge_cases(name: str, dtype: str) -> None:
    for method in ("exact", "quest"):
        for shared in (True, False):
            check_torch(EDGE_CASES[name](dtype), np.random.default_rng(3), method, shared)
