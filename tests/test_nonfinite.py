"""The non-finite contract (docs/ops.md, "NaN and infinity") on every host backend: NaN in, NaN out,
never a finite wrong number; and the other reliability guarantees of docs/reliability.md that need
no subprocess (pack's threshold, split counts independent of the core count, gradients refused).

The oracle of the decode and merge cases is the float64 loop code of ``tests/nonfinite.py``; the
reference is held to it, and every backend to the reference.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore.reference import attention as ref_attention
from tests._util import assert_close, backend_takes, host_backend_params
from tests.nonfinite import NP, POISONS, decode_case, indices_for, merge_case, oracle_decode, oracle_merge

BACKENDS = host_backend_params()
DTYPES = ("float32", "float16", "bfloat16")


def _check(got: tuple, want: tuple, dtype: str, what: str) -> None:
    """out within the dtype's tolerance, lse within float32's; NaN where expected and only there,
    infinities equal (assert_close's rules)."""
    assert_close(got[0], want[0], dtype, what=f"{what} out")
    assert_close(got[1], want[1], "float32" if dtype == "float32" else dtype, what=f"{what} lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("poison", list(POISONS))
def test_decode_follows_the_nonfinite_contract(backend: str, poison: str, paged: bool) -> None:
    for dtype in DTYPES:
        backend_takes(backend, dtype)
        q, kv = decode_case(poison, dtype, paged=paged)
        want = oracle_decode(q, kv, None, None)
        _check(sc.dense_decode(q, kv, backend=backend), want, dtype, f"{poison} dense_decode {dtype}")
        for groups in (kv.num_kv_heads, q.shape[1]):
            for ps in (None, 4):
                for keep in (1.0, 0.5):
                    index = indices_for(kv, groups=groups, page_size=ps, keep=keep, seed=groups)
                    want = oracle_decode(q, kv, index, 0.7)
                    _check(sc.sparse_decode(q, kv, index, scale=0.7, backend=backend), want, dtype,
                           f"{poison} sparse_decode {dtype} G={groups} page_size={ps} keep={keep}")


def test_the_named_cases_give_the_contracts_answers() -> None:
    """The contract spelt out on the reference, case by case (what docs/ops.md promises)."""
    def run(poison: str) -> tuple[np.ndarray, np.ndarray]:
        q, kv = decode_case(poison, "float32")
        return sc.dense_decode(q, kv, backend="reference")

    out, lse = run("nan-key")
    assert np.isnan(lse[0, :2]).all() and np.isnan(out[0, :2]).all() and np.isfinite(lse[0, 2:]).all()
    out, lse = run("nan-query")
    assert np.isnan(lse[1, 2]) and np.isnan(out[1, 2]).all() and np.isfinite(np.delete(lse.ravel(), 6)).all()
    out, lse = run("all-neg-inf")
    assert (lse[1, :2] == -np.inf).all() and (out[1, :2] == 0).all()
    out, lse = run("all-neg-inf-nan-value")
    assert (lse[1, :2] == -np.inf).all() and np.isnan(out[1, :2, 1]).all() and (out[1, :2, [0, 2]] == 0).all()
    out, lse = run("pos-inf-key")
    assert np.isnan(lse[0, :2]).all() and np.isnan(out[0, :2]).all()
    out, lse = run("neg-inf-key")
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    out, lse = run("neg-inf-key-nan-value")
    assert np.isnan(out[0, 2:, 5]).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", list(POISONS))
def test_top_p_selection_gives_nonfinite_scores_their_meaning(backend: str, poison: str) -> None:
    """select_topk(top_p=...): a NaN score carries no mass (ranks last), +inf keys share all of their
    head's mass, a head whose scores are all -inf or NaN carries none (the row then keeps up to k).
    Checked against the reference: the same counts, and the same keys wherever the mass is not a
    tie at 0 (which key of equal mass is kept is free)."""
    for dtype in DTYPES:
        backend_takes(backend, dtype)
        q, kv = decode_case(poison, dtype)
        for shared in (True, False):
            args = dict(k=9, k_min=1, top_p=0.8, sink=1, window=2, shared=shared)
            want = sc.select_topk(q, kv, **args, backend="reference")
            got = sc.select_topk(q, kv, **args, backend=backend)
            assert np.array_equal(got.counts, want.counts), (poison, dtype, shared, got.counts, want.counts)
            for b in range(q.shape[0]):
                n = int(kv.lengths[b])
                keys = kv.k[b, :n].astype(np.float64)
                for g in range(want.groups):
                    heads = range(g * (q.shape[1] // want.groups), (g + 1) * (q.shape[1] // want.groups))
                    x = np.stack([keys[:, h * kv.num_kv_heads // q.shape[1]] @ q[b, h].astype(np.float64)
                                  for h in heads]) / np.sqrt(q.shape[2])
                    mass = ref_attention.softmax_mass(x).mean(axis=0)
                    sure = mass > 1e-6
                    a = set(got.indices[b, g, :got.counts[b, g]].tolist())
                    w = set(want.indices[b, g, :want.counts[b, g]].tolist())
                    assert {t for t in a if sure[t]} == {t for t in w if sure[t]}, (poison, dtype, shared, b, g)
        for shared, top_p in ((True, 0.8), (False, 0.8), (True, None)):  # the same meaning over candidates
            args = dict(k=9, k_min=1 if top_p else 0, top_p=top_p, sink=1, window=2, shared=shared, candidates=12)
            want = sc.select_topk(q, kv, **args, backend="reference")
            got = sc.select_topk(q, kv, **args, backend=backend)
            assert np.array_equal(got.counts, want.counts), (poison, dtype, shared, got.counts, want.counts)
    if poison == "nan-query":  # row 1's query head 2 is NaN: its head carries no mass, so that row keeps k
        q, kv = decode_case(poison, "float32")
        idx = sc.select_topk(q, kv, 9, top_p=0.8, shared=False, backend=backend)
        assert idx.counts[1, 2] == 9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["nan-key", "neg-inf-key-nan-value", "pos-inf-key", "all-neg-inf-nan-value"])
def test_a_long_cache_cut_into_splits_never_drops_a_nonfinite_split(backend: str, poison: str) -> None:
    """numba_cpu cuts a 1100-token sequence into splits: the split holding the bad key must reach
    the result (the bug: out 0, lse -inf for it, merged away into a finite answer)."""
    q, kv = decode_case(poison, "float32", long=True)
    _check(sc.dense_decode(q, kv, backend=backend), oracle_decode(q, kv, None, None), "float32", poison)
    index = indices_for(kv, groups=kv.num_kv_heads, page_size=None)
    _check(sc.sparse_decode(q, kv, index, backend=backend), oracle_decode(q, kv, index, None), "float32", poison)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention_follows_the_nonfinite_contract(backend: str, dtype: str) -> None:
    backend_takes(backend, dtype)
    o1, l1, o2, l2 = merge_case(dtype)
    want = oracle_merge(o1, l1, o2, l2)
    got = sc.merge_attention(o1, l1, o2, l2, backend=backend)
    assert_close(got[0], want[0], dtype, what="merge out")
    assert_close(got[1], want[1], "float32", what="merge lse")


@pytest.mark.parametrize("backend", BACKENDS)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       spots=st.lists(st.tuples(st.sampled_from(["q", "k", "v"]), st.integers(0, 10**6),
                                st.sampled_from([np.nan, np.inf, -np.inf])), min_size=1, max_size=3),
       paged=st.booleans(), per_head=st.booleans(), page=st.booleans(), keep=st.sampled_from([1.0, 0.6]))
@example(dtype="float32", seed=0, spots=[("k", 5 * 16 + 3, np.nan)], paged=False, per_head=False, page=False,
         keep=1.0)
def test_decode_with_random_nonfinite_spots(backend: str, dtype: str, seed: int, spots: list, paged: bool,
                                            per_head: bool, page: bool, keep: float) -> None:
    """Non-finite values in random positions of q, K and V (any position, also past a length: never
    read), on dense and sparse decode: the backend equals the oracle, NaN for NaN."""
    backend_takes(backend, dtype)
    q, kv = decode_case("neg-inf-key", dtype, paged=paged, seed=seed % 1000)
    bufs = {"q": q, "k": kv.k if not paged else kv.k_pages, "v": kv.v if not paged else kv.v_pages}
    for where, pos, val in spots:
        flat = bufs[where].reshape(-1)
        flat[pos % flat.size] = val
    want = oracle_decode(q, kv, None, None)
    _check(sc.dense_decode(q, kv, backend=backend), want, dtype, "dense_decode")
    index = indices_for(kv, groups=q.shape[1] if per_head else kv.num_kv_heads, page_size=4 if page else None,
                        keep=keep, seed=seed % 7)
    _check(sc.sparse_decode(q, kv, index, backend=backend), oracle_decode(q, kv, index, None), dtype,
           "sparse_decode")


# ---- FFN ops: NaN and infinities anywhere in the operands -------------------------------------------

def _finite(a: np.ndarray) -> np.ndarray:
    """|a| with NaN and infinities as 0: a tolerance scale that stays finite, so an infinity where a
    number is expected still fails."""
    return np.abs(np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       spots=st.lists(st.tuples(st.sampled_from(["x", "w", "w_down", "a"]), st.integers(0, 10**6),
                                st.sampled_from([np.nan, np.inf, -np.inf])), min_size=1, max_size=3),
       csr=st.booleans())
def test_ffn_ops_with_nonfinite_spots(backend: str, dtype: str, seed: int, spots: list, csr: bool) -> None:
    """pack keeps NaN and +-inf (|inf| > any threshold); spmm, sddmm, spmm_t and gated_ffn equal the
    reference, which defines that a structural zero of A never reads its row of W (a NaN there does
    not reach the output, as in scipy.sparse) while a stored entry always does."""
    backend_takes(backend, dtype)
    rng = np.random.default_rng(seed)
    m, k, n = 3, 20, 5
    npd = NP[dtype]
    x = rng.uniform(-1, 1, (m, k)) * (rng.random((m, k)) < 0.4)
    w = rng.uniform(-1, 1, (k, n))
    xd = rng.uniform(-1, 1, (m, n))
    w_down = rng.uniform(-1, 1, (k, n))
    bufs = {"a": x, "w": w, "x": xd, "w_down": w_down}
    for where, pos, val in spots:
        flat = bufs[where].reshape(-1)
        flat[pos % flat.size] = val
    x, w, xd, w_down = (b.astype(npd) for b in (x, w, xd, w_down))
    a = sc.pack(x, tile=8, capacity=2, backend=backend)
    ref_a = sc.pack(x, tile=8, capacity=2, backend="reference")
    assert np.array_equal(sc.unpack(a, backend="reference").astype(np.float64), x.astype(np.float64),
                          equal_nan=True)
    if csr:
        a = sc.csr_from_dense(x)
        ref_a = a
    assert_close(sc.spmm(a, w, backend=backend), sc.spmm(ref_a, w, backend="reference"), dtype, what="spmm",
                 scale=_finite(x) @ _finite(w))
    got = sc.sddmm(xd, w, a, backend=backend)
    want = sc.sddmm(xd, w, ref_a, backend="reference")
    to_dense = sc.unpack if isinstance(got, sc.TiledELL) else sc.csr_to_dense
    assert_close(to_dense(got), to_dense(want), dtype, what="sddmm", scale=np.array(float(n)))
    assert_close(sc.spmm_t(a, xd, backend=backend), sc.spmm_t(ref_a, xd, backend="reference"), dtype,
                 what="spmm_t", scale=np.array(float(m)))
    assert_close(sc.gated_ffn(xd, a, w.astype(npd), w_down, backend=backend),
                 sc.gated_ffn(xd, ref_a, w.astype(npd), w_down, backend="reference"), dtype, what="gated_ffn",
                 scale=np.array(float(k * n)))


# ---- pack's threshold: one comparison on every backend ---------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), pick=st.integers(0, 63),
       nudge=st.sampled_from([-1, 0, 1]), relu=st.booleans())
@example(dtype="float32", seed=0, pick=-1, nudge=0, relu=False)
def test_pack_threshold_compares_exactly_as_the_reference(backend: str, dtype: str, seed: int, pick: int, nudge: int,
                                                          relu: bool) -> None:
    """The threshold is compared in float64 against the stored value (the reference); numba_cpu's
    float32 compare against threshold_f32 decides identically, also at a threshold that is a value
    itself, one float64 ulp either side of it, or past the float32 range."""
    backend_takes(backend, dtype)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (4, 16)).astype(NP[dtype])
    x[0, :4] = [np.inf, -np.inf, np.nan, 0.1]
    if pick < 0:
        thr = 0.1                                          # float32(0.1) > 0.1: kept
    else:
        thr = float(abs(x[1:].ravel()[pick % 48].astype(np.float64)))   # a finite value of x
        thr = float(np.nextafter(thr, np.inf if nudge > 0 else -np.inf)) if nudge else thr
    act = "relu" if relu else None
    for t in (thr, 1e39, float(np.finfo(np.float32).max)):
        keep = ~(np.abs(np.maximum(x, 0) if relu else x).astype(np.float64) <= t)   # the definition
        got = sc.pack(x, threshold=t, tile=8, capacity=3, activation=act, backend=backend)
        assert int(got.counts.sum()) + (got.overflow.nnz if got.overflow is not None else 0) == int(keep.sum()), t
        want = sc.pack(x, threshold=t, tile=8, capacity=3, activation=act, backend="reference")
        assert np.array_equal(got.counts, want.counts), t
        assert np.array_equal(np.asarray(sc.unpack(got, backend="reference"), np.float64),
                              np.asarray(sc.unpack(want, backend="reference"), np.float64), equal_nan=True), t


def test_threshold_f32_is_the_largest_float32_at_or_below() -> None:
    from sparsecore.ops.inputs import threshold_f32

    rng = np.random.default_rng(0)
    for t in list(rng.uniform(0, 10, 200)) + [0.0, 0.1, 1e-45, 3.4e38, 1e39, 1e300]:
        t32 = np.float32(threshold_f32(t))
        assert float(t32) <= t and np.isfinite(t32)
        with np.errstate(over="ignore"):
            up = np.nextafter(t32, np.float32(np.inf))
        assert float(up) > t or not np.isfinite(up)


# ---- determinism: the split count is a function of the shapes only -----------------------------------

@pytest.mark.parametrize("op", ["dense_decode", "sparse_decode"])
def test_decode_bits_do_not_depend_on_the_core_count(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2, 4096, 2, 16)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    kv = sc.DenseKV(k, v, np.array([4096, 3000], np.int32))
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    index = indices_for(kv, groups=2, page_size=None)
    results = []
    from sparsecore.backends import numba_cpu
    from sparsecore.ops import dispatcher

    args = (q, kv) if op == "dense_decode" else (q, kv, index)
    for cores in (2, 16, 128):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        results.append(getattr(sc, op)(*args, backend="numba_cpu"))
    # nor on whether the call runs on the calling thread or the pool (SPARSECORE_CPU_PARALLEL_MIN_WORK)
    for min_work in (0, 1 << 40):
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_WORK", min_work)
        dispatcher._PLANS.clear()  # else the signature's runner, made under the other setting, runs
        results.append(getattr(sc, op)(*args, backend="numba_cpu"))
    for out, lse in results[1:]:
        assert out.tobytes() == results[0][0].tobytes() and lse.tobytes() == results[0][1].tobytes()
    assert numba_cpu._n_split(4, 4096, 2 * 4 * 16 * 4096 * 2) > 1  # the dense case really splits
    assert numba_cpu._n_split(4, 4096, numba_cpu.SPLIT_MIN_WORK - 1) == 1  # decode sizes do not


def _long_row_scores(pattern: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Scores of one long selection row (D = 1 keys, q = 1: each key's value is its score)."""
    x = rng.standard_normal(n).astype(np.float32)
    if pattern == "ties":  # five levels: the k-th score is tied many times over
        x = rng.integers(0, 5, n).astype(np.float32)
    elif pattern == "sample_holds_the_best":  # every 16th key, the ones a threshold is sampled from
        x[::16] = 100 + np.arange(len(x[::16]), dtype=np.float32)
    elif pattern == "sample_is_nan":
        x[::16] = np.nan
    elif pattern == "mostly_nonfinite":
        pick = rng.random(n)
        x[pick < 0.5] = np.nan
        x[(pick >= 0.5) & (pick < 0.75)] = -np.inf
        x[pick > 0.995] = np.inf
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["normal", "ties", "sample_holds_the_best", "sample_is_nan", "mostly_nonfinite"])
def test_long_rows_select_the_references_keys(backend: str, pattern: str) -> None:
    """Rows of thousands of keys, where numba_cpu's top-k first sets a threshold from every 16th score
    and ranks only the scores at or above it: the same keys as the reference's argsort at every k
    (ties in position order, NaN below -inf), also when the sample holds the best scores (the
    threshold passes too few: every score is ranked) or only NaN (no threshold)."""
    rng = np.random.default_rng(len(pattern))
    lengths = np.array([4100, 2500], np.int32)
    k = np.zeros((2, 4100, 1, 1), np.float32)
    for b, n in enumerate(lengths):
        k[b, :n, 0, 0] = _long_row_scores(pattern, int(n), rng)
    kv = sc.DenseKV(k, k, lengths)
    q = np.ones((2, 1, 1), np.float32)
    for kk in (1, 16, 100, 300):
        for sink, window in ((0, 0), (4, 40)):  # forced keys are not ranked again
            want = sc.select_topk(q, kv, kk, sink=sink, window=window, backend="reference")
            got = sc.select_topk(q, kv, kk, sink=sink, window=window, backend=backend)
            np.testing.assert_array_equal(got.counts, want.counts)
            np.testing.assert_array_equal(got.indices, want.indices, err_msg=f"{pattern} k={kk} window={window}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["exact", "int8", "quest", "quest_stored", "quest_zero_query"])
def test_plain_selection_ranks_nan_below_minus_inf(backend: str, method: str) -> None:
    """The plain top-k ranks a NaN score below every other, -inf included (the reference's argsort
    of -score puts NaN last), so at every k the same keys as the reference: numba_cpu once ranked
    NaN as -inf and kept a NaN key (a NaN output) where the reference kept the -inf one."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 8, 1, 4)).astype(np.float32)
    k[0, 2, 0, 1] = np.nan
    k[0, 5, 0, :] = -np.inf
    kv = sc.DenseKV(k, k, np.array([8], np.int32))
    q = (np.abs(rng.standard_normal((1, 2, 4))) + 0.1).astype(np.float32)  # the -inf key scores -inf
    if method == "quest_zero_query":  # 0 * -inf in a bound is NaN (np.maximum keeps it): page 3 ranks last
        q[:, :, 3] = 0.0
        k[0, 6, 0, 3] = -np.inf  # page 3 (keys 6, 7, pages of 2): lo -inf, hi finite
    opts = dict(method="int8", codes=sc.quantize_keys(kv)) if method == "int8" else dict(method="exact")
    if method.startswith("quest"):  # one key a page: the page's bound is its key
        opts = dict(method="quest", page_size=2 if method == "quest_zero_query" else 1)
        if method == "quest_stored":
            opts["bounds"] = sc.page_bounds(kv, 1, backend="reference")
    for kk in range(1, 8 if method != "quest_zero_query" else 4):
        for shared in (True, False):
            want = sc.select_topk(q, kv, kk, shared=shared, backend="reference", **opts)
            got = sc.select_topk(q, kv, kk, shared=shared, backend=backend, **opts)
            np.testing.assert_array_equal(got.counts, want.counts)
            np.testing.assert_array_equal(got.indices, want.indices, err_msg=f"{method} k={kk} shared={shared}")
