"""CSR: compressed sparse rows, for interchange and for the overflow part of a TiledELL.

Buffers (``nnz = indptr[-1]``):

- ``indptr[M + 1]`` int32 or int64: row ``m`` owns entries ``indptr[m] : indptr[m + 1]``;
  ``indptr[0] == 0``, non-decreasing.
- ``indices[nnz]`` int32 or int64: column of each entry, ``0 <= indices < K``, unique within a row,
  ascending within a row unless ``sorted=False``.
- ``data[nnz]`` value dtype (float64, float32, float16, bfloat16).
- ``shape = (M, K)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._arrays import VALUE_DTYPES, dtype_name, to_host
from .._checks import check_dtype, check_int, check_ndim, fail
from . import _fastcheck, _summary

INDEX_DTYPES = ("int32", "int64")


@dataclass(frozen=True, eq=False)
class CSR:
    indptr: Any
    indices: Any
    data: Any
    shape: tuple[int, int]
    sorted: bool = field(default=True)

    def __post_init__(self) -> None:
        w = "CSR"
        if not (isinstance(self.shape, tuple) and len(self.shape) == 2):
            fail(w, f"shape = {self.shape!r}; expected a tuple (M, K)", TypeError)
        m = check_int(w, "shape[0]", self.shape[0], lo=0)
        k = check_int(w, "shape[1]", self.shape[1], lo=0)
        object.__setattr__(self, "shape", (m, k))
        check_ndim(w, "indptr", self.indptr, 1, "[M + 1]")
        check_ndim(w, "indices", self.indices, 1, "[nnz]")
        check_ndim(w, "data", self.data, 1, "[nnz]")
        check_dtype(w, "indptr", self.indptr, INDEX_DTYPES)
        check_dtype(w, "indices", self.indices, INDEX_DTYPES)
        check_dtype(w, "data", self.data, VALUE_DTYPES)
        if self.indptr.shape[0] != m + 1:
            fail(w, f"indptr has length {self.indptr.shape[0]}; expected M + 1 = {m + 1}")
        if self.indices.shape[0] != self.data.shape[0]:
            fail(w, f"indices has length {self.indices.shape[0]} but data has length {self.data.shape[0]}; "
                    "they must match")

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def dtype(self) -> str:
        return dtype_name(self.data)

    @property
    def density(self) -> float:
        """``nnz / (M * K)`` (0.0 for an empty matrix); read from shapes, no data."""
        size = self.shape[0] * self.shape[1]
        return self.nnz / size if size else 0.0

    def __repr__(self) -> str:
        size = self.shape[0] * self.shape[1]
        return (_summary.head("CSR", self.shape, self.data) + f", nnz {self.nnz} "
                f"({_summary.density_text(self.nnz, size)}), {_summary.place(self.indices).split()[0]} "
                f"{dtype_name(self.indices)} indices" + ("" if self.sorted else ", unsorted") + ")")

    def map_arrays(self, fn: Callable[[Any], Any]) -> CSR:
        return CSR(fn(self.indptr), fn(self.indices), fn(self.data), self.shape, self.sorted)

    def arrays(self) -> dict[str, Any]:
        return {"indptr": self.indptr, "indices": self.indices, "data": self.data}

    def check_bounds(self, where: str, name: str) -> None:
        """The part of :meth:`validate` that keeps a kernel inside the buffers: ``0 <= indptr <= nnz``
        and ``0 <= indices < K``, by a min and a max over each (O(M + nnz), no sort). The ops run it
        on host inputs even with ``SPARSECORE_VALIDATE=never``."""
        if _fastcheck.csr_ok(self):  # every invariant holds, the bounds with them
            return
        indptr, indices = to_host(self.indptr), to_host(self.indices)
        nnz, k = int(indices.shape[0]), self.shape[1]
        for arr, what, lo, hi in ((indptr, "indptr", 0, nnz), (indices, "indices", 0, k - 1)):
            if arr.shape[0] == 0:
                continue
            a, b = int(arr.min()), int(arr.max())
            if a < lo or b > hi:
                bad = a if a < lo else b
                i = int(np.argmax(arr == bad))
                fail(where, f"{name}.{what}[{i}] = {bad} is out of range; allowed {lo} <= {what} <= {hi} "
                            f"(nnz = {nnz}, K = {k}; checked even with SPARSECORE_VALIDATE=never)")

    def validate(self, where: str = "CSR.validate") -> CSR:
        """Check every invariant (reads the data; copies device buffers to the host). ``where``
        starts the error messages (a TiledELL names its overflow)."""
        if _fastcheck.csr_ok(self):  # one compiled pass; any doubt runs the checks below
            return self
        w = where
        indptr = to_host(self.indptr).astype(np.int64)
        indices = to_host(self.indices).astype(np.int64)
        m, k = self.shape
        if indptr[0] != 0:
            fail(w, f"indptr[0] = {indptr[0]}; must be 0")
        d = np.diff(indptr)
        if (d < 0).any():
            r = int(np.argmax(d < 0))
            fail(w, f"indptr decreases at row {r}: indptr[{r}] = {indptr[r]} > indptr[{r + 1}] = {indptr[r + 1]}")
        if indptr[-1] != indices.shape[0]:
            fail(w, f"indptr[-1] = {indptr[-1]}; must equal nnz = {indices.shape[0]}")
        bad = (indices < 0) | (indices >= k)
        if bad.any():
            i = int(np.argmax(bad))
            fail(w, f"indices[{i}] = {indices[i]} is out of range; allowed 0 <= index < K = {k}")
        if indices.shape[0] > 1:
            rows = np.repeat(np.arange(m), d)
            same = rows[1:] == rows[:-1]
            step = np.diff(indices)
            if self.sorted:
                bad = same & (step <= 0)
                if bad.any():
                    i = int(np.argmax(bad))
                    what = "duplicate" if step[i] == 0 else "descending"
                    fail(w, f"row {rows[i]} has {what} column indices {indices[i]}, {indices[i + 1]}; "
                            "columns must be strictly ascending within a row (or pass sorted=False)")
            else:
                order = np.lexsort((indices, rows))
                r2, c2 = rows[order], indices[order]
                dup = (r2[1:] == r2[:-1]) & (c2[1:] == c2[:-1])
                if dup.any():
                    i = int(np.argmax(dup))
                    fail(w, f"row {r2[i]} has duplicate column index {c2[i]}; columns must be unique in a row")
        return self
