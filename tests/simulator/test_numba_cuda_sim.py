"""numba_cuda against the reference under the CUDA simulator, through the public ops: Numba device
arrays in (``cuda.to_device``), so the dispatcher picks numba_cuda; tiny shapes, few hypothesis
examples plus the named edge cases, all three value dtypes. Top-k is checked by set and threshold,
never by index equality (ties may be broken either way)."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore import CSR, TiledELL, TopKIndex
from sparsecore import reference as ref
from sparsecore.ops import inputs as I
from sparsecore.ops.dispatcher import select
from sparsecore.reference.attention import sequence_kv
from tests._util import (
    assert_close,
    check_adaptive_against_reference,
    check_mass_ranking_against_reference,
    check_rescore_against_reference,
    check_topk_against_reference,
    dequantized_kv,
)

from ._cases import DTYPES, NP, cdiv, dev, f64, host, kv_cache, random_index, sparse_dense, sparse_format, values
from .conftest import SIM, SKIP_REASON

pytestmark = [pytest.mark.simulator, pytest.mark.skipif(not SIM, reason=SKIP_REASON)]

FEW = settings(max_examples=5, deadline=None, derandomize=True, database=None)
dtypes = pytest.mark.parametrize("dtype", DTYPES)


def _same_bits(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Exact equality of values (NaN equal to NaN): pack/unpack only move entries."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    bad = ~((a == e) | (np.isnan(a) & np.isnan(e)))
    assert not bad.any(), f"{what}: {int(bad.sum())} differ; first at {np.argwhere(bad)[0]}: {a[bad][0]} != {e[bad][0]}"


def _abs(f: TiledELL | CSR) -> TiledELL | CSR:
    """The same pattern with |values| (for the magnitude scale of tolerances)."""
    if isinstance(f, CSR):
        return dataclasses.replace(f, data=np.abs(f.data))
    return dataclasses.replace(f, values=np.abs(f.values), overflow=None if f.overflow is None else _abs(f.overflow))


def _check_format(actual: TiledELL | CSR, expected: TiledELL | CSR, dtype: str, scale: TiledELL | CSR | None,
                  what: str) -> None:
    """A TiledELL or CSR result: the pattern exactly, the values within tolerance (or exactly)."""
    assert type(actual) is type(expected), what
    if isinstance(expected, CSR):
        np.testing.assert_array_equal(host(actual.indptr), expected.indptr, err_msg=f"{what}: indptr")
        np.testing.assert_array_equal(host(actual.indices), expected.indices, err_msg=f"{what}: indices")
        if scale is None:
            _same_bits(f64(actual.data), expected.data.astype(np.float64), f"{what}: data")
        else:
            assert_close(actual.data, expected.data, dtype, what=f"{what}: data", scale=f64(scale.data))
        return
    assert actual.tile == expected.tile and actual.shape == expected.shape, what
    np.testing.assert_array_equal(host(actual.counts), expected.counts, err_msg=f"{what}: counts")
    np.testing.assert_array_equal(host(actual.cols), expected.cols, err_msg=f"{what}: cols")
    if scale is None:
        _same_bits(f64(actual.values), expected.values.astype(np.float64), f"{what}: values")
    else:
        assert_close(actual.values, expected.values, dtype, what=f"{what}: values", scale=f64(scale.values))
    assert (actual.overflow is None) == (expected.overflow is None), f"{what}: overflow presence"
    if expected.overflow is not None:
        _check_format(actual.overflow, expected.overflow, dtype, None if scale is None else scale.overflow,
                      f"{what}: overflow")


# ---- dispatch -----------------------------------------------------------------------------------

def test_device_inputs_dispatch_to_numba_cuda_and_come_back_as_numba_arrays():
    rng = np.random.default_rng(0)
    x = sparse_dense(rng, 2, 8, 0.5, "float32")
    a, w = dev(sparse_format(x, "ell", 4, 1)), dev(values(rng, (8, 3), "float32"))
    assert select(I.SpmmInputs(a, w)).NAME == "numba_cuda"
    out = sc.spmm(a, w)
    assert type(out).__module__.startswith("numba") and out.shape == (2, 3)


def test_host_inputs_are_refused_with_a_reason():
    rng = np.random.default_rng(0)
    x = sparse_dense(rng, 2, 8, 0.5, "float32")
    with pytest.raises(ValueError, match="numba_cuda: runs on cuda arrays, the inputs are on host"):
        sc.spmm(sparse_format(x, "ell", 4, 1), values(rng, (8, 3), "float32"), backend="numba_cuda")


# ---- pack / unpack ------------------------------------------------------------------------------

@dtypes
@FEW
@given(m=st.integers(0, 3), k=st.integers(0, 40), tile=st.sampled_from([4, 8, 16]), cap=st.integers(1, 4),
       density=st.floats(0.0, 1.0), threshold=st.sampled_from([0.0, 0.9]), relu=st.booleans(),
       seed=st.integers(0, 2**16))
@example(m=0, k=0, tile=8, cap=1, density=0.5, threshold=0.0, relu=False, seed=0)      # empty matrix
@example(m=3, k=20, tile=8, cap=2, density=0.0, threshold=0.0, relu=False, seed=1)     # all rows empty
@example(m=2, k=33, tile=16, cap=2, density=0.9, threshold=0.0, relu=True, seed=2)     # tiles over capacity
def test_pack_and_unpack_match_the_reference(dtype, m, k, tile, cap, density, threshold, relu, seed):
    cap = min(cap, tile)
    rng = np.random.default_rng(seed)
    x = sparse_dense(rng, m, k, density, dtype, full_row=True)
    if m * k:
        x[rng.random((m, k)) < 0.2] *= -1  # negative entries for relu to drop
    act = "relu" if relu else None
    got = sc.pack(dev(x), threshold=threshold, activation=act, tile=tile, capacity=cap)
    want = ref.pack(x, threshold=threshold, activation=act, tile=tile, capacity=cap)
    _check_format(got, want, dtype, None, "pack")
    got.map_arrays(host).validate()
    _same_bits(f64(sc.unpack(got)), ref.unpack(want).astype(np.float64), "unpack")


@dtypes
def test_pack_keeps_nan_and_spills_a_full_tile_in_column_order(dtype):
    x = np.zeros((2, 12), NP[dtype])
    x[0, [0, 2, 3, 5, 7, 9, 11]] = [1, -2, np.nan, 4, -5, 6, 7]
    x[1, 4] = np.nan
    got = sc.pack(dev(x), tile=8, capacity=2, threshold=0.5)
    want = ref.pack(x, tile=8, capacity=2, threshold=0.5)
    assert want.overflow is not None and want.overflow.nnz == 3
    _check_format(got, want, dtype, None, "pack")
    _same_bits(f64(sc.unpack(got)), x.astype(np.float64), "unpack")


# ---- spmm, sddmm, spmm_t, gated_ffn -------------------------------------------------------------

_sparse_args = dict(m=st.integers(0, 3), k=st.integers(1, 24), n=st.integers(1, 6), fmt=st.sampled_from(["ell", "csr"]),
                    tile=st.sampled_from([4, 8]), cap=st.integers(1, 3), density=st.floats(0.0, 1.0),
                    seed=st.integers(0, 2**16))
_edge_empty = dict(m=2, k=9, n=3, fmt="csr", tile=4, cap=1, density=0.0, seed=0)      # empty CSR (nnz = 0)
_edge_overflow = dict(m=3, k=17, n=5, fmt="ell", tile=8, cap=1, density=0.8, seed=3)  # full tiles -> overflow
_edge_no_rows = dict(m=0, k=8, n=3, fmt="ell", tile=4, cap=2, density=0.5, seed=0)


def _sparse_case(dtype, m, k, fmt, tile, cap, density, seed):
    rng = np.random.default_rng(seed)
    x = sparse_dense(rng, m, k, density, dtype, full_row=m > 1)
    return rng, sparse_format(x, fmt, tile, min(cap, tile))


@dtypes
@FEW
@given(**_sparse_args)
@example(**_edge_empty)
@example(**_edge_overflow)
@example(**_edge_no_rows)
def test_spmm(dtype, m, k, n, fmt, tile, cap, density, seed):
    rng, a = _sparse_case(dtype, m, k, fmt, tile, cap, density, seed)
    w = values(rng, (k, n), dtype)
    got = sc.spmm(dev(a), dev(w))
    dense = ref.unpack(a) if isinstance(a, TiledELL) else sc.csr_to_dense(a)
    want = dense.astype(np.float64) @ w.astype(np.float64)  # A @ W, overflow included
    assert_close(got, want.astype(NP[dtype]), dtype, what="spmm",
                 scale=np.abs(dense.astype(np.float64)) @ np.abs(w.astype(np.float64)))


@dtypes
@FEW
@given(**_sparse_args)
@example(**_edge_empty)
@example(**_edge_overflow)
def test_sddmm(dtype, m, k, n, fmt, tile, cap, density, seed):
    rng, pattern = _sparse_case(dtype, m, k, fmt, tile, cap, density, seed)
    x, w = values(rng, (m, n), dtype), values(rng, (k, n), dtype)
    got = sc.sddmm(dev(x), dev(w), dev(pattern))
    want = ref.sddmm(x, w, pattern)
    scale = ref.sddmm(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), _abs(pattern))
    _check_format(got, want, dtype, scale, "sddmm")


@dtypes
@FEW
@given(**_sparse_args)
@example(**_edge_empty)
@example(**_edge_overflow)
def test_spmm_t(dtype, m, k, n, fmt, tile, cap, density, seed):
    rng, a = _sparse_case(dtype, m, k, fmt, tile, cap, density, seed)
    dy = values(rng, (m, n), dtype)
    got = sc.spmm_t(dev(a), dev(dy))
    want = ref.spmm_t(a, dy)
    scale = ref.spmm_t(_abs(a).map_arrays(lambda v: v.astype(np.float64) if v.dtype == NP[dtype] else v),
                       np.abs(dy.astype(np.float64)))
    assert_close(got, want, dtype, what="spmm_t", scale=scale)


@dtypes
@FEW
@given(**_sparse_args)
@example(**_edge_empty)
@example(**_edge_overflow)
def test_gated_ffn(dtype, m, k, n, fmt, tile, cap, density, seed):
    rng, gate = _sparse_case(dtype, m, k, fmt, tile, cap, density, seed)
    d = 5
    x, w_up, w_down = values(rng, (m, d), dtype), values(rng, (k, d), dtype), values(rng, (k, n), dtype)
    got = sc.gated_ffn(dev(x), dev(gate), dev(w_up), dev(w_down))
    want = ref.gated_ffn(x, gate, w_up, w_down)
    a64 = lambda v: np.abs(v.astype(np.float64))  # noqa: E731
    scale = ref.gated_ffn(a64(x), _abs(gate).map_arrays(lambda v: v.astype(np.float64) if v.dtype == NP[dtype] else v),
                          a64(w_up), a64(w_down))
    assert_close(got, want, dtype, what="gated_ffn", scale=scale)


# ---- select_topk --------------------------------------------------------------------------------

def _check_topk(got: TopKIndex, q, kv, k, method, sink, window, shared, ps_arg) -> None:
    want = ref.select_topk(q, kv, k, method=method, sink=sink, window=window, shared=shared, page_size=ps_arg)
    assert (got.granularity, got.page_size) == (want.granularity, want.page_size)
    check_topk_against_reference(got, want, q, kv, shared=shared, sink=sink, window=window, rel_tol=1e-4)


_topk_args = dict(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]), d=st.integers(1, 6),
                  s=st.integers(1, 24), k=st.integers(0, 8), sink=st.integers(0, 3), window=st.integers(0, 4),
                  shared=st.booleans(), paged=st.booleans(), seed=st.integers(0, 2**16))


def _token_examples(test):
    """The named edge cases of a token selection test: k = 0, k = the length, length 1, a plain
    top-k over a group of 3."""
    for case in (dict(b=1, hkv=1, group=2, d=3, s=10, k=0, sink=2, window=2, shared=True, paged=False, seed=0),
                 dict(b=2, hkv=1, group=1, d=2, s=9, k=9, sink=0, window=0, shared=False, paged=True, seed=1),
                 dict(b=1, hkv=2, group=2, d=4, s=1, k=1, sink=1, window=1, shared=True, paged=True, seed=2),
                 dict(b=1, hkv=1, group=3, d=4, s=20, k=4, sink=0, window=0, shared=True, paged=False, seed=3)):
        test = example(**case)(test)
    return test


def _topk_case(dtype, b, hkv, group, d, s, paged, seed, lengths=None):
    rng = np.random.default_rng(seed)
    lengths = lengths if lengths is not None else [int(rng.integers(0 if i else 1, s + 1)) for i in range(b)]
    kv = kv_cache(rng, dtype, b, s, hkv, d, lengths, paged, page_size=3)
    q = values(rng, (b, hkv * group, d), dtype)
    return q, kv


@dtypes
@FEW
@given(**_topk_args)
@_token_examples
def test_select_topk_exact(dtype, b, hkv, group, d, s, k, sink, window, shared, paged, seed):
    q, kv = _topk_case(dtype, b, hkv, group, d, s, paged, seed)
    k = min(k, kv.max_len)
    got = sc.select_topk(dev(q), dev(kv), k, method="exact", sink=sink, window=window, shared=shared)
    _check_topk(got, q, kv, k, "exact", sink, window, shared, None)


@dtypes
@FEW
@given(**_topk_args, page_size=st.sampled_from([None, 2, 4]))
@example(b=1, hkv=1, group=2, d=3, s=3, k=1, sink=0, window=0, shared=True, paged=True, seed=0,
         page_size=None)                                                                            # one page
@example(b=2, hkv=2, group=1, d=2, s=17, k=2, sink=3, window=5, shared=False, paged=False, seed=1,
         page_size=4)                                                                              # window spans pages
@example(b=1, hkv=1, group=2, d=4, s=12, k=6, sink=0, window=0, shared=True, paged=True, seed=2,
         page_size=None)                                                                            # k = every page
def test_select_topk_quest(dtype, b, hkv, group, d, s, k, sink, window, shared, paged, seed, page_size):
    q, kv = _topk_case(dtype, b, hkv, group, d, s, paged, seed)
    ps = page_size if page_size is not None else (3 if paged else 16)
    k = min(k, cdiv(kv.max_len, ps))
    got = sc.select_topk(dev(q), dev(kv), k, method="quest", sink=sink, window=window, shared=shared,
                         page_size=page_size)
    _check_topk(got, q, kv, k, "quest", sink, window, shared, page_size)


def _check_mass_ranking(got, q, kv, k, sink, window, shared, scale=None) -> None:
    check_mass_ranking_against_reference(got, q, kv, k, sink=sink, window=window, shared=shared, scale=scale,
                                         rel_tol=1e-5)


@dtypes
@FEW
@given(**_topk_args)
@_token_examples
def test_select_topk_mass_ranking_of_every_key(dtype, b, hkv, group, d, s, k, sink, window, shared, paged, seed):
    q, kv = _topk_case(dtype, b, hkv, group, d, s, paged, seed)
    k = min(k, kv.max_len)
    # the capacity or more: every key is a candidate; the default scale or another
    c, scale = (max(kv.max_len, k), None) if seed % 2 else (10**6, 0.3)
    got = sc.select_topk(dev(q), dev(kv), k, sink=sink, window=window, shared=shared, candidates=c, scale=scale)
    _check_mass_ranking(got, q, kv, k, sink, window, shared, scale)


@dtypes
@FEW
@given(**_topk_args, top_p=st.sampled_from([0.3, 0.7, 0.9, 0.99, 1.0]), k_min=st.integers(0, 3))
@example(b=1, hkv=1, group=2, d=3, s=10, k=0, sink=2, window=2, shared=True, paged=False, seed=0, top_p=0.9,
         k_min=0)                                                                                   # k = 0
@example(b=2, hkv=1, group=1, d=2, s=9, k=9, sink=0, window=0, shared=False, paged=True, seed=1, top_p=1.0,
         k_min=2)                                                                                   # every key
@example(b=1, hkv=1, group=3, d=4, s=24, k=8, sink=1, window=2, shared=True, paged=False, seed=5, top_p=0.5,
         k_min=0)                                                                                   # the forced cover
@pytest.mark.parametrize("cut_shared", [None, 4], ids=["shared-sort", "global-sort"])
def test_select_topk_adaptive_budget(dtype, cut_shared, b, hkv, group, d, s, k, sink, window, shared, paged, seed,
                                     top_p, k_min):
    """top_p: the fewest of the k highest-mass units that bring the kept mass to top_p, at least
    k_min (each key's mass from mass_of_every_key, the cut from top_p_cut); with ``cut_shared`` the
    shared-memory sort's limit lowered to that many units, so that rows of more sort in top_p_cut's
    global workspace (the path of rows past 2048 units)."""
    from sparsecore.backends.numba_cuda import _ops

    with mock.patch.object(_ops, "CUT_SHARED", cut_shared or _ops.CUT_SHARED):
        _adaptive_budget_case(dtype, b, hkv, group, d, s, k, sink, window, shared, paged, seed, top_p, k_min)


def _adaptive_budget_case(dtype, b, hkv, group, d, s, k, sink, window, shared, paged, seed, top_p, k_min):
    q, kv = _topk_case(dtype, b, hkv, group, d, s, paged, seed)
    q = q * 4  # sharper softmaxes: the budget varies between rows
    k = min(k, kv.max_len)
    k_min = min(k_min, k)
    scale = None if seed % 2 else 0.3
    got = sc.select_topk(dev(q), dev(kv), k, sink=sink, window=window, shared=shared, top_p=top_p, k_min=k_min,
                         scale=scale)
    check_adaptive_against_reference(got, q, kv, k, top_p=top_p, k_min=k_min, sink=sink, window=window, shared=shared,
                                     scale=scale)
    if k > 0:  # candidates covering every key with top_p: the same selection
        every = sc.select_topk(dev(q), dev(kv), k, sink=sink, window=window, shared=shared, top_p=top_p,
                               k_min=k_min, scale=scale, candidates=max(k, kv.max_len))
        np.testing.assert_array_equal(host(every.indices), host(got.indices))


@pytest.mark.parametrize("poison", ["nan", "+inf", "-inf", "two +inf"])
def test_select_topk_mass_ranking_follows_the_nonfinite_contract(poison):
    """A NaN score carries no mass, +inf scores share all of their head's mass, -inf carries none
    (reference.softmax_mass): keys with such scores are ranked as the reference ranks them."""
    q, kv = _topk_case("float32", 1, 1, 3, 4, 16, False, 7, lengths=[16])
    q = np.abs(q) + 0.1  # positive queries: a key of +inf / -inf components scores +inf / -inf
    k = kv.k.copy()
    if poison == "nan":
        k[0, 5, 0, 1] = np.nan
    elif poison == "+inf":
        k[0, 5, 0, :] = np.inf
    elif poison == "-inf":
        k[0, 5, 0, :] = -np.inf
    else:
        k[0, 5, 0, :] = np.inf
        k[0, 11, 0, :] = np.inf
    kv = sc.DenseKV(k, kv.v, kv.lengths)
    for shared in (True, False):
        got = sc.select_topk(dev(q), dev(kv), 3, shared=shared, candidates=16)
        _check_mass_ranking(got, q, kv, 3, 0, 0, shared)
        sel = host(got.indices)[0]
        if poison in ("+inf", "two +inf"):
            assert all(5 in row for row in sel.tolist())
        if poison == "two +inf":
            assert all(11 in row for row in sel.tolist())
        if poison in ("nan", "-inf"):
            assert all(5 not in row for row in sel.tolist())


@pytest.mark.parametrize("method", ["exact", "quest", "int8"])
def test_select_topk_ranks_a_nan_score_last(method):
    """A NaN score ranks below every other score, -inf included (the reference's argsort of -score),
    for the plain top-k of every method: topk_select's order key once put a positive NaN above
    +inf, and a key with a NaN component was chosen first (found by this session's rescore test)."""
    q, kv = _topk_case("float32", 1, 1, 2, 4, 16, False, 3, lengths=[16])
    q = np.abs(q) + 0.1  # positive queries: the -inf key scores -inf
    k = kv.k.copy()
    k[0, 5, 0, 1] = np.nan
    k[0, 9, 0, :] = -np.inf  # -inf (int8: a NaN scale, as NaN), still chosen before the NaN key
    kv = sc.DenseKV(k, kv.v, kv.lengths)
    opts = dict(method="int8", codes=sc.quantize_keys(kv)) if method == "int8" else dict(method=method)
    kk = {"exact": 15, "int8": 14, "quest": 4}[method]  # int8: the -inf key's scale is NaN too: both last
    if method == "quest":
        opts["page_size"] = 1  # one key a page: the page bound is the key
    for shared in (True, False):
        got = sc.select_topk(dev(q), dev(kv), kk, shared=shared,
                             **{n: dev(v) if n == "codes" else v for n, v in opts.items()})
        want = ref.select_topk(q, kv, kk, shared=shared, **opts)
        np.testing.assert_array_equal(host(got.counts), want.counts)
        if method != "quest":
            assert all(5 not in row for row in host(got.indices)[0].tolist()), (method, shared)


@dtypes
@FEW
@pytest.mark.parametrize("mode", ["plain", "mass", "top_p", "rescore"])
@given(**_topk_args)
@_token_examples
def test_select_topk_int8(dtype, mode, b, hkv, group, d, s, k, sink, window, shared, paged, seed):
    """method="int8" over KeyCodes (topk_scores_int8; the codes are in token order for a paged cache
    too): the plain top-k, the mass ranking of every key, the adaptive budget and re-scoring a pool
    from the keys (rescore_pool), each held to the reference (on the keys the codes stand for,
    tests._util.dequantized_kv; the re-scored ones on the keys)."""
    q, kv = _topk_case(dtype, b, hkv, group, d, s, paged, seed)
    k = min(k, kv.max_len)
    codes = sc.quantize_keys(kv)
    deq = dequantized_kv(kv, codes)
    opts = dict(method="int8", codes=dev(codes), sink=sink, window=window, shared=shared)
    if mode == "plain":
        got = sc.select_topk(dev(q), dev(kv), k, **opts)
        want = ref.select_topk(q, kv, k, method="int8", codes=codes, sink=sink, window=window, shared=shared)
        check_topk_against_reference(got, want, q, deq, shared=shared, sink=sink, window=window, rel_tol=1e-4)
    elif mode == "mass":
        got = sc.select_topk(dev(q), dev(kv), k, candidates=max(k, kv.max_len), **opts)
        _check_mass_ranking(got, q, deq, k, sink, window, shared)
    elif mode == "rescore":  # the rescore best by the int8 score, the k best of them by the exact one
        pos = sc.DenseKV(np.abs(deq.k).astype(NP[dtype]), np.abs(deq.v).astype(NP[dtype]), deq.lengths)
        neg_q = -np.abs(f64(q)).astype(NP[dtype])  # also every score negative: outside the pool must lose
        for qq, cache in ((q, kv), (neg_q, pos)):
            r = min(cache.max_len, 2 * k + 1)
            c = sc.quantize_keys(cache)
            got = sc.select_topk(dev(qq), dev(cache), k, **dict(opts, codes=dev(c)), rescore=r)
            want = ref.select_topk(qq, cache, k, method="int8", codes=c, sink=sink, window=window, shared=shared,
                                   rescore=r)
            check_rescore_against_reference(got, want, qq, cache, shared=shared, sink=sink, window=window,
                                            rel_tol=1e-4)
    else:
        got = sc.select_topk(dev(q), dev(kv), k, top_p=0.8, k_min=min(1, k), **opts)
        check_adaptive_against_reference(got, q, deq, k, top_p=0.8, k_min=min(1, k), sink=sink, window=window,
                                         shared=shared, scale=None)


def test_select_topk_candidates_pool_is_refused_with_its_reason():
    """Ranking a pool of candidates by attention mass is host-only for now: on device arrays the
    dispatcher says so (numba_cuda's reason) instead of running a kernel that ignores it (the exact
    kernel ran for ``candidates`` before, a selection the reference does not make). The adaptive
    budget past 2048 units and int8 ranking, with or without rescore, are not refused."""
    q, kv = _topk_case("float32", 1, 1, 2, 4, 10, False, 0)
    q_long, kv_long = _topk_case("float32", 1, 1, 2, 4, 2100, False, 0, lengths=[2100])
    inp = I.SelectTopkInputs(dev(q_long), dev(kv_long), 2048, top_p=0.9, sink=1)
    inp.validate()
    assert select(inp).NAME == "numba_cuda"
    codes = sc.quantize_keys(kv)
    for r in (0, 6):
        inp = I.SelectTopkInputs(dev(q), dev(kv), 3, method="int8", codes=dev(codes), rescore=r)
        inp.validate()
        assert select(inp).NAME == "numba_cuda"
    for c in (3, 6, 9):  # a pool short of the capacity (10): refused; at or past it, every key (tested above)
        with pytest.raises(NotImplementedError, match=f"candidates = {c} below the cache's capacity 10 .a pool "
                                                      "ranked by attention mass. is not implemented in numba_cuda"):
            sc.select_topk(dev(q), dev(kv), 3, candidates=c)
        with pytest.raises(NotImplementedError, match="candidates"):
            sc.DecodePlan(dev(q), dev(kv), 3, candidates=c)
    for c in (10, 100):
        sc.select_topk(dev(q), dev(kv), 3, candidates=c)


# ---- page_bounds and select_topk(bounds=) ---------------------------------------------------------

def _same_bounds(got: sc.PageBounds, want: sc.PageBounds, what: str) -> None:
    """Bit-identical kmin/kmax (min and max of stored values are exact in the stored dtype)."""
    assert got.page_size == want.page_size, f"{what}: page_size {got.page_size} != {want.page_size}"
    for name in ("kmin", "kmax"):
        a, e = host(getattr(got, name)), getattr(want, name)
        assert a.dtype == e.dtype, f"{what}: {name} dtype {a.dtype} != {e.dtype}"
        _same_bits(a.astype(np.float64), e.astype(np.float64), f"{what}: {name}")
        assert np.array_equal(a.view(np.uint8), e.view(np.uint8)), f"{what}: {name} bits differ"


@dtypes
@pytest.mark.parametrize("paged", [False, True])
def test_page_bounds_fresh_and_updated_in_place_match_the_reference(dtype, paged):
    # logical pages of 4 tokens over a paged cache of 3-token pages; one empty sequence; a length on a
    # page boundary; tokens past every length are NaN (a page that reads one row too many is NaN)
    rng = np.random.default_rng(7)
    long_len, short_len = [11, 0, 8], [6, 0, 8]
    kv = kv_cache(rng, dtype, 3, 11, 2, 5, long_len, paged, page_size=3)
    short = dataclasses.replace(kv, lengths=np.asarray(short_len, np.int32))
    ps = 4
    assert select(I.PageBoundsInputs(dev(kv), ps)).NAME == "numba_cuda"
    fresh = sc.page_bounds(dev(kv), ps)
    want = ref.page_bounds(kv, ps)
    _same_bounds(fresh, want, "fresh")
    assert type(fresh.kmin).__module__.startswith("numba") and fresh.kmin.shape == (3, 3, 2, 5)
    assert not f64(fresh.kmin)[1].any() and not f64(fresh.kmax)[1].any()  # length 0: all pages 0
    # decode steps appended tokens 6..10 of sequence 0: recompute from its page 1 (partial before)
    out = sc.page_bounds(dev(short), ps)
    _same_bounds(out, ref.page_bounds(short, ps), "short")
    start = np.asarray(short_len, np.int32)
    assert sc.page_bounds(dev(kv), out=out, start=dev(start)) is out
    _same_bounds(out, want, "updated")
    # only pages start[b] // ps .. ceil(lengths[b] / ps) - 1 are written: the rest keep a sentinel
    marked = sc.PageBounds(np.full_like(want.kmin, 7), np.full_like(want.kmax, -7), ps)
    sc.page_bounds(dev(kv), out=(dm := dev(marked)), start=dev(np.asarray([5, 0, 3], np.int32)))
    lo, hi = f64(dm.kmin), f64(dm.kmax)
    for b, pages in enumerate([range(1, 3), range(0), range(0, 2)]):
        for j in range(3):
            if j in pages:
                np.testing.assert_array_equal(lo[b, j], want.kmin[b, j].astype(np.float64))
                np.testing.assert_array_equal(hi[b, j], want.kmax[b, j].astype(np.float64))
            else:
                assert (lo[b, j] == 7).all() and (hi[b, j] == -7).all(), f"page ({b}, {j}) was written"


@dtypes
@pytest.mark.parametrize("paged,shared", [(False, False), (True, True)])
def test_select_topk_quest_with_bounds_equals_without(dtype, paged, shared):
    q, kv = _topk_case(dtype, 2, 2, 2, 4, 13, paged, 11, lengths=[13, 7])
    ps = 3 if paged else 4  # paged: the cache's own page size (the default of both ops)
    bounds = sc.page_bounds(dev(kv), None if paged else ps)
    k, sink, window = 2, 1, 2
    got = sc.select_topk(dev(q), dev(kv), k, method="quest", sink=sink, window=window, shared=shared,
                         bounds=bounds)
    plain = sc.select_topk(dev(q), dev(kv), k, method="quest", sink=sink, window=window, shared=shared,
                           page_size=ps)
    assert (got.granularity, got.page_size) == ("page", ps)
    np.testing.assert_array_equal(host(got.counts), host(plain.counts))
    np.testing.assert_array_equal(host(got.indices), host(plain.indices))  # same scores, same selection
    want = ref.select_topk(q, kv, k, method="quest", sink=sink, window=window, shared=shared,
                           bounds=bounds.map_arrays(host))
    check_topk_against_reference(got, want, q, kv, shared=shared, sink=sink, window=window, rel_tol=1e-4)


# ---- decode -------------------------------------------------------------------------------------

def _check_attention(got, want, dtype, kv, what):
    out, lse = got
    vmax = 1.0 + max((np.nanmax(np.abs(sequence_kv(kv, b)[1].astype(np.float64)), initial=0.0)
                      for b in range(kv.batch)), default=0.0)
    assert_close(out, want[0], dtype, what=f"{what}: out", scale=np.asarray(vmax))
    assert host(lse).dtype == np.float32, f"{what}: lse dtype"
    assert_close(lse, want[1], "float32", what=f"{what}: lse", scale=np.asarray(10.0))


_decode_args = dict(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), d=st.integers(1, 8),
                    s=st.integers(1, 40), paged=st.booleans(), seed=st.integers(0, 2**16))


@dtypes
@FEW
@given(**_decode_args, shared=st.booleans(), pages=st.booleans(), k_max=st.integers(0, 24))
@example(b=2, hkv=1, group=2, d=4, s=12, paged=False, seed=0, shared=True, pages=False, k_max=5)   # an empty row
@example(b=1, hkv=2, group=2, d=3, s=40, paged=True, seed=1, shared=False, pages=False, k_max=24)  # split-K
@example(b=2, hkv=1, group=2, d=4, s=30, paged=True, seed=2, shared=True, pages=True, k_max=6)     # pages, split-K
def test_sparse_decode(dtype, b, hkv, group, d, s, paged, seed, shared, pages, k_max):
    q, kv = _topk_case(dtype, b, hkv, group, d, s, paged, seed)
    rng = np.random.default_rng(seed + 1)
    g_rows = hkv if shared else hkv * group
    index = random_index(rng, [int(n) for n in kv.lengths], g_rows, k_max, page_size=3 if pages else None,
                         empty_row=True)
    got = sc.sparse_decode(dev(q), dev(kv), dev(index), scale=0.7)
    want = ref.sparse_decode(q, kv, index, scale=0.7)
    _check_attention(got, want, dtype, kv, "sparse_decode")
    empty = np.argwhere(index.counts == 0)
    if len(empty):  # an empty selection: out = 0, lse = -inf
        bb, gg = empty[0]
        h = gg * group if shared else gg
        assert np.isneginf(host(got[1])[bb, h]) and not host(got[0])[bb, h].astype(np.float64).any()


@dtypes
@FEW
@given(**_decode_args)
@example(b=2, hkv=1, group=2, d=4, s=37, paged=False, seed=0)    # split-K over a long row, NaN past lengths
@example(b=1, hkv=2, group=1, d=8, s=1, paged=True, seed=1)      # length 1, one page
def test_dense_decode(dtype, b, hkv, group, d, s, paged, seed):
    q, kv = _topk_case(dtype, b, hkv, group, d, s, paged, seed)
    _check_attention(sc.dense_decode(dev(q), dev(kv)), ref.dense_decode(q, kv), dtype, kv, "dense_decode")


@dtypes
def test_dense_decode_of_an_empty_sequence_is_zero_and_minus_inf(dtype):
    q, kv = _topk_case(dtype, 2, 1, 2, 4, 6, False, 0, lengths=[0, 6])
    out, lse = sc.dense_decode(dev(q), dev(kv))
    assert np.isneginf(host(lse)[0]).all() and not f64(out)[0].any()
    _check_attention((out, lse), ref.dense_decode(q, kv), dtype, kv, "dense_decode")


@pytest.mark.parametrize("paged", [False, True])
def test_sparse_decode_selecting_everything_equals_dense_decode(paged):
    q, kv = _topk_case("float32", 2, 2, 2, 4, 21, paged, 5)
    index = sc.select_topk(dev(q), dev(kv), kv.max_len, shared=True)
    sparse = sc.sparse_decode(dev(q), dev(kv), index)
    dense = sc.dense_decode(dev(q), dev(kv))
    assert_close(sparse[0], host(dense[0]), "float32", what="out")
    assert_close(sparse[1], host(dense[1]), "float32", what="lse")


# ---- merge_attention ----------------------------------------------------------------------------

@dtypes
@FEW
@given(shape=st.sampled_from([(3, 4), (2, 3, 5), (1, 1), (4,)]), lse64=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(2, 3, 5), lse64=False, seed=0)
@example(shape=(4,), lse64=True, seed=1)   # one vector: a 0-d lse
def test_merge_attention(dtype, shape, lse64, seed):
    rng = np.random.default_rng(seed)
    o1, o2 = values(rng, shape, dtype), values(rng, shape, dtype)
    ldt = np.float64 if lse64 else np.float32
    l1 = np.asarray(rng.standard_normal(shape[:-1]), dtype=ldt).reshape(shape[:-1])
    l2 = np.asarray(rng.standard_normal(shape[:-1]), dtype=ldt).reshape(shape[:-1])
    l1.flat[0] = -np.inf                 # one side empty
    if l1.size > 1:
        l1.flat[1] = l2.flat[1] = -np.inf  # both sides empty: out 0, lse -inf
    out, lse = sc.merge_attention(dev(o1), dev(l1), dev(o2), dev(l2))
    want = ref.merge_attention(o1, l1, o2, l2)
    assert_close(out, want[0], dtype, what="out", scale=np.asarray(4.0))
    assert_close(lse, np.asarray(want[1]), "float32", what="lse")  # the reference gives a scalar for 1-d o
    assert tuple(out.shape) == shape and tuple(lse.shape) == shape[:-1] and type(lse).__module__.startswith("numba")
