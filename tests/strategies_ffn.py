"""Hypothesis strategies and named edge-case factories for the activation-sparse FFN formats.

A :class:`SparseCase` is a dense matrix ``[M, K]`` in one value dtype plus the TiledELL geometry
(``tile``, ``capacity``) to pack it with. The named factories (:data:`FACTORIES`) are the edge cases
every property must see; each docstring draws its matrix (``x`` = a stored entry, ``.`` = zero,
``|`` = a tile boundary). :func:`sparse_cases` draws random cases of the same kind.

The builders here (:func:`build_tiled_ell`, :func:`build_csr`) are deliberately plain Python loops,
independent of ``sparsecore.formats.convert``: they are the oracle for the conversions and give the
op tests inputs that do not depend on the code under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from sparsecore import CSR, TiledELL

DTYPES: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")
TORCH_DTYPES: tuple[str, ...] = ("float32", "bfloat16")

_NP = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
       "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def np_dtype(name: str) -> np.dtype:
    return _NP[name]


def dtype_of(a: np.ndarray) -> str:
    return np.dtype(a.dtype).name


def random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Standard-normal values rounded to ``dtype`` (what a low-precision array really stores)."""
    return rng.standard_normal(shape).astype(np_dtype(dtype))


def nonzero_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Like :func:`random_values` but never zero after rounding (so the pattern is the mask)."""
    v = rng.standard_normal(shape)
    v = np.where(np.abs(v) < 0.05, np.copysign(0.5, v), v)
    return v.astype(np_dtype(dtype))


@dataclass(frozen=True, eq=False)
class SparseCase:
    name: str
    dense: np.ndarray  # [M, K] in the value dtype; every non-zero is a stored entry
    tile: int
    capacity: int
    seed: int = 0

    @property
    def dtype(self) -> str:
        return dtype_of(self.dense)

    @property
    def shape(self) -> tuple[int, int]:
        m, k = self.dense.shape
        return int(m), int(k)

    @property
    def dense64(self) -> np.ndarray:
        return self.dense.astype(np.float64)

    @property
    def mask(self) -> np.ndarray:
        return self.dense != 0

    def tiled_ell(self, *, sorted: bool = True, rng: np.random.Generator | None = None) -> TiledELL:
        return build_tiled_ell(self.dense, self.tile, self.capacity, sorted=sorted, rng=rng)

    def csr(self, *, sorted: bool = True, rng: np.random.Generator | None = None) -> CSR:
        return build_csr(self.dense, sorted=sorted, rng=rng)

    def __repr__(self) -> str:
        body = f"{self.name}, shape={self.shape}, dtype={self.dtype}, tile={self.tile}, capacity={self.capacity}"
        if self.name == "random":
            body += f", seed={self.seed}"
        if self.dense.size <= 64:
            body += f", dense={self.dense64.tolist()}"
        return f"SparseCase({body})"

    __str__ = __repr__


# ---------------------------------------------------------------------------------------------
# Independent builders (plain loops): the oracle for the conversions.


def expected_slots(dense: np.ndarray, tile: int, capacity: int, keep: np.ndarray | None = None
                   ) -> tuple[list, list]:
    """Per (row, tile): the kept global columns in ascending order, split into (slots, overflow)
    lists of ``(row, tile, [columns])``."""
    m, k = dense.shape
    keep = dense != 0 if keep is None else keep
    slots, over = [], []
    for r in range(m):
        for t in range(-(-k // tile)):
            cols = [c for c in range(t * tile, min(k, (t + 1) * tile)) if keep[r, c]]
            slots.append((r, t, cols[:capacity]))
            over.append((r, t, cols[capacity:]))
    return slots, over


def build_csr_from_lists(rows: list[int], cols: list[int], vals: list, shape: tuple[int, int], dtype: np.dtype,
                         *, sorted: bool = True) -> CSR:
    """CSR of entries given row by row (the caller keeps rows grouped and in order)."""
    indptr = np.zeros(shape[0] + 1, np.int32)
    for r in rows:
        indptr[r + 1] += 1
    indptr = np.cumsum(indptr).astype(np.int32)
    return CSR(indptr, np.array(cols, np.int32), np.array(vals, dtype=dtype).reshape(-1), shape, sorted=sorted)


def build_tiled_ell(dense: np.ndarray, tile: int, capacity: int, *, keep: np.ndarray | None = None,
                    sorted: bool = True, rng: np.random.Generator | None = None) -> TiledELL:
    """TiledELL of ``dense`` at ``keep`` (default: non-zeros), by loops. ``sorted=False`` shuffles
    the filled slots of every tile with ``rng`` (a valid unsorted TiledELL of the same matrix)."""
    m, k = dense.shape
    nt = -(-k // tile)
    values = np.zeros((m, nt, capacity), dense.dtype)
    cols = np.zeros((m, nt, capacity), np.int16)
    counts = np.zeros((m, nt), np.int32)
    slots, over = expected_slots(dense, tile, capacity, keep)
    for r, t, cs in slots:
        if not sorted and rng is not None:
            cs = list(rng.permutation(cs)) if cs else cs
        for s, c in enumerate(cs):
            values[r, t, s] = dense[r, c]
            cols[r, t, s] = c - t * tile
        counts[r, t] = len(cs)
    orows, ocols, ovals = [], [], []
    for r, _, cs in over:
        for c in cs:
            orows.append(r)
            ocols.append(c)
            ovals.append(dense[r, c])
    overflow = build_csr_from_lists(orows, ocols, ovals, (m, k), dense.dtype) if orows else None
    return TiledELL(values, cols, counts, (m, k), tile, overflow, sorted=sorted)


def build_csr(dense: np.ndarray, *, sorted: bool = True, rng: np.random.Generator | None = None) -> CSR:
    """CSR of the non-zeros of ``dense``, by loops; ``sorted=False`` shuffles each row with ``rng``."""
    m, k = dense.shape
    rows, cols, vals = [], [], []
    for r in range(m):
        cs = [c for c in range(k) if dense[r, c] != 0]
        if not sorted and rng is not None and cs:
            cs = [int(c) for c in rng.permutation(cs)]
        rows += [r] * len(cs)
        cols += cs
        vals += [dense[r, c] for c in cs]
    return build_csr_from_lists(rows, cols, vals, (m, k), dense.dtype, sorted=sorted)


# ---------------------------------------------------------------------------------------------
# Named edge cases. Each takes a dtype name and returns a SparseCase.


def _from_picture(name: str, picture: str, dtype: str, tile: int, capacity: int, seed: int) -> SparseCase:
    rows = [r.replace("|", "").split() for r in picture.strip().splitlines()]
    mask = np.array([[c == "x" for c in r] for r in rows], dtype=bool)
    vals = nonzero_values(np.random.default_rng(seed), mask.shape, dtype)
    return SparseCase(name, np.where(mask, vals, np.zeros((), vals.dtype)), tile, capacity, seed)


def zero_by_zero(dtype: str) -> SparseCase:
    """M = 0, K = 0 (tile 4, capacity 1): the empty matrix, n_tiles = 0::

        [ ]
    """
    return SparseCase("zero_by_zero", np.zeros((0, 0), np_dtype(dtype)), 4, 1)


def no_rows(dtype: str) -> SparseCase:
    """M = 0, K = 7 (tile 4, capacity 2): no tokens, two tiles::

        [ ]  shape (0, 7)
    """
    return SparseCase("no_rows", np.zeros((0, 7), np_dtype(dtype)), 4, 2)


def no_cols(dtype: str) -> SparseCase:
    """M = 3, K = 0 (tile 8, capacity 1): rows with no columns, n_tiles = 0::

        [ ]
        [ ]
        [ ]
    """
    return SparseCase("no_cols", np.zeros((3, 0), np_dtype(dtype)), 8, 1)


def all_zero(dtype: str) -> SparseCase:
    """3 x 8, tile 4, capacity 2: shaped but holding nothing; every count is 0::

        . . . . | . . . .
        . . . . | . . . .
        . . . . | . . . .
    """
    return SparseCase("all_zero", np.zeros((3, 8), np_dtype(dtype)), 4, 2)


def empty_rows(dtype: str) -> SparseCase:
    """4 x 8, tile 4, capacity 2: rows 0 and 2 are empty, the others fit their slots::

        . . . . | . . . .
        x . . x | . x . .
        . . . . | . . . .
        . x . . | . . x x
    """
    pic = """
        . . . . | . . . .
        x . . x | . x . .
        . . . . | . . . .
        . x . . | . . x x
    """
    return _from_picture("empty_rows", pic, dtype, 4, 2, 11)


def one_full_row(dtype: str) -> SparseCase:
    """3 x 10, tile 4, capacity 2: row 1 is dense, so each of its tiles (the partial last one too)
    sends entries to the overflow::

        . x . . | . . . . | . .
        x x x x | x x x x | x x
        . . . . | x . . . | . x
    """
    pic = """
        . x . . | . . . . | . .
        x x x x | x x x x | x x
        . . . . | x . . . | . x
    """
    return _from_picture("one_full_row", pic, dtype, 4, 2, 12)


def tile_over_capacity(dtype: str) -> SparseCase:
    """2 x 16, tile 8, capacity 2: tile 0 of row 0 holds 5 entries, 3 overflow; row 1 fits::

        x . x x . . x x | . . . . . . . x
        . . . x . . . . | x . . . . . x .
    """
    pic = """
        x . x x . . x x | . . . . . . . x
        . . . x . . . . | x . . . . . x .
    """
    return _from_picture("tile_over_capacity", pic, dtype, 8, 2, 13)


def partial_last_tile(dtype: str) -> SparseCase:
    """3 x 11, tile 4, capacity 2: K is not a multiple of tile; the last tile has 3 columns and
    holds the last column K - 1 = 10 (and overflows in row 2)::

        x . . . | . . x . | . . x
        . . . . | . . . . | x . .
        . . . x | . . . . | x x x
    """
    pic = """
        x . . . | . . x . | . . x
        . . . . | . . . . | x . .
        . . . x | . . . . | x x x
    """
    return _from_picture("partial_last_tile", pic, dtype, 4, 2, 14)


def tile2_capacity1(dtype: str) -> SparseCase:
    """3 x 5, tile 2, capacity 1: the smallest geometry; every full pair overflows one entry::

        x x | . x | x
        . . | x x | .
        x . | . . | x
    """
    pic = """
        x x | . x | x
        . . | x x | .
        x . | . . | x
    """
    return _from_picture("tile2_capacity1", pic, dtype, 2, 1, 15)


def capacity_equals_tile(dtype: str) -> SparseCase:
    """3 x 8, tile 4, capacity 4: dense, yet nothing overflows (every slot filled)::

        x x x x | x x x x
        x x x x | x x x x
        x x x x | x x x x
    """
    pic = """
        x x x x | x x x x
        x x x x | x x x x
        x x x x | x x x x
    """
    return _from_picture("capacity_equals_tile", pic, dtype, 4, 4, 16)


def single_element(dtype: str) -> SparseCase:
    """1 x 1, tile 2, capacity 1: one stored entry in a partial tile::

        x
    """
    return _from_picture("single_element", "x", dtype, 2, 1, 17)


FACTORIES: tuple[Callable[[str], SparseCase], ...] = (
    zero_by_zero, no_rows, no_cols, all_zero, empty_rows, one_full_row, tile_over_capacity,
    partial_last_tile, tile2_capacity1, capacity_equals_tile, single_element,
)


def factory_cases(dtypes: tuple[str, ...] = DTYPES) -> list[SparseCase]:
    """Every named edge case in every dtype: the explicit examples beside each ``@given``."""
    return [f(dt) for f in FACTORIES for dt in dtypes]


def case_id(case: SparseCase) -> str:
    return f"{case.name}-{case.dtype}"


# ---------------------------------------------------------------------------------------------
# Random cases.

TILES = (2, 4, 8, 16, 32)


@st.composite
def sparse_cases(draw: st.DrawFn, dtypes: tuple[str, ...] = DTYPES, max_m: int = 12, max_k: int = 80
                 ) -> SparseCase:
    """A random SparseCase: shape, geometry and structure drawn by hypothesis (density, a forced full
    row, a forced over-full tile), values from a seeded generator."""
    dtype = draw(st.sampled_from(dtypes))
    m = draw(st.integers(0, max_m))
    k = draw(st.integers(0, max_k))
    tile = draw(st.sampled_from(TILES))
    capacity = draw(st.one_of(st.integers(1, min(tile, 3)), st.integers(1, tile)))
    density = draw(st.sampled_from((0.0, 0.05, 0.2, 0.5, 0.9, 1.0)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random((m, k)) < density
    if m and k and draw(st.booleans()):
        mask[draw(st.integers(0, m - 1))] = True  # one full row
    if m and k and draw(st.booleans()):
        r = draw(st.integers(0, m - 1))
        t = draw(st.integers(0, (k - 1) // tile))
        mask[r, t * tile:(t + 1) * tile] = True  # a tile over capacity (unless capacity == width)
    vals = nonzero_values(rng, (m, k), dtype)
    return SparseCase("random", np.where(mask, vals, np.zeros((), vals.dtype)), tile, capacity, seed)
