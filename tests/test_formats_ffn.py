"""Host tier: the TiledELL and CSR formats and every conversion between dense, TiledELL, CSR,
scipy.sparse and torch sparse CSR. Round trips must be exact (bit for bit, in every value dtype).

The oracle for each conversion is a plain loop builder in ``strategies_ffn`` or SciPy, never the
conversion code itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecore as sc
from tests.strategies_ffn import (
    DTYPES,
    FACTORIES,
    SparseCase,
    build_tiled_ell,
    case_id,
    expected_slots,
    factory_cases,
    np_dtype,
    one_full_row,
    sparse_cases,
)

FACTORY_CASES = factory_cases()
torch_csr_warnings = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning",
                                                "ignore:Sparse invariant checks:UserWarning")


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a value array, so exact comparison also distinguishes -0.0 and NaN payloads."""
    a = np.ascontiguousarray(a)
    return a.view({8: np.uint64, 4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


def host(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.dtype == torch.bfloat16:
            return a.view(torch.int16).numpy().view(np_dtype("bfloat16"))
        return a.numpy()
    return np.asarray(a)


def assert_same_values(actual, expected, what: str) -> None:
    actual, expected = host(actual), host(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = bits(actual) != bits(expected)
    assert not bad.any(), (f"{what}: {int(bad.sum())} values differ; first at {np.argwhere(bad)[0].tolist()}: "
                           f"{actual[bad][0]!r} != {expected[bad][0]!r}")


def assert_same_csr(actual: sc.CSR, expected: sc.CSR, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_array_equal(host(actual.indptr).astype(np.int64), host(expected.indptr).astype(np.int64),
                                  err_msg=f"{what}: indptr")
    np.testing.assert_array_equal(host(actual.indices).astype(np.int64), host(expected.indices).astype(np.int64),
                                  err_msg=f"{what}: indices")
    assert_same_values(actual.data, expected.data, f"{what}: data")


def assert_same_tiled_ell(actual: sc.TiledELL, expected: sc.TiledELL, what: str) -> None:
    assert (actual.shape, actual.tile, actual.capacity) == (expected.shape, expected.tile, expected.capacity), what
    np.testing.assert_array_equal(host(actual.counts), host(expected.counts), err_msg=f"{what}: counts")
    np.testing.assert_array_equal(host(actual.cols), host(expected.cols), err_msg=f"{what}: cols")
    assert host(actual.cols).dtype == np.int16 and host(actual.counts).dtype == np.int32, what
    assert_same_values(actual.values, expected.values, f"{what}: values")
    assert (actual.overflow is None) == (expected.overflow is None), \
        f"{what}: overflow is {actual.overflow} but expected {expected.overflow}"
    if expected.overflow is not None:
        assert_same_csr(actual.overflow, expected.overflow, f"{what}: overflow")


# ---------------------------------------------------------------------------------------------
# The loop builder itself: the oracle must hold what the DESIGN says, independently of validate().


def check_builder(case: SparseCase) -> None:
    te = case.tiled_ell()
    m, k = case.shape
    nt = -(-k // case.tile)
    assert te.values.shape == (m, nt, case.capacity)
    slots, over = expected_slots(case.dense, case.tile, case.capacity)
    n_slot = sum(len(c) for *_, c in slots)
    n_over = sum(len(c) for *_, c in over)
    assert n_slot + n_over == int(case.mask.sum())  # nothing dropped
    assert (te.counts <= case.capacity).all()
    assert n_over == (0 if te.overflow is None else te.overflow.nnz)


# ---------------------------------------------------------------------------------------------
# Constructors and validate() accept valid data; dense <-> TiledELL is exact.


def check_tiled_ell_from_dense(case: SparseCase) -> None:
    check_builder(case)
    te = sc.tiled_ell_from_dense(case.dense, tile=case.tile, capacity=case.capacity)
    assert te.validate() is te
    assert te.dtype == case.dtype and te.shape == case.shape and te.sorted
    assert_same_tiled_ell(te, case.tiled_ell(), "tiled_ell_from_dense")
    assert_same_values(sc.tiled_ell_to_dense(te), case.dense, "tiled_ell_to_dense(tiled_ell_from_dense)")


def check_tiled_ell_to_dense(case: SparseCase, seed: int) -> None:
    """Any valid TiledELL of the matrix, sorted or not, unpacks to it."""
    for sorted_ in (True, False):
        te = case.tiled_ell(sorted=sorted_, rng=np.random.default_rng(seed))
        assert te.validate() is te
        assert_same_values(sc.tiled_ell_to_dense(te), case.dense, f"tiled_ell_to_dense(sorted={sorted_})")


@pytest.mark.parametrize("case", FACTORY_CASES, ids=case_id)
def test_tiled_ell_from_dense_factories(case: SparseCase) -> None:
    check_tiled_ell_from_dense(case)
    check_tiled_ell_to_dense(case, 0)


@given(case=sparse_cases(), seed=st.integers(0, 2**16))
def test_tiled_ell_from_dense_property(case: SparseCase, seed: int) -> None:
    check_tiled_ell_from_dense(case)
    check_tiled_ell_to_dense(case, seed)


def test_tiled_ell_default_geometry() -> None:
    """Default tile 256 and capacity tile // 8 = 32: 40 entries in one tile put 8 in the overflow."""
    x = np.zeros((2, 300), np.float32)
    x[0, :40] = np.arange(1, 41)
    x[1, 299] = -1
    te = sc.tiled_ell_from_dense(x)
    assert (te.tile, te.capacity, te.n_tiles) == (256, 32, 2)
    assert te.counts.tolist() == [[32, 0], [0, 1]]
    assert te.overflow is not None and te.overflow.nnz == 8
    assert te.validate() is te
    assert_same_values(sc.tiled_ell_to_dense(te), x, "default geometry")


# ---------------------------------------------------------------------------------------------
# CSR, and TiledELL <-> CSR.


def check_csr(case: SparseCase, seed: int) -> None:
    c = sc.csr_from_dense(case.dense)
    assert c.validate() is c
    assert c.dtype == case.dtype and c.shape == case.shape and c.sorted
    ref = sp.csr_matrix(case.dense64)  # float64 holds every value of every dtype exactly
    ref.sort_indices()
    np.testing.assert_array_equal(c.indptr.astype(np.int64), ref.indptr, err_msg="csr_from_dense indptr vs scipy")
    np.testing.assert_array_equal(c.indices.astype(np.int64), ref.indices, err_msg="csr_from_dense indices")
    np.testing.assert_array_equal(c.data.astype(np.float64), ref.data, err_msg="csr_from_dense data")
    assert_same_csr(c, case.csr(), "csr_from_dense vs loop builder")
    assert_same_values(sc.csr_to_dense(c), case.dense, "csr_to_dense(csr_from_dense)")
    unsorted = case.csr(sorted=False, rng=np.random.default_rng(seed))
    assert unsorted.validate() is unsorted
    assert_same_values(sc.csr_to_dense(unsorted), case.dense, "csr_to_dense(unsorted)")

    # TiledELL <-> CSR, sorted or not on either side
    te = case.tiled_ell()
    assert_same_csr(sc.tiled_ell_to_csr(te), case.csr(), "tiled_ell_to_csr")
    shuffled = case.tiled_ell(sorted=False, rng=np.random.default_rng(seed))
    back = sc.tiled_ell_to_csr(shuffled)
    assert back.validate() is back
    assert_same_csr(back, case.csr(), "tiled_ell_to_csr(unsorted TiledELL)")
    for src in (c, unsorted):
        te2 = sc.csr_to_tiled_ell(src, tile=case.tile, capacity=case.capacity)
        assert te2.validate() is te2
        assert_same_tiled_ell(te2, te, f"csr_to_tiled_ell(sorted={src.sorted})")


@pytest.mark.parametrize("case", FACTORY_CASES, ids=case_id)
def test_csr_factories(case: SparseCase) -> None:
    check_csr(case, 0)


@given(case=sparse_cases(), seed=st.integers(0, 2**16))
def test_csr_property(case: SparseCase, seed: int) -> None:
    check_csr(case, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_explicit_zero_is_an_entry(dtype: str) -> None:
    """An explicitly stored 0 in a CSR is an entry and stays one through csr_to_tiled_ell (it uses a
    slot), and its position still unpacks to 0.

        . 0 x    (0 = stored zero)
    """
    dt = np_dtype(dtype)
    c = sc.CSR(np.array([0, 2], np.int32), np.array([1, 2], np.int32), np.array([0, 3], dt), (1, 3))
    te = sc.csr_to_tiled_ell(c.validate(), tile=2, capacity=1)
    assert te.validate() is te
    assert te.counts.tolist() == [[1, 1]]
    assert te.cols.tolist() == [[[1], [0]]]
    assert_same_values(sc.tiled_ell_to_dense(te), np.array([[0, 0, 3]], dt), "explicit zero")
    assert_same_csr(sc.tiled_ell_to_csr(te), c, "explicit zero back to CSR")


# ---------------------------------------------------------------------------------------------
# scipy.sparse and torch sparse CSR.

SCIPY_DTYPES = ("float64", "float32")


def check_scipy(case: SparseCase) -> None:
    s = sc.csr_to_scipy(case.csr())
    assert sp.issparse(s) and s.format == "csr" and s.shape == case.shape and s.dtype == case.dense.dtype
    assert_same_values(s.toarray(), case.dense, "csr_to_scipy(...).toarray()")
    c = sc.csr_from_scipy(sp.csr_matrix(case.dense))
    assert c.validate() is c
    assert_same_csr(c, case.csr(), "csr_from_scipy(csr_matrix(dense))")
    # any scipy format, with unsorted indices
    coo = sp.coo_matrix(case.dense)
    perm = np.random.default_rng(case.seed).permutation(coo.nnz)
    shuffled = sp.coo_matrix((coo.data[perm], (coo.row[perm], coo.col[perm])), shape=case.shape)
    c2 = sc.csr_from_scipy(shuffled)
    assert c2.validate() is c2
    assert_same_values(sc.csr_to_dense(c2), case.dense, "csr_from_scipy(shuffled coo)")
    # a scipy CSR whose rows really are unsorted: the CSR must say so (and still validate)
    u = case.csr(sorted=False, rng=np.random.default_rng(case.seed))
    s_u = sp.csr_matrix((u.data, u.indices, u.indptr), shape=case.shape)
    c3 = sc.csr_from_scipy(s_u)
    if not s_u.has_sorted_indices:
        assert not c3.sorted, "csr_from_scipy of a CSR with unsorted rows claims sorted=True"
    assert c3.validate() is c3
    assert_same_values(sc.csr_to_dense(sc.csr_from_scipy(sc.csr_to_scipy(c3))), case.dense,
                       "scipy round trip of an unsorted CSR")


@pytest.mark.parametrize("case", factory_cases(SCIPY_DTYPES), ids=case_id)
def test_scipy_factories(case: SparseCase) -> None:
    check_scipy(case)


@given(case=sparse_cases(SCIPY_DTYPES))
def test_scipy_property(case: SparseCase) -> None:
    check_scipy(case)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_csr_to_scipy_unsupported_dtype_raises(dtype: str) -> None:
    """scipy.sparse has no bfloat16 and no float16: refuse at conversion, not at first use."""
    with pytest.raises(TypeError, match=dtype):
        sc.csr_to_scipy(one_csr(dtype))


def one_csr(dtype: str) -> sc.CSR:
    return sc.CSR(np.array([0, 1], np.int32), np.array([0], np.int32), np.array([1.5], np_dtype(dtype)), (1, 2))


def torch_dense(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np_dtype("bfloat16"):
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)  # exact: bf16 -> f32 -> bf16
    return torch.from_numpy(a.copy())


def check_torch(case: SparseCase) -> None:
    t = sc.csr_to_torch(case.csr())
    assert t.layout == torch.sparse_csr and tuple(t.shape) == case.shape
    want = torch_dense(case.dense)
    assert t.dtype == want.dtype
    assert_same_values(t.to_dense(), want, "csr_to_torch(...).to_dense()")
    c = sc.csr_from_torch(want.to_sparse_csr())
    assert c.validate() is c
    assert c.shape == case.shape and c.dtype == case.dtype
    assert_same_values(sc.csr_to_dense(c), case.dense, "csr_from_torch(dense.to_sparse_csr())")
    assert_same_tiled_ell(sc.csr_to_tiled_ell(c, tile=case.tile, capacity=case.capacity), case.tiled_ell(),
                          "csr_to_tiled_ell(csr_from_torch(...))")


@torch_csr_warnings
@pytest.mark.parametrize("case", factory_cases(DTYPES), ids=case_id)
def test_torch_factories(case: SparseCase) -> None:
    check_torch(case)


@torch_csr_warnings
@given(case=sparse_cases())
def test_torch_property(case: SparseCase) -> None:
    check_torch(case)


def test_csr_from_torch_rejects_dense() -> None:
    with pytest.raises(TypeError, match="csr_from_torch"):
        sc.csr_from_torch(torch.zeros(2, 2))


def test_csr_from_scipy_rejects_dense() -> None:
    with pytest.raises(TypeError, match="csr_from_scipy"):
        sc.csr_from_scipy(np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------
# validate() catches broken invariants. Each mutation starts from a valid format and breaks one
# thing; the unmutated format must validate (so the test fails if the base case is wrong).


def base_tiled_ell() -> sc.TiledELL:
    """one_full_row in float32: overflow present, partial last tile (K = 10, tile 4, capacity 2)."""
    te = build_tiled_ell(one_full_row("float32").dense, 4, 2)
    assert te.overflow is not None and te.validate() is te
    return te


def mutated(te: sc.TiledELL, **arrays) -> sc.TiledELL:
    return dataclasses.replace(te, **arrays)


def _counts_over_capacity(te):
    counts = te.counts.copy()
    counts[0, 0] = te.capacity + 1
    return mutated(te, counts=counts)


def _negative_count(te):
    counts = te.counts.copy()
    counts[2, 0] = -1
    return mutated(te, counts=counts)


def _col_past_partial_tile(te):
    cols = te.cols.copy()  # row 1, last tile (width 2), slot 1: offset 2 is column 10 = K
    cols[1, 2, 1] = 2
    return mutated(te, cols=cols)


def _padding_value(te):
    values = te.values.copy()  # row 0, tile 0 has one filled slot; slot 1 is padding
    values[0, 0, 1] = 1.0
    return mutated(te, values=values)


def _padding_col(te):
    cols = te.cols.copy()
    cols[0, 0, 1] = 3
    return mutated(te, cols=cols)


def _descending_slots(te):
    cols, values = te.cols.copy(), te.values.copy()
    cols[1, 0] = cols[1, 0, ::-1]
    values[1, 0] = values[1, 0, ::-1]
    return mutated(te, cols=cols, values=values)


def _duplicate_slots_unsorted(te):
    cols = te.cols.copy()
    cols[1, 1, 1] = cols[1, 1, 0]
    return mutated(te, cols=cols, sorted=False)


def _overflow_in_unfull_tile(te):
    counts, values, cols = te.counts.copy(), te.values.copy(), te.cols.copy()
    counts[1, 0] = 1  # row 1 tile 0 drops a slot; its overflow entries now belong to a non-full tile
    values[1, 0, 1], cols[1, 0, 1] = 0, 0
    return mutated(te, counts=counts, values=values, cols=cols)


def _overflow_duplicates_slot(te):
    ov = te.overflow
    indices = ov.indices.copy()
    indices[0] = 0  # row 1's first overflow entry (column 2) now names column 0, already in a slot
    return mutated(te, overflow=dataclasses.replace(ov, indices=indices))


def _overflow_broken_csr(te):
    ov = te.overflow
    indices = ov.indices.copy()
    indices[-1] = te.shape[1]  # out of range
    return mutated(te, overflow=dataclasses.replace(ov, indices=indices))


TILED_ELL_MUTATIONS = [_counts_over_capacity, _negative_count, _col_past_partial_tile, _padding_value, _padding_col,
                       _descending_slots, _duplicate_slots_unsorted, _overflow_in_unfull_tile,
                       _overflow_duplicates_slot, _overflow_broken_csr]


@pytest.mark.parametrize("mutate", TILED_ELL_MUTATIONS, ids=lambda f: f.__name__.strip("_"))
def test_tiled_ell_validate_catches(mutate) -> None:
    te = mutate(base_tiled_ell())  # the constructor (cheap checks) accepts it ...
    with pytest.raises(ValueError, match="TiledELL.validate|CSR.validate"):
        te.validate()  # ... validate() does not


def test_tiled_ell_unsorted_flag_accepts_any_slot_order() -> None:
    te = base_tiled_ell()
    cols, values = te.cols.copy(), te.values.copy()
    cols[1, 0], values[1, 0] = cols[1, 0, ::-1], values[1, 0, ::-1]
    shuffled = mutated(te, cols=cols, values=values, sorted=False)
    assert shuffled.validate() is shuffled
    assert_same_values(sc.tiled_ell_to_dense(shuffled), sc.tiled_ell_to_dense(te), "unsorted slots")


def base_csr() -> sc.CSR:
    """3 x 5::

        . x . x .
        . . . . .
        x x . . x
    """
    c = sc.CSR(np.array([0, 2, 2, 5], np.int32), np.array([1, 3, 0, 1, 4], np.int32),
               np.arange(1, 6, dtype=np.float32), (3, 5))
    assert c.validate() is c
    return c


CSR_MUTATIONS = {
    "indptr_starts_nonzero": lambda c: dataclasses.replace(c, indptr=np.array([1, 2, 2, 5], np.int32)),
    "indptr_decreases": lambda c: dataclasses.replace(c, indptr=np.array([0, 3, 2, 5], np.int32)),
    "indptr_end_not_nnz": lambda c: dataclasses.replace(c, indptr=np.array([0, 2, 2, 4], np.int32)),
    "index_out_of_range": lambda c: dataclasses.replace(c, indices=np.array([1, 5, 0, 1, 4], np.int32)),
    "negative_index": lambda c: dataclasses.replace(c, indices=np.array([1, 3, -1, 1, 4], np.int32)),
    "descending_when_sorted": lambda c: dataclasses.replace(c, indices=np.array([3, 1, 0, 1, 4], np.int32)),
    "duplicate_when_sorted": lambda c: dataclasses.replace(c, indices=np.array([1, 1, 0, 1, 4], np.int32)),
    "duplicate_when_unsorted": lambda c: dataclasses.replace(c, indices=np.array([1, 3, 4, 0, 4], np.int32),
                                                             sorted=False),
}


@pytest.mark.parametrize("name", list(CSR_MUTATIONS))
def test_csr_validate_catches(name: str) -> None:
    c = CSR_MUTATIONS[name](base_csr())
    with pytest.raises(ValueError, match="CSR.validate"):
        c.validate()


def test_csr_unsorted_flag_accepts_any_row_order() -> None:
    c = dataclasses.replace(base_csr(), indices=np.array([3, 1, 4, 0, 1], np.int32), sorted=False)
    assert c.validate() is c
    assert_same_values(sc.csr_to_dense(c), np.array([[0, 2, 0, 1, 0], [0] * 5, [4, 5, 0, 0, 3]], np.float32),
                       "unsorted CSR")


@pytest.mark.parametrize("build", [
    lambda: sc.TiledELL(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int32), np.zeros((1, 1), np.int32),
                        (1, 4), 4),
    lambda: sc.TiledELL(np.zeros((1, 1, 1), np.int32), np.zeros((1, 1, 1), np.int16), np.zeros((1, 1), np.int32),
                        (1, 4), 4),
    lambda: sc.TiledELL(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int16), np.zeros((1, 1), np.int32),
                        (1, 4), 4, overflow=sc.CSR(np.zeros(2, np.int32), np.zeros(0, np.int32),
                                                   np.zeros(0, np.float16), (1, 4))),
    lambda: sc.CSR(np.zeros(2, np.int32), np.zeros(0, np.int16), np.zeros(0, np.float32), (1, 4)),
], ids=["cols_int32", "values_int32", "overflow_dtype", "indices_int16"])
def test_constructor_rejects_wrong_dtypes(build) -> None:
    with pytest.raises(TypeError):
        build()


@pytest.mark.parametrize("build", [
    lambda: sc.TiledELL(np.zeros((1, 2, 1), np.float32), np.zeros((1, 2, 1), np.int16), np.zeros((1, 2), np.int32),
                        (1, 4), 4),  # n_tiles must be ceil(4 / 4) = 1
    lambda: sc.TiledELL(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int16), np.zeros((1, 1), np.int32),
                        (1, 6), 6),  # tile not a power of two
    lambda: sc.TiledELL(np.zeros((1, 1, 3), np.float32), np.zeros((1, 1, 3), np.int16), np.zeros((1, 1), np.int32),
                        (1, 2), 2),  # capacity 3 > tile 2
    lambda: sc.CSR(np.zeros(3, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), (1, 4)),
], ids=["n_tiles", "tile_not_pow2", "capacity_over_tile", "indptr_length"])
def test_constructor_rejects_wrong_shapes(build) -> None:
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_factory_pictures_match_their_matrices(factory) -> None:
    """Each factory's docstring picture is the matrix it builds (x = entry, . = zero, | = tile edge)."""
    case = factory("float32")
    rows = [ln.split() for ln in factory.__doc__.split("::", 1)[1].strip().splitlines()]
    if case.dense.size == 0:
        assert "[ ]" in factory.__doc__
        return
    pic = np.array([[c == "x" for c in r if c != "|"] for r in rows], dtype=bool)
    np.testing.assert_array_equal(pic, case.mask, err_msg=factory.__name__)
    assert all(r.count("|") == -(-case.shape[1] // case.tile) - 1 for r in rows), f"{factory.__name__}: tile edges"
