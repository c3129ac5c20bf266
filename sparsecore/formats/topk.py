"""TopKIndex: the keys each decode query attends to.

Buffers:

- ``indices[B, G, k_max]`` int32: token positions (``granularity="token"``) or logical page numbers
  of the sequence (``granularity="page"``: page ``j`` covers tokens ``j * page_size`` to
  ``min((j + 1) * page_size, length) - 1``). The first ``counts[b, g]`` entries of a row are the
  selection: unique, in any order, ``0 <= index < lengths[b]`` (tokens) or
  ``< ceil(lengths[b] / page_size)`` (pages); the rest are padding, -1.
- ``counts[B, G]`` int32: ``0 <= counts <= k_max`` (ragged k).

``G`` is ``Hkv`` when one selection is shared by the query heads of a KV group (each selected KV row
is read once for the group) or ``Hq`` when every query head selects its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._arrays import to_host
from .._checks import check_choice, check_dtype, check_int, check_ndim, fail
from . import _fastcheck, _summary


@dataclass(frozen=True, eq=False)
class TopKIndex:
    indices: Any
    counts: Any
    granularity: str = "token"
    page_size: int | None = None

    def __post_init__(self) -> None:
        w = "TopKIndex"
        check_ndim(w, "indices", self.indices, 3, "[B, G, k_max]")
        check_dtype(w, "indices", self.indices, ("int32",))
        check_ndim(w, "counts", self.counts, 2, "[B, G]")
        check_dtype(w, "counts", self.counts, ("int32",))
        if tuple(self.counts.shape) != tuple(self.indices.shape[:2]):
            fail(w, f"counts has shape {tuple(self.counts.shape)}; expected {tuple(self.indices.shape[:2])} "
                    "= indices.shape[:2]")
        check_choice(w, "granularity", self.granularity, ("token", "page"))
        if self.granularity == "page":
            if self.page_size is None:
                fail(w, "granularity = 'page' needs page_size (tokens per page)")
            # token positions are int32: a page of more tokens than that cannot be addressed
            object.__setattr__(self, "page_size", check_int(w, "page_size", self.page_size, lo=1, hi=2**31 - 1))
        elif self.page_size is not None:
            fail(w, f"page_size = {self.page_size!r} is only meaningful with granularity = 'page'")

    @classmethod
    def _from_kernel(cls, indices: Any, counts: Any, granularity: str = "token",
                     page_size: int | None = None) -> TopKIndex:
        """A TopKIndex around buffers a selection kernel of this package just allocated and filled
        (shapes and dtypes right by construction): the constructor's checks, skipped."""
        obj = object.__new__(cls)
        obj.__dict__.update(indices=indices, counts=counts, granularity=granularity, page_size=page_size)
        return obj

    batch = property(lambda self: int(self.indices.shape[0]))
    groups = property(lambda self: int(self.indices.shape[1]))
    k_max = property(lambda self: int(self.indices.shape[2]))

    @property
    def nnz(self) -> int:
        """Selected units (tokens or pages) over all rows: ``counts.sum()``. Device arrays: copies
        ``counts`` to the host (a synchronisation)."""
        return _summary.total(self.counts)

    def __repr__(self) -> str:
        unit = "tokens" if self.granularity == "token" else f"pages of {self.page_size}"
        s = (f"TopKIndex(B {self.batch}, G {self.groups}, k_max {self.k_max} {unit}, "
             f"{_summary.place(self.indices)}")
        if _summary.on_host(self.counts):
            nnz = self.nnz
            s += f", selected {nnz} ({_summary.density_text(nnz, self.batch * self.groups * self.k_max)} of the slots)"
        else:
            s += ", selected not counted on the device (.nnz copies counts to the host)"
        return s + ")"

    def map_arrays(self, fn: Callable[[Any], Any]) -> TopKIndex:
        return TopKIndex(fn(self.indices), fn(self.counts), self.granularity, self.page_size)

    def arrays(self) -> dict[str, Any]:
        return {"indices": self.indices, "counts": self.counts}

    def check_bounds(self, where: str, name: str, lengths: Any = None) -> None:
        """The part of :meth:`validate` that keeps a kernel inside the buffers: ``0 <= counts <=
        k_max`` and, with ``lengths``, every selected index in ``0 <= index < units of its sequence``
        (one vectorised pass, no sort; duplicates are not looked for). The ops run it on host inputs
        even with ``SPARSECORE_VALIDATE=never``."""
        if _fastcheck.topk_bounds_ok(self, lengths):  # one compiled pass; a fault is named below
            return
        cnt = to_host(self.counts).astype(np.int64)
        kmax = self.k_max
        never = "checked even with SPARSECORE_VALIDATE=never"
        bad = (cnt < 0) | (cnt > kmax)
        if bad.any():
            b, g = np.argwhere(bad)[0]
            fail(where, f"{name}.counts[{b}, {g}] = {cnt[b, g]} is out of range; allowed 0 <= count <= "
                        f"k_max = {kmax} ({never})")
        if lengths is None or not kmax:
            return
        units = to_host(lengths).astype(np.int64)
        if self.granularity == "page":
            units = -(-units // self.page_size)
        idx = to_host(self.indices)
        if idx.size and (cnt == kmax).all():  # fast path: full rows, a min and a max per sequence
            if int(idx.min()) >= 0 and (idx.reshape(idx.shape[0], -1).max(axis=1) < units).all():
                return
        filled = np.arange(kmax)[None, None, :] < cnt[:, :, None]
        bad = filled & ((idx < 0) | (idx >= units[:, None, None]))
        if bad.any():
            b, g, j = np.argwhere(bad)[0]
            fail(where, f"{name}.indices[{b}, {g}, {j}] = {idx[b, g, j]} is out of range; allowed 0 <= index < "
                        f"{units[b]} ({self.granularity}s of sequence {b}; {never})")

    def validate(self, lengths: Any = None) -> TopKIndex:
        """Check every invariant; with ``lengths[B]`` (or a KV cache) also the index ranges."""
        w = "TopKIndex.validate"
        if lengths is not None:  # one compiled pass; any doubt runs the checks below
            ln = np.asarray(to_host(getattr(lengths, "lengths", lengths))).astype(np.int64)
            units = -(-ln // self.page_size) if self.granularity == "page" else ln
            if _fastcheck.topk_ok(self, units):
                return self
        idx = to_host(self.indices).astype(np.int64)
        cnt = to_host(self.counts).astype(np.int64)
        kmax = self.k_max
        bad = (cnt < 0) | (cnt > kmax)
        if bad.any():
            b, g = np.argwhere(bad)[0]
            fail(w, f"counts[{b}, {g}] = {cnt[b, g]}; allowed 0 <= count <= k_max = {kmax}")
        filled = np.arange(kmax)[None, None, :] < cnt[:, :, None]
        bad = ~filled & (idx != -1)
        if bad.any():
            b, g, j = np.argwhere(bad)[0]
            fail(w, f"indices[{b}, {g}, {j}] = {idx[b, g, j]} is padding (past counts = {cnt[b, g]}); "
                    "padding must be -1")
        bad = filled & (idx < 0)
        if bad.any():
            b, g, j = np.argwhere(bad)[0]
            fail(w, f"indices[{b}, {g}, {j}] = {idx[b, g, j]} is negative; selected indices are >= 0")
        if lengths is not None:
            ln = to_host(getattr(lengths, "lengths", lengths)).astype(np.int64)
            if ln.shape != (self.batch,):
                fail(w, f"lengths has shape {ln.shape}; expected ({self.batch},)")
            unit = "length"
            if self.granularity == "page":
                ln = -(-ln // self.page_size)
                unit = f"ceil(length / page_size = {self.page_size})"
            bad = filled & (idx >= ln[:, None, None])
            if bad.any():
                b, g, j = np.argwhere(bad)[0]
                fail(w, f"indices[{b}, {g}, {j}] = {idx[b, g, j]} is out of range; allowed 0 <= index < "
                        f"{unit} = {ln[b]} for sequence {b}")
        srt = np.sort(np.where(filled, idx, -1 - np.arange(kmax)), axis=2)
        dup = (np.diff(srt, axis=2) == 0) & (srt[:, :, 1:] >= 0)
        if dup.any():
            b, g, j = np.argwhere(dup)[0]
            fail(w, f"row [{b}, {g}] selects index {srt[b, g, j + 1]} twice; selected indices must be unique")
        return self


def topk_capacity(k: int, sink: int, window: int, max_len: int, page_size: int | None = None) -> int:
    """``k_max`` of the index that ``select_topk`` returns: from shapes only, so a device producer
    can allocate it without reading ``lengths``. Tokens: ``min(k + sink + window, max_len)``; pages:
    ``k`` plus the pages that can hold the sink and the window (a window not aligned to pages spans
    one more), at most the cache's page count."""
    if page_size is None:
        return min(k + sink + window, max_len)
    n_units = -(-max_len // page_size)
    return min(k + -(-sink // page_size) + -(-window // page_size) + (1 if window else 0), n_units)
