"""TiledELL: packed unstructured-sparse rows (activations ``A[M, K]``), lossless.

The K axis is cut into ``n_tiles = ceil(K / tile)`` tiles of ``tile`` columns (a power of two,
2 <= tile <= 32768 so an in-tile offset fits int16). Every (row, tile) pair owns ``capacity`` slots.

Buffers:

- ``values[M, n_tiles, capacity]`` value dtype (float32, float16, bfloat16; float64 on the host).
- ``cols[M, n_tiles, capacity]`` int16: column offset inside the tile; the global column of slot
  ``s`` of tile ``t`` is ``t * tile + cols[m, t, s]`` and is ``< K``.
- ``counts[M, n_tiles]`` int32: how many slots are filled, ``0 <= counts <= capacity``.
- ``overflow``: a :class:`CSR` of shape ``(M, K)`` with the entries that did not fit their tile's
  slots, or ``None``. An overflow entry's tile is full (``counts == capacity``) and no position is
  held both in a slot and in the overflow.

Slots past ``counts`` are padding: value 0 and offset 0, never read as data. Within a tile the filled
slots hold distinct columns, in ascending order unless ``sorted=False``. Nothing is ever dropped: the
matrix is exactly ``slots + overflow``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._arrays import VALUE_DTYPES, dtype_name, to_host
from .._checks import check_dtype, check_int, check_ndim, fail
from . import _fastcheck, _summary
from .csr import CSR

MAX_TILE = 32768


def check_tile_capacity(where: str, tile: Any, capacity: Any) -> tuple[int, int]:
    tile = check_int(where, "tile", tile, lo=2, hi=MAX_TILE)
    if tile & (tile - 1):
        fail(where, f"tile = {tile}; must be a power of two between 2 and {MAX_TILE}")
    capacity = check_int(where, "capacity", capacity, lo=1)
    if capacity > tile:
        fail(where, f"capacity = {capacity}; must be <= tile = {tile}")
    return tile, capacity


@dataclass(frozen=True, eq=False)
class TiledELL:
    values: Any
    cols: Any
    counts: Any
    shape: tuple[int, int]
    tile: int
    overflow: CSR | None = None
    sorted: bool = field(default=True)

    def __post_init__(self) -> None:
        w = "TiledELL"
        if not (isinstance(self.shape, tuple) and len(self.shape) == 2):
            fail(w, f"shape = {self.shape!r}; expected a tuple (M, K)", TypeError)
        m = check_int(w, "shape[0]", self.shape[0], lo=0)
        k = check_int(w, "shape[1]", self.shape[1], lo=0)
        object.__setattr__(self, "shape", (m, k))
        check_ndim(w, "values", self.values, 3, "[M, n_tiles, capacity]")
        cap = int(self.values.shape[2])
        tile, _ = check_tile_capacity(w, self.tile, cap)
        object.__setattr__(self, "tile", tile)
        check_dtype(w, "values", self.values, VALUE_DTYPES)
        check_dtype(w, "cols", self.cols, ("int16",))
        check_dtype(w, "counts", self.counts, ("int32",))
        nt = -(-k // tile)
        if tuple(self.values.shape[:2]) != (m, nt):
            fail(w, f"values has shape {tuple(self.values.shape)}; expected (M, n_tiles, capacity) with "
                    f"M = {m}, n_tiles = ceil(K / tile) = ceil({k} / {tile}) = {nt}")
        if tuple(self.cols.shape) != tuple(self.values.shape):
            fail(w, f"cols has shape {tuple(self.cols.shape)}; expected {tuple(self.values.shape)} like values")
        if tuple(self.counts.shape) != (m, nt):
            fail(w, f"counts has shape {tuple(self.counts.shape)}; expected (M, n_tiles) = {(m, nt)}")
        if self.overflow is not None:
            if not isinstance(self.overflow, CSR):
                fail(w, f"overflow must be a CSR or None, got {type(self.overflow).__name__}", TypeError)
            if self.overflow.shape != (m, k):
                fail(w, f"overflow has shape {self.overflow.shape}; expected {(m, k)} like the matrix")
            if self.overflow.dtype != dtype_name(self.values):
                fail(w, f"overflow has dtype {self.overflow.dtype} but values have {dtype_name(self.values)}; "
                        "they must match", TypeError)

    @property
    def capacity(self) -> int:
        return int(self.values.shape[2])

    @property
    def n_tiles(self) -> int:
        return int(self.values.shape[1])

    @property
    def dtype(self) -> str:
        return dtype_name(self.values)

    @property
    def nnz(self) -> int:
        """Stored entries: filled slots plus overflow entries. Device arrays: copies ``counts`` to the
        host (a synchronisation)."""
        return _summary.total(self.counts) + (self.overflow.nnz if self.overflow is not None else 0)

    @property
    def density(self) -> float:
        """``nnz / (M * K)`` (0.0 for an empty matrix); device arrays: as :attr:`nnz`."""
        size = self.shape[0] * self.shape[1]
        return self.nnz / size if size else 0.0

    def __repr__(self) -> str:
        s = _summary.head("TiledELL", self.shape, self.values) + f", tile {self.tile}, capacity {self.capacity}"
        if _summary.on_host(self.counts):
            nnz = self.nnz
            s += f", nnz {nnz} ({_summary.density_text(nnz, self.shape[0] * self.shape[1])})"
        else:
            s += ", nnz not counted on the device (.nnz copies counts to the host)"
        s += ", no overflow" if self.overflow is None else f", overflow {self.overflow.nnz} entries"
        return s + ("" if self.sorted else ", unsorted") + ")"

    def map_arrays(self, fn: Callable[[Any], Any]) -> TiledELL:
        ov = None if self.overflow is None else self.overflow.map_arrays(fn)
        return TiledELL(fn(self.values), fn(self.cols), fn(self.counts), self.shape, self.tile, ov, self.sorted)

    def arrays(self) -> dict[str, Any]:
        out = {"values": self.values, "cols": self.cols, "counts": self.counts}
        if self.overflow is not None:
            out.update({f"overflow.{n}": a for n, a in self.overflow.arrays().items()})
        return out

    def check_bounds(self, where: str, name: str) -> None:
        """The part of :meth:`validate` that keeps a kernel inside the buffers: ``0 <= counts <=
        capacity``, every slot's offset inside its tile (``0 <= cols < min(tile, K - t * tile)``;
        padding offsets are 0) and the overflow's :meth:`CSR.check_bounds`, by min/max passes (no
        sort). The ops run it on host inputs even with ``SPARSECORE_VALIDATE=never``."""
        if _fastcheck.tiled_ell_bounds_ok(self):  # the slots, by one compiled pass
            if self.overflow is not None:
                self.overflow.check_bounds(where, f"{name}.overflow")
            return
        m, k = self.shape
        tile, cap = self.tile, self.capacity
        counts = to_host(self.counts)
        never = "checked even with SPARSECORE_VALIDATE=never"
        if counts.size and (int(counts.min()) < 0 or int(counts.max()) > cap):
            r, t = np.argwhere((counts < 0) | (counts > cap))[0]
            fail(where, f"{name}.counts[{r}, {t}] = {counts[r, t]} is out of range; allowed 0 <= count <= "
                        f"capacity = {cap} ({never})")
        cols = to_host(self.cols)
        if cols.size:
            # fast path: one min and one max over all offsets, and the last (maybe partial) tile's max
            last = k - (self.n_tiles - 1) * tile
            if int(cols.min()) < 0 or int(cols.max()) >= tile or (last < tile and int(cols[:, -1].max()) >= last):
                width = np.minimum(tile, k - np.arange(self.n_tiles) * tile)
                lo = cols.min(axis=(0, 2)).astype(np.int64)
                hi = cols.max(axis=(0, 2)).astype(np.int64)
                t = int(np.argmax((lo < 0) | (hi >= width)))
                v = int(lo[t]) if lo[t] < 0 else int(hi[t])
                fail(where, f"{name}.cols of tile {t} holds offset {v}, out of range; allowed 0 <= offset < "
                            f"{width[t]} (tile = {tile}, K = {k}; {never})")
        if self.overflow is not None:
            self.overflow.check_bounds(where, f"{name}.overflow")

    def validate(self) -> TiledELL:
        """Check every invariant (reads the data; copies device buffers to the host)."""
        if _fastcheck.tiled_ell_ok(self):  # one compiled pass; any doubt runs the checks below
            return self
        w = "TiledELL.validate"
        m, k = self.shape
        tile, cap = self.tile, self.capacity
        counts = to_host(self.counts)
        cols = to_host(self.cols).astype(np.int32)  # int32: the widest tile, 32768, overflows int16
        vals = to_host(self.values)
        bad = (counts < 0) | (counts > cap)
        if bad.any():
            r, t = np.argwhere(bad)[0]
            fail(w, f"counts[{r}, {t}] = {counts[r, t]}; allowed 0 <= count <= capacity = {cap}")
        filled = np.arange(cap)[None, None, :] < counts[:, :, None]
        width = np.minimum(tile, k - np.arange(self.n_tiles) * tile)  # the last tile may be partial
        bad = filled & ((cols < 0) | (cols >= width[None, :, None]))
        if bad.any():
            r, t, s = np.argwhere(bad)[0]
            fail(w, f"cols[{r}, {t}, {s}] = {cols[r, t, s]} is out of range; tile {t} has columns "
                    f"0 <= offset < {width[t]} (tile = {tile}, K = {k})")
        pad = ~filled
        bad = pad & ((cols != 0) | (vals != 0))
        if bad.any():
            r, t, s = np.argwhere(bad)[0]
            fail(w, f"padding slot [{r}, {t}, {s}] (past counts = {counts[r, t]}) holds offset "
                    f"{cols[r, t, s]} and value {vals[r, t, s]}; padding must be offset 0 and value 0")
        if cap > 1:
            both = filled[:, :, 1:]
            step = np.diff(cols, axis=2)
            if self.sorted:
                bad = both & (step <= 0)
                if bad.any():
                    r, t, s = np.argwhere(bad)[0]
                    what = "duplicate" if step[r, t, s] == 0 else "descending"
                    fail(w, f"tile [{r}, {t}] has {what} offsets {cols[r, t, s]}, {cols[r, t, s + 1]} in slots "
                            f"{s}, {s + 1}; filled slots must be strictly ascending (or pass sorted=False)")
            else:
                srt = np.sort(np.where(filled, cols, -1 - np.arange(cap)), axis=2)
                dup = (np.diff(srt, axis=2) == 0) & (srt[:, :, 1:] >= 0)
                if dup.any():
                    r, t, j = np.argwhere(dup)[0]
                    off = srt[r, t, j]
                    slots = np.flatnonzero(filled[r, t] & (cols[r, t] == off))
                    fail(w, f"tile [{r}, {t}] holds offset {off} in slots {slots[0]} and {slots[1]}; filled slots "
                            "must hold distinct offsets")
        if self.overflow is not None:
            ov = self.overflow.validate(where="TiledELL.validate: overflow")
            indptr = to_host(ov.indptr).astype(np.int64)
            oc = to_host(ov.indices).astype(np.int64)
            orow = np.repeat(np.arange(m), np.diff(indptr))
            ot = oc // tile
            notfull = counts[orow, ot] < cap
            if notfull.any():
                i = int(np.argmax(notfull))
                fail(w, f"overflow entry (row {orow[i]}, column {oc[i]}) belongs to tile {ot[i]} which is not "
                        f"full (counts = {counts[orow[i], ot[i]]} < capacity = {cap}); overflow holds only "
                        "entries of full tiles")
            held = (cols[orow, ot, :] == (oc % tile)[:, None]) & filled[orow, ot, :]
            if held.any():
                i = int(np.argmax(held.any(axis=1)))
                fail(w, f"column {oc[i]} of row {orow[i]} is held both in a slot and in the overflow")
        return self
