"""Host tier: the decode formats DenseKV, PagedKV and TopKIndex. Constructors and ``validate()`` accept
valid data (drawn and named edge cases) and catch broken invariants built by mutating valid objects.
Messages are pinned elsewhere; here a match only names the buffer and position that is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecore import DenseKV, PagedKV, TopKIndex
from tests.strategies_decode import EDGE_CASES, DecodeCase, cdiv, decode_cases, index_from_rows, random_rows


def _check_kv_shape_props(case: DecodeCase) -> None:
    kv, dense = case.kv, case.dense
    assert kv.validate() is kv
    assert dense.validate() is dense
    assert kv.batch == dense.batch == case.batch
    assert kv.num_kv_heads == dense.num_kv_heads == case.hkv
    assert kv.head_dim == dense.head_dim == case.head_dim
    assert kv.dtype == dense.dtype == case.dtype
    assert kv.max_len == dense.max_len
    assert (case.lengths <= kv.max_len).all()
    if case.paged:
        assert kv.page_size == kv.k_pages.shape[1]
        assert kv.num_pages == kv.k_pages.shape[0]
        assert kv.max_len == kv.page_table.shape[1] * kv.page_size
        # the strategy's contract: every row past a length, and every unused page, is NaN
        used = np.zeros((kv.num_pages, kv.page_size), dtype=bool)
        for b, n in enumerate(case.lengths):
            for t in range(int(n)):
                used[kv.page_table[b, t // kv.page_size], t % kv.page_size] = True
        assert np.isnan(kv.k_pages.astype(np.float64)[~used]).all()
    for b, n in enumerate(case.lengths):
        assert np.isnan(dense.k[b, int(n):].astype(np.float64)).all()
        assert not np.isnan(dense.k[b, :int(n)].astype(np.float64)).any()


@given(case=decode_cases())
def test_kv_valid_drawn(case: DecodeCase) -> None:
    _check_kv_shape_props(case)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_kv_valid_edge(name: str) -> None:
    _check_kv_shape_props(EDGE_CASES[name]("bfloat16"))


def test_kv_map_arrays_to_torch_keeps_meaning() -> None:
    case = EDGE_CASES["shared_prefix"]("float32")
    t = case.kv.map_arrays(torch.from_numpy)
    assert isinstance(t, PagedKV) and isinstance(t.k_pages, torch.Tensor)
    assert t.validate() is t
    assert (t.page_size, t.num_pages, t.max_len, t.dtype) == (case.kv.page_size, case.kv.num_pages,
                                                              case.kv.max_len, "float32")
    bad = PagedKV(t.k_pages, t.v_pages, t.page_table.clone(), t.lengths)
    bad.page_table[1, 0] = case.kv.num_pages
    with pytest.raises(ValueError, match=r"page_table\[1, 0\]"):
        bad.validate()


# --- DenseKV mutations ---------------------------------------------------------------------------------

@given(case=decode_cases(paged=False), data=st.data())
def test_dense_length_out_of_range(case: DecodeCase, data: st.DataObject) -> None:
    kv = case.kv
    b = data.draw(st.integers(0, case.batch - 1))
    bad_len = data.draw(st.sampled_from([kv.max_len + 1, kv.max_len + 7, -1]))
    lengths = kv.lengths.copy()
    lengths[b] = bad_len
    broken = DenseKV(kv.k, kv.v, lengths)  # the constructor reads no data
    with pytest.raises(ValueError, match=rf"lengths\[{b}\]"):
        broken.validate()
    lengths[b] = kv.max_len  # the boundary is allowed
    DenseKV(kv.k, kv.v, lengths).validate()


def test_dense_constructor_rejects_layouts() -> None:
    k = np.zeros((2, 5, 1, 4), np.float32)
    with pytest.raises(ValueError):
        DenseKV(k, k[:, :4], np.zeros(2, np.int32))  # v shape differs
    with pytest.raises(TypeError):
        DenseKV(k, k.astype(np.float16), np.zeros(2, np.int32))  # v dtype differs
    with pytest.raises(ValueError):
        DenseKV(k, k, np.zeros(3, np.int32))  # one length per sequence
    with pytest.raises(TypeError):
        DenseKV(k, k, np.zeros(2, np.int64))  # lengths int32
    with pytest.raises(TypeError):
        DenseKV(k.astype(np.int32), k.astype(np.int32), np.zeros(2, np.int32))  # not a value dtype
    with pytest.raises(ValueError):
        DenseKV(k[0], k[0], np.zeros(2, np.int32))  # 3-d


# --- PagedKV mutations ---------------------------------------------------------------------------------

def _paged_in_use(case: DecodeCase) -> list[tuple[int, int]]:
    ps = case.kv.page_size
    return [(b, j) for b, n in enumerate(case.lengths) for j in range(cdiv(int(n), ps))]


@given(case=decode_cases(paged=True), data=st.data())
def test_paged_table_entry_in_use_out_of_range(case: DecodeCase, data: st.DataObject) -> None:
    in_use = _paged_in_use(case)
    kv = case.kv
    if in_use:
        b, j = data.draw(st.sampled_from(in_use))
        table = kv.page_table.copy()
        table[b, j] = data.draw(st.sampled_from([-1, -5, kv.num_pages, kv.num_pages + 3]))
        with pytest.raises(ValueError, match=rf"page_table\[{b}, {j}\]"):
            PagedKV(kv.k_pages, kv.v_pages, table, kv.lengths).validate()
    # entries past the pages in use are ignored, whatever they hold
    table = kv.page_table.copy()
    for b, n in enumerate(case.lengths):
        table[b, cdiv(int(n), kv.page_size):] = data.draw(st.sampled_from([-1, -7, kv.num_pages, 10**6]))
    PagedKV(kv.k_pages, kv.v_pages, table, kv.lengths).validate()


@given(case=decode_cases(paged=True), data=st.data())
def test_paged_length_out_of_range(case: DecodeCase, data: st.DataObject) -> None:
    kv = case.kv
    b = data.draw(st.integers(0, case.batch - 1))
    lengths = kv.lengths.copy()
    lengths[b] = data.draw(st.sampled_from([kv.max_len + 1, -1]))
    with pytest.raises(ValueError, match=rf"lengths\[{b}\]"):
        PagedKV(kv.k_pages, kv.v_pages, kv.page_table, lengths).validate()


def test_paged_length_growing_into_unmapped_page_is_caught() -> None:
    # |x x x x|x - - -| page 1 of seq 0 is -1 until the length says it is used
    case = EDGE_CASES["padded_table"]("float32")
    kv = case.kv
    lengths = kv.lengths.copy()
    used = cdiv(int(lengths[0]), kv.page_size)
    lengths[0] = used * kv.page_size + 1  # one token into the next, unmapped (-1) page
    assert kv.page_table[0, used] == -1
    with pytest.raises(ValueError, match=rf"page_table\[0, {used}\]"):
        PagedKV(kv.k_pages, kv.v_pages, kv.page_table, lengths).validate()


def test_paged_constructor_rejects_layouts() -> None:
    p = np.zeros((3, 4, 1, 2), np.float32)
    table = np.zeros((2, 2), np.int32)
    lengths = np.zeros(2, np.int32)
    with pytest.raises(ValueError):
        PagedKV(p, p[:, :2], table, lengths)
    with pytest.raises(ValueError):
        PagedKV(p[:, :0], p[:, :0], table, lengths)  # page_size 0
    with pytest.raises(TypeError):
        PagedKV(p, p, table.astype(np.int64), lengths)
    with pytest.raises(ValueError):
        PagedKV(p, p, table, np.zeros(3, np.int32))


# --- TopKIndex -----------------------------------------------------------------------------------------

@st.composite
def valid_indices(draw: st.DrawFn) -> tuple[DecodeCase, TopKIndex]:
    case = draw(decode_cases())
    groups = draw(st.sampled_from([case.hkv, case.hq]))
    ps = draw(st.sampled_from([None, 1, 3, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = random_rows(case, rng, groups=groups, page_size=ps, p=draw(st.sampled_from([0.2, 0.7, 1.0])))
    idx = index_from_rows(rows, k_max=draw(st.integers(0, 3)) + max(case.lengths.max(), 0),
                          granularity="token" if ps is None else "page", page_size=ps)
    return case, idx


@given(ci=valid_indices())
def test_topk_valid(ci: tuple[DecodeCase, TopKIndex]) -> None:
    case, idx = ci
    assert idx.validate() is idx
    assert idx.validate(case.kv.lengths) is idx
    assert idx.validate(case.kv) is idx  # a cache stands for its lengths
    assert idx.batch == case.batch and idx.groups in (case.hkv, case.hq)
    t = idx.map_arrays(torch.from_numpy)
    assert isinstance(t.indices, torch.Tensor) and t.validate(case.kv.lengths) is t


def _filled(idx: TopKIndex) -> list[tuple[int, int, int]]:
    return [(b, g, j) for b in range(idx.batch) for g in range(idx.groups) for j in range(int(idx.counts[b, g]))]


def _padding(idx: TopKIndex) -> list[tuple[int, int, int]]:
    return [(b, g, j) for b in range(idx.batch) for g in range(idx.groups)
            for j in range(int(idx.counts[b, g]), idx.k_max)]


def _copy(idx: TopKIndex, indices: np.ndarray | None = None, counts: np.ndarray | None = None) -> TopKIndex:
    return TopKIndex(idx.indices.copy() if indices is None else indices,
                     idx.counts.copy() if counts is None else counts, idx.granularity, idx.page_size)


@given(ci=valid_indices(), data=st.data())
def test_topk_mutations_caught(ci: tuple[DecodeCase, TopKIndex], data: st.DataObject) -> None:
    case, idx = ci
    filled, padding = _filled(idx), _padding(idx)
    units = case.lengths if idx.granularity == "token" else -(-case.lengths // idx.page_size)

    if padding:  # padding that is not -1
        b, g, j = data.draw(st.sampled_from(padding))
        ind = idx.indices.copy()
        ind[b, g, j] = data.draw(st.sampled_from([0, 5, -2]))
        with pytest.raises(ValueError, match=rf"indices\[{b}, {g}, {j}\]"):
            _copy(idx, indices=ind).validate()

    if filled:  # a negative selected index
        b, g, j = data.draw(st.sampled_from(filled))
        ind = idx.indices.copy()
        ind[b, g, j] = -1
        with pytest.raises(ValueError, match=rf"indices\[{b}, {g}, {j}\]"):
            _copy(idx, indices=ind).validate()

        # out of range for its sequence: caught only when the lengths are given
        b, g, j = data.draw(st.sampled_from(filled))
        ind = idx.indices.copy()
        ind[b, g, j] = int(units[b]) + data.draw(st.integers(0, 3))
        _copy(idx, indices=ind).validate()  # still unique (every other entry is < units[b])
        with pytest.raises(ValueError, match=rf"indices\[{b}, {g}, {j}\]"):
            _copy(idx, indices=ind).validate(case.kv.lengths)

    rows_2 = [(b, g) for b in range(idx.batch) for g in range(idx.groups) if idx.counts[b, g] >= 2]
    if rows_2:  # a duplicate
        b, g = data.draw(st.sampled_from(rows_2))
        c = int(idx.counts[b, g])
        i, j = data.draw(st.lists(st.integers(0, c - 1), min_size=2, max_size=2, unique=True))
        ind = idx.indices.copy()
        ind[b, g, j] = ind[b, g, i]
        with pytest.raises(ValueError, match=rf"row \[{b}, {g}\]"):
            _copy(idx, indices=ind).validate(case.kv.lengths)

    # counts out of [0, k_max]
    b = data.draw(st.integers(0, idx.batch - 1))
    g = data.draw(st.integers(0, idx.groups - 1))
    cnt = idx.counts.copy()
    cnt[b, g] = data.draw(st.sampled_from([-1, idx.k_max + 1]))
    with pytest.raises(ValueError, match=rf"counts\[{b}, {g}\]"):
        _copy(idx, counts=cnt).validate()


def test_topk_page_range_uses_ceil() -> None:
    # length 9, page_size 4: pages 0, 1, 2 exist (page 2 holds one token), page 3 does not
    lengths = np.array([9], np.int32)
    ok = TopKIndex(np.array([[[2, 0, 1]]], np.int32), np.array([[3]], np.int32), "page", 4)
    ok.validate(lengths)
    bad = TopKIndex(np.array([[[3, -1, -1]]], np.int32), np.array([[1]], np.int32), "page", 4)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 0\]"):
        bad.validate(lengths)
    # the same numbers as tokens are all in range
    TopKIndex(np.array([[[3, 8, -1]]], np.int32), np.array([[2]], np.int32)).validate(lengths)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 0\]"):
        TopKIndex(np.array([[[9]]], np.int32), np.array([[1]], np.int32)).validate(lengths)


def test_topk_empty_and_zero_width() -> None:
    z = TopKIndex(np.zeros((2, 3, 0), np.int32), np.zeros((2, 3), np.int32))
    assert z.validate(np.array([0, 4], np.int32)) is z and z.k_max == 0
    with pytest.raises(ValueError, match=r"counts\[1, 2\]"):
        TopKIndex(np.zeros((2, 3, 0), np.int32), np.array([[0, 0, 0], [0, 0, 1]], np.int32)).validate()


def test_topk_constructor_rejects_layouts() -> None:
    ind = np.full((1, 2, 3), -1, np.int32)
    cnt = np.zeros((1, 2), np.int32)
    with pytest.raises(ValueError):
        TopKIndex(ind, cnt[:, :1])
    with pytest.raises(TypeError):
        TopKIndex(ind.astype(np.int64), cnt)
    with pytest.raises(ValueError):
        TopKIndex(ind, cnt, "page")  # page needs page_size
    with pytest.raises(ValueError):
        TopKIndex(ind, cnt, "token", 4)  # page_size only for pages
    with pytest.raises(ValueError):
        TopKIndex(ind, cnt, "page", 0)
    with pytest.raises(ValueError):
        TopKIndex(ind, cnt, "block", 4)
    assert TopKIndex(ind, cnt, "page", np.int64(4)).page_size == 4
