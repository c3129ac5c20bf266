"""KV caches for decode attention.

``DenseKV`` buffers:

- ``k[B, S, Hkv, D]``, ``v[B, S, Hkv, D]`` value dtype: token ``t`` of sequence ``b`` is ``k[b, t]``.
- ``lengths[B]`` int32: ``0 <= lengths[b] <= S``; positions ``>= lengths[b]`` are never read.

``PagedKV`` buffers (NHD, the layout of FlashInfer and vLLM, so their caches pass without a copy):

- ``k_pages[P, page_size, Hkv, D]``, ``v_pages[P, page_size, Hkv, D]`` value dtype.
- ``page_table[B, max_pages]`` int32: token ``t`` of sequence ``b`` lives in physical page
  ``page_table[b, t // page_size]`` at row ``t % page_size``. Only the first
  ``ceil(lengths[b] / page_size)`` entries of a row are read; they must be ``0 <= id < P``; the rest
  are ignored (use -1). Pages may be shared between sequences.
- ``lengths[B]`` int32: ``0 <= lengths[b] <= max_pages * page_size``.

``PageBounds`` buffers (Quest metadata of a cache: what ``select_topk(method="quest")`` reads instead
of the keys; built and kept up to date by :func:`sparsecore.page_bounds`):

- ``kmin[B, P, Hkv, D]``, ``kmax[B, P, Hkv, D]`` the keys' dtype: ``kmin[b, j, h, i]`` is the smallest
  (``kmax``: the largest) ``K[b, t, h, i]`` over the tokens ``j * page_size <= t < min((j + 1) *
  page_size, lengths[b])`` of logical page ``j`` of sequence ``b`` (min and max of stored values are
  exact in the stored dtype). ``P >= ceil(max_len / page_size)``; pages at or past
  ``ceil(lengths[b] / page_size)`` are never read. 2 / page_size of the keys' bytes.
- ``page_size`` int >= 1: tokens per logical page (the Quest unit; need not equal a PagedKV's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._arrays import VALUE_DTYPES, dtype_name, to_host
from .._checks import check_dtype, check_ndim, check_same_dtype, fail
from . import _fastcheck, _summary


def _check_lengths(w: str, lengths: Any, batch: int) -> None:
    check_ndim(w, "lengths", lengths, 1, "[B]")
    check_dtype(w, "lengths", lengths, ("int32",))
    if lengths.shape[0] != batch:
        fail(w, f"lengths has shape {tuple(lengths.shape)}; expected ({batch},), one per sequence")


def _check_value_pair(w: str, first: tuple[str, Any], second: tuple[str, Any], dims: str) -> None:
    """Two 4-D value buffers of one shape and one value dtype (K and V, kmin and kmax)."""
    (na, a), (nb, b) = first, second
    check_ndim(w, na, a, 4, dims)
    check_ndim(w, nb, b, 4, dims)
    check_dtype(w, na, a, VALUE_DTYPES)
    if tuple(b.shape) != tuple(a.shape):
        fail(w, f"{nb} has shape {tuple(b.shape)}; expected {tuple(a.shape)} like {na}")
    check_same_dtype(w, {na: a, nb: b})


def _validate_lengths(w: str, lengths: Any, hi: int, what: str) -> np.ndarray:
    ln = to_host(lengths).astype(np.int64)
    bad = (ln < 0) | (ln > hi)
    if bad.any():
        b = int(np.argmax(bad))
        fail(w, f"lengths[{b}] = {ln[b]}; allowed 0 <= length <= {what} = {hi}")
    return ln


def _tokens_text(lengths: Any, size: int) -> str:
    if not _summary.on_host(lengths):
        return "tokens not counted on the device (.tokens copies lengths to the host)"
    n = _summary.total(lengths)
    return f"{n} tokens ({_summary.density_text(n, size)} filled)"


@dataclass(frozen=True, eq=False)
class DenseKV:
    paged: ClassVar[bool] = False  # a DenseKV, a PagedKV and their NumPy views answer this alike
    k: Any
    v: Any
    lengths: Any

    def __post_init__(self) -> None:
        w = "DenseKV"
        _check_value_pair(w, ("k", self.k), ("v", self.v), "[B, S, Hkv, D]")
        _check_lengths(w, self.lengths, int(self.k.shape[0]))

    batch = property(lambda self: int(self.k.shape[0]))
    max_len = property(lambda self: int(self.k.shape[1]))
    num_kv_heads = property(lambda self: int(self.k.shape[2]))
    head_dim = property(lambda self: int(self.k.shape[3]))
    dtype = property(lambda self: dtype_name(self.k))

    @property
    def tokens(self) -> int:
        """Filled tokens over the batch: ``lengths.sum()``. Device arrays: copies ``lengths`` to the
        host (a synchronisation)."""
        return _summary.total(self.lengths)

    @property
    def density(self) -> float:
        """Filled share of the cache: ``tokens / (B * S)``; device arrays: as :attr:`tokens`."""
        size = self.batch * self.max_len
        return self.tokens / size if size else 0.0

    def __repr__(self) -> str:
        return (f"DenseKV(B {self.batch}, S {self.max_len}, Hkv {self.num_kv_heads}, D {self.head_dim} {self.dtype}, "
                f"{_summary.place(self.k)}, {_tokens_text(self.lengths, self.batch * self.max_len)})")

    def map_arrays(self, fn: Callable[[Any], Any]) -> DenseKV:
        return DenseKV(fn(self.k), fn(self.v), fn(self.lengths))

    def arrays(self) -> dict[str, Any]:
        return {"k": self.k, "v": self.v, "lengths": self.lengths}

    def validate(self, where: str = "DenseKV.validate") -> DenseKV:
        if not _fastcheck.dense_kv_ok(self.lengths, self.max_len):  # compiled pass; the NumPy one names the fault
            _validate_lengths(where, self.lengths, self.max_len, "S")
        return self

    def check_bounds(self, where: str, name: str) -> None:
        """:meth:`validate` (O(B)): the ops run it on host inputs even with SPARSECORE_VALIDATE=never."""
        self.validate(f"{where}: {name}")


@dataclass(frozen=True, eq=False)
class PagedKV:
    paged: ClassVar[bool] = True
    k_pages: Any
    v_pages: Any
    page_table: Any
    lengths: Any

    def __post_init__(self) -> None:
        w = "PagedKV"
        _check_value_pair(w, ("k_pages", self.k_pages), ("v_pages", self.v_pages), "[P, page_size, Hkv, D]")
        if self.k_pages.shape[1] < 1:
            fail(w, f"page_size = {self.k_pages.shape[1]}; must be >= 1")
        check_ndim(w, "page_table", self.page_table, 2, "[B, max_pages]")
        check_dtype(w, "page_table", self.page_table, ("int32",))
        _check_lengths(w, self.lengths, int(self.page_table.shape[0]))

    batch = property(lambda self: int(self.page_table.shape[0]))
    page_size = property(lambda self: int(self.k_pages.shape[1]))
    num_pages = property(lambda self: int(self.k_pages.shape[0]))
    max_len = property(lambda self: int(self.page_table.shape[1]) * int(self.k_pages.shape[1]))
    num_kv_heads = property(lambda self: int(self.k_pages.shape[2]))
    head_dim = property(lambda self: int(self.k_pages.shape[3]))
    dtype = property(lambda self: dtype_name(self.k_pages))

    @property
    def tokens(self) -> int:
        """Filled tokens over the batch: ``lengths.sum()``. Device arrays: copies ``lengths`` to the
        host (a synchronisation)."""
        return _summary.total(self.lengths)

    @property
    def density(self) -> float:
        """Filled share of the pages: ``tokens / (P * page_size)``; device arrays: as :attr:`tokens`."""
        size = self.num_pages * self.page_size
        return self.tokens / size if size else 0.0

    def __repr__(self) -> str:
        return (f"PagedKV(P {self.num_pages} pages of {self.page_size}, Hkv {self.num_kv_heads}, D {self.head_dim} "
                f"{self.dtype}, {_summary.place(self.k_pages)}, B {self.batch} x {self.page_table.shape[1]} pages, "
                f"{_tokens_text(self.lengths, self.num_pages * self.page_size)})")

    def map_arrays(self, fn: Callable[[Any], Any]) -> PagedKV:
        return PagedKV(fn(self.k_pages), fn(self.v_pages), fn(self.page_table), fn(self.lengths))

    def arrays(self) -> dict[str, Any]:
        return {"k_pages": self.k_pages, "v_pages": self.v_pages, "page_table": self.page_table,
                "lengths": self.lengths}

    def check_bounds(self, where: str, name: str) -> None:
        """:meth:`validate` (O(B * max_pages), lengths and the page ids in use): the ops run it on
        host inputs even with SPARSECORE_VALIDATE=never (one compiled pass when numba is there)."""
        self.validate(f"{where}: {name}")

    def validate(self, where: str = "PagedKV.validate") -> PagedKV:
        w = where
        if _fastcheck.paged_kv_ok(self.page_table, self.lengths, self.page_size, self.num_pages):
            return self  # one compiled pass over the pages in use; the NumPy checks below name a fault
        ln = _validate_lengths(w, self.lengths, self.max_len, "max_pages * page_size")
        pt = to_host(self.page_table).astype(np.int64)
        used = np.arange(pt.shape[1])[None, :] < -(-ln // self.page_size)[:, None]
        bad = used & ((pt < 0) | (pt >= self.num_pages))
        if bad.any():
            b, j = np.argwhere(bad)[0]
            fail(w, f"page_table[{b}, {j}] = {pt[b, j]} is out of range for a page in use (lengths[{b}] = "
                    f"{ln[b]}); allowed 0 <= page id < P = {self.num_pages}")
        return self


@dataclass(frozen=True, eq=False)
class PageBounds:
    kmin: Any
    kmax: Any
    page_size: int

    def __post_init__(self) -> None:
        w = "PageBounds"
        _check_value_pair(w, ("kmin", self.kmin), ("kmax", self.kmax), "[B, P, Hkv, D]")
        if isinstance(self.page_size, (bool, np.bool_)) or not isinstance(self.page_size, (int, np.integer)):
            fail(w, f"page_size = {self.page_size!r}; must be an int >= 1", TypeError)
        if self.page_size < 1:
            fail(w, f"page_size = {self.page_size}; must be an int >= 1")
        object.__setattr__(self, "page_size", int(self.page_size))

    batch = property(lambda self: int(self.kmin.shape[0]))
    num_pages = property(lambda self: int(self.kmin.shape[1]))
    num_kv_heads = property(lambda self: int(self.kmin.shape[2]))
    head_dim = property(lambda self: int(self.kmin.shape[3]))
    dtype = property(lambda self: dtype_name(self.kmin))

    def __repr__(self) -> str:
        return (f"PageBounds(B {self.batch}, P {self.num_pages} pages of {self.page_size}, Hkv {self.num_kv_heads}, "
                f"D {self.head_dim} {self.dtype}, {_summary.place(self.kmin)})")

    def map_arrays(self, fn: Callable[[Any], Any]) -> PageBounds:
        return PageBounds(fn(self.kmin), fn(self.kmax), self.page_size)

    def arrays(self) -> dict[str, Any]:
        return {"kmin": self.kmin, "kmax": self.kmax}

    def check_matches(self, w: str, name: str, kv: DenseKV | PagedKV) -> None:
        """Raise unless these bounds can describe ``kv``: batch, heads, head_dim, dtype, enough pages."""
        need = (kv.batch, -(-kv.max_len // self.page_size), kv.num_kv_heads, kv.head_dim)
        got = tuple(int(s) for s in self.kmin.shape)
        if got[0] != need[0] or got[1] < need[1] or got[2:] != need[2:]:
            fail(w, f"{name} has kmin/kmax of shape {got}; for this kv and page_size {self.page_size} expected "
                    f"(B, P, Hkv, D) = ({need[0]}, >= {need[1]}, {need[2]}, {need[3]})")
        if self.dtype != kv.dtype:
            fail(w, f"{name} has dtype {self.dtype} but kv has {kv.dtype}; they must match", TypeError)
