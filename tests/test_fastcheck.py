"""The compiled validity checks (sparsecore/formats/_fastcheck.py) agree with the NumPy checks of
``validate()`` on valid formats and on formats with one buffer element broken at random: a compiled
"valid" never lets through what the NumPy checks reject, and a valid format never pays for them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore.formats import _fastcheck

pytest.importorskip("numba")


def _numpy_only(check: Any) -> bool:
    """Whether ``check()`` passes with the compiled passes switched off (the NumPy checks alone)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(_fastcheck, "_kernels", lambda: None)
    try:
        check()
        return True
    except ValueError:
        return False
    finally:
        mp.undo()


def _numpy_verdict(fmt: Any, *args: Any) -> bool:
    """What the NumPy checks of ``validate`` alone say."""
    return _numpy_only(lambda: fmt.validate(*args))


def _break(rng: np.random.Generator, arrays: dict[str, np.ndarray]) -> None:
    """Change one element of one buffer (in place) to a value near, at or past its valid range."""
    name = rng.choice(sorted(n for n, a in arrays.items() if a.size))
    a = arrays[name]
    i = tuple(int(rng.integers(0, s)) for s in a.shape)
    if a.dtype.kind == "f" or a.dtype.kind == "V" or a.dtype.itemsize == 2 and a.dtype.kind not in "iu":
        a[i] = rng.choice([0.0, -0.0, 1.0, np.nan])
    else:
        a[i] = int(a[i]) + int(rng.choice([-2, -1, 1, 2, 7]))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(1, 4), k=st.integers(1, 40), tile=st.sampled_from([2, 4, 8, 16]),
       density=st.sampled_from([0.1, 0.4, 0.9]), unsorted=st.booleans(), broken=st.booleans(),
       dtype=st.sampled_from(["float32", "float16", "float64"]))
def test_tiled_ell_and_csr(seed: int, m: int, k: int, tile: int, density: float, unsorted: bool, broken: bool,
                           dtype: str) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, k)) * (rng.random((m, k)) < density)).astype(dtype)
    a = sc.pack(x, tile=tile, capacity=max(1, tile // 4), backend="reference")
    c = sc.csr_from_dense(x)
    if unsorted:
        a = sc.TiledELL(a.values, a.cols, a.counts, a.shape, a.tile, a.overflow, sorted=False)
        c = sc.CSR(c.indptr, c.indices, c.data, c.shape, sorted=False)
    for fmt, arrays in ((a, {"counts": a.counts, "cols": a.cols, "values": a.values,
                             **({} if a.overflow is None else {"ov.indptr": a.overflow.indptr,
                                                               "ov.indices": a.overflow.indices})}),
                        (c, {"indptr": c.indptr, "indices": c.indices})):
        if broken:
            _break(rng, arrays)
        fast = _fastcheck.tiled_ell_ok(fmt) if isinstance(fmt, sc.TiledELL) else _fastcheck.csr_ok(fmt)
        assert fast == _numpy_verdict(fmt), (fmt, fast)


def _random_index(rng: np.random.Generator, b: int, g: int, kmax: int, page: int | None, broken: bool,
                  distinct: bool) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(lengths, units, index)``: a TopKIndex over random lengths (distinct indices per row, or
    drawn with repeats), one element of it broken at random when ``broken``."""
    lengths = rng.integers(0, 12, b).astype(np.int32)
    units = lengths if page is None else -(-lengths // page)
    ind = np.full((b, g, kmax), -1, np.int32)
    cnt = np.zeros((b, g), np.int32)
    for i in range(b):
        for j in range(g):
            n = int(min(kmax, units[i], rng.integers(0, kmax + 1)))
            u = int(units[i])
            ind[i, j, :n] = rng.permutation(u)[:n] if distinct else rng.integers(0, max(u, 1), n)
            cnt[i, j] = n
    index = sc.TopKIndex(ind, cnt, "token" if page is None else "page", page)
    if broken and ind.size:
        _break(rng, {"indices": ind, "counts": cnt})
    return lengths, units, index


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), g=st.integers(1, 3), kmax=st.integers(0, 6),
       broken=st.booleans(), page=st.sampled_from([None, 4]))
def test_topk_index(seed: int, b: int, g: int, kmax: int, broken: bool, page: int | None) -> None:
    rng = np.random.default_rng(seed)
    lengths, units, index = _random_index(rng, b, g, kmax, page, broken, distinct=True)
    units64 = np.asarray(units, np.int64)
    assert _fastcheck.topk_ok(index, units64) == _numpy_verdict(index, lengths)


def _numpy_bounds_verdict(index: Any, lengths: Any) -> bool:
    """What ``TopKIndex.check_bounds``' NumPy pass alone says."""
    return _numpy_only(lambda: index.check_bounds("test", "index", lengths))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), g=st.integers(1, 3), kmax=st.integers(0, 6),
       broken=st.booleans(), page=st.sampled_from([None, 4]), with_lengths=st.booleans())
def test_topk_bounds(seed: int, b: int, g: int, kmax: int, broken: bool, page: int | None,
                     with_lengths: bool) -> None:
    """The bounds pass of SPARSECORE_VALIDATE=never (counts in range, selected indices below the
    sequence's units; duplicates allowed) agrees with its NumPy version, broken or not."""
    rng = np.random.default_rng(seed)
    lengths, _, index = _random_index(rng, b, g, kmax, page, broken, distinct=False)  # duplicates are in bounds
    ln = lengths if with_lengths else None
    assert _fastcheck.topk_bounds_ok(index, ln) == _numpy_bounds_verdict(index, ln)


def _numpy_decode_verdict(kv: Any, index: Any) -> bool:
    """What a sparse decode call's NumPy data checks alone say: the cache's, then the index's."""
    return _numpy_only(lambda: (kv.validate(), index.validate(lengths=kv.lengths)))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), g=st.integers(1, 3), kmax=st.integers(0, 6),
       broken=st.booleans(), page=st.sampled_from([None, 4]), bad_length=st.sampled_from([None, -1, 13, 11]))
def test_dense_kv_topk(seed: int, b: int, g: int, kmax: int, broken: bool, page: int | None,
                       bad_length: int | None) -> None:
    """sparse_decode's one data pass (a DenseKV's lengths, then the index against them) agrees with
    the two NumPy checks it replaces, with the index or one length (past the capacity of 12, below
    zero, or in range) broken or not."""
    rng = np.random.default_rng(seed)
    lengths, _, index = _random_index(rng, b, g, kmax, page, broken, distinct=True)
    if bad_length is not None:
        lengths[int(rng.integers(0, b))] = bad_length
    zeros = np.zeros((b, 12, 1, 2), np.float32)
    kv = sc.DenseKV(zeros, zeros, lengths)
    assert _fastcheck.dense_kv_topk_ok(kv, index) == _numpy_decode_verdict(kv, index)
