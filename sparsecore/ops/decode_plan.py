"""Plan once, run many: top-k decode attention for a decode loop (FlashInfer's plan/run split).

A decode step of one layer is ``select_topk`` then ``sparse_decode``. Everything those two calls
decide from shapes (validation, the backend, ``k_max``, the default scale) is the same for every
layer of a model and every step of a batch, so :class:`DecodePlan` decides it once; each
:meth:`DecodePlan.run` then only launches, with no validation of the unchanged metadata and no host
synchronisation. ``SPARSECORE_VALIDATE=always`` when the plan is made makes every run check its data,
for debugging.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._arrays import dtype_name
from .._checks import fail
from ..formats.kv import DenseKV, PageBounds, PagedKV
from ..formats.topk import TopKIndex
from . import inputs as I
from .dispatcher import _deep_validation, check_no_grad, plan

__all__ = ["DecodePlan"]


def _shape_of(q: Any, kv: DenseKV | PagedKV) -> tuple[Any, ...]:
    """What a run must share with the plan: the cache's kind, the query's shape and dtype, and the
    cache's heads and head size (and page size); the cache's capacity (``S``, or the pages) may grow
    from run to run, as a decode loop's cache does."""
    if isinstance(kv, PagedKV):
        return type(kv), tuple(q.shape), dtype_name(q), tuple(kv.k_pages.shape[1:])
    return type(kv), tuple(q.shape), dtype_name(q), tuple(kv.k.shape[2:])


def _capacity(kv: DenseKV | PagedKV) -> int:
    return int(kv.page_table.shape[1]) * int(kv.k_pages.shape[1]) if isinstance(kv, PagedKV) else int(kv.k.shape[1])


class DecodePlan:
    """Top-k decode attention planned for one batch shape, run per layer and per step::

        plan = sc.DecodePlan(q, kv, k=64, method="quest", sink=4, window=64, bounds=bounds)
        for layer in layers:                       # every layer of the same shape, every step
            out, lse = plan.run(q[layer], kv[layer], bounds=bounds[layer])

    ``run`` means exactly::

        index = sc.select_topk(q, kv, k, method=..., sink=..., window=..., shared=..., bounds=bounds)
        out, lse = sc.sparse_decode(q, kv, index, scale=scale)

    ``q`` and ``kv`` given to the constructor are examples of the shapes to come (their data is
    used once, to plan); a run takes arrays of the same library, a query of the same shape and dtype,
    and a cache with the same heads, head size and page size (checked: anything else is a
    ``ValueError``, not a wrong answer), whose capacity may have grown (a decode loop's cache) as
    long as it still holds ``k`` units. Each run returns new ``out`` and
    ``lse`` unless ``out=(out, lse)`` gives buffers to write. The index of the last run is
    :attr:`last_index` (it is overwritten by the next run).

    A plan holds workspace buffers (FlashInfer's wrappers do too): run one plan from one thread at
    a time; make a plan per thread to decode in parallel.
    """

    def __init__(self, q: Any, kv: DenseKV | PagedKV, k: int, *, method: str = "exact", sink: int = 0,
                 window: int = 0, shared: bool = True, page_size: int | None = None,
                 bounds: PageBounds | None = None, scale: float | None = None, backend: str | None = None) -> None:
        select_inp = I.SelectTopkInputs(q, kv, k, method, sink, window, shared, page_size, bounds)
        self._backend = backend
        self._select = plan(select_inp, backend)
        self._options = select_inp.scalars()
        check_no_grad(select_inp)
        if _deep_validation(self._select.device):  # the planning call's data, as a public call checks it
            select_inp.validate_data()
        elif self._select.device == "host":
            select_inp.check_bounds()
        index = self._select.backend.apply(select_inp)
        decode_inp = I.SparseDecodeInputs(q, kv, index, scale)
        self._decode = plan(decode_inp, backend)
        self.scale = decode_inp.scale
        self._shape = _shape_of(q, kv)
        self._capacity = _capacity(kv)
        self._has_bounds = bounds is not None
        self._host = select_inp.device == "host"
        self._last: TopKIndex | tuple[Any, Any] | None = index
        self._granularity = (index.granularity, index.page_size)
        self._bind(select_inp, I.SparseDecodeInputs(q, kv, index, self.scale))

    def _bind(self, select_inp: I.SelectTopkInputs, decode_inp: I.SparseDecodeInputs) -> None:
        """The launchers of the fast path: NumPy inputs of host backends that offer them
        (``BackendOp.launcher``: closures that hold every shape decision and only allocate and
        launch). ``_seen`` is the metadata of the last run that was checked in full: a run with the
        same metadata skips straight to the launch."""
        sel, dec = getattr(self._select.backend, "launcher", None), getattr(self._decode.backend, "launcher", None)
        fast = (os.environ.get("SPARSECORE_VALIDATE") != "always" and type(select_inp.q) is np.ndarray
                and self._host and sel is not None and dec is not None
                and all(type(a) is np.ndarray for a in select_inp.named_arrays().values()))
        self._fast_select = sel(select_inp) if fast else None
        self._fast_decode = dec(decode_inp) if fast else None
        self._seen: Any = None

    @property
    def last_index(self) -> TopKIndex | None:
        """The selection of the last run (a NumPy plan's index buffers are its workspace: the next
        run overwrites them; copy them to keep them)."""
        if isinstance(self._last, tuple):
            self._last = TopKIndex(*self._last, *self._granularity)
        return self._last

    @property
    def backends(self) -> dict[str, str]:
        """The backend (or variant) name that runs each of the two ops."""
        return {"select_topk": self._select.backend.NAME, "sparse_decode": self._decode.backend.NAME}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"DecodePlan(q {self._shape[1]} {self._shape[2]}, {opts}; backends {self.backends})"

    def run(self, q: Any, kv: DenseKV | PagedKV, *, bounds: PageBounds | None = None,
            out: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
        """``(out[B, Hq, D], lse[B, Hq])`` of this step (see the class docstring)."""
        if self._fast_select is not None and type(q) is np.ndarray:
            seen = _metadata(q, kv, bounds)
            if seen is not None and seen == self._seen:
                return self._run_fast(q, kv, bounds, out)
        if _shape_of(q, kv) != self._shape:
            fail("DecodePlan.run", f"q {tuple(q.shape)} {dtype_name(q)} with cache rows {_shape_of(q, kv)[3]} "
                                   f"does not match the plan's q {self._shape[1]} {self._shape[2]} with cache rows "
                                   f"{self._shape[3]}; make a plan for this shape")
        if _capacity(kv) != self._capacity:
            self._grown(q, kv, bounds)
        if (bounds is not None) != self._has_bounds:
            fail("DecodePlan.run", f"bounds is {'given' if bounds is not None else 'missing'}; a plan made "
                                   f"{'with' if self._has_bounds else 'without'} bounds runs "
                                   f"{'with' if self._has_bounds else 'without'} them")
        opts = dict(self._options, bounds=bounds)
        select_inp = I.SelectTopkInputs(q, kv, **opts)
        if type(q) is not np.ndarray:  # NumPy arrays carry no gradient
            check_no_grad(select_inp)
        checking = os.environ.get("SPARSECORE_VALIDATE") == "always"
        if checking:
            select_inp.validate()
            select_inp.validate_data()
        elif self._host:  # the cache's lengths and page table: cheap, and what keeps a kernel in bounds
            kv.check_bounds("DecodePlan.run", "kv")
        if self._fast_select is not None and type(q) is np.ndarray and not checking:
            select_inp.validate()  # in full, once per change of the metadata (a new cache, other bounds)
            self._seen = _metadata(q, kv, bounds)
            return self._run_fast(q, kv, bounds, out)
        index = self._launch(self._select.backend, select_inp, q)
        self._last = index
        decode_inp = I.SparseDecodeInputs(q, kv, index, self.scale)
        if checking:
            decode_inp.validate()
            decode_inp.validate_data()
        result = self._launch(self._decode.backend, decode_inp, q)
        if out is None:
            return result
        _write(out, result)
        return out

    def _run_fast(self, q: np.ndarray, kv: DenseKV | PagedKV, bounds: PageBounds | None,
                  out: tuple[Any, Any] | None) -> tuple[Any, Any]:
        """The launch of a run whose metadata was checked: the cache's lengths (and page ids in use)
        are checked (one compiled pass, what keeps the kernels in bounds), then two launches."""
        kv.check_bounds("DecodePlan.run", "kv")
        indices, counts = self._fast_select(q, kv, bounds)
        self._last = (indices, counts)
        b, hq, d = q.shape
        if out is None:
            o, lse = np.empty((b, hq, d), q.dtype), np.empty((b, hq), np.float32)
            self._fast_decode(q, kv, indices, counts, o, lse)
            return o, lse
        if (type(out) is tuple and len(out) == 2 and type(out[0]) is np.ndarray and type(out[1]) is np.ndarray
                and out[0].shape == (b, hq, d) and out[0].dtype == q.dtype and out[0].flags.c_contiguous
                and out[1].shape == (b, hq) and out[1].dtype == np.float32 and out[1].flags.c_contiguous
                and out[0].flags.writeable and out[1].flags.writeable):
            self._fast_decode(q, kv, indices, counts, out[0], out[1])
            return out
        o, lse = np.empty((b, hq, d), q.dtype), np.empty((b, hq), np.float32)
        self._fast_decode(q, kv, indices, counts, o, lse)
        _write(out, (o, lse))
        return out

    def _launch(self, backend: Any, inp: Any, q: Any) -> Any:
        """``backend.apply(inp)``; NumPy inputs of a host backend whose call needs no thread pool go
        straight to its ``run`` (nothing to convert, nothing to lock: the planned path's overhead)."""
        if type(q) is np.ndarray and backend.DEVICE == "host" and getattr(backend, "serial", None) is not None \
                and backend.serial(inp):
            return backend.run(inp)
        return backend.apply(inp)

    def _grown(self, q: Any, kv: DenseKV | PagedKV, bounds: PageBounds | None) -> None:
        """The cache's capacity changed: check that ``k`` still fits; a GPU backend's limits may
        depend on the capacity, so its choice is made again (host backends have no such limits)."""
        inp = I.SelectTopkInputs(q, kv, **dict(self._options, bounds=bounds))
        ps = inp.unit_page_size
        units = kv.max_len if ps is None else -(-kv.max_len // ps)
        if self._options["k"] > units:
            fail("DecodePlan.run", f"k = {self._options['k']} exceeds the cache's capacity of {units} "
                                   f"{'tokens' if ps is None else 'pages'}; make a plan with a smaller k")
        if self._select.backend.DEVICE != "host" or self._decode.backend.DEVICE != "host":
            self._select = plan(inp, self._backend)
            index = self._select.backend.apply(inp)
            self._decode = plan(I.SparseDecodeInputs(q, kv, index, self.scale), self._backend)
        elif self._fast_select is not None:  # k_max and the split count follow the capacity
            inp.validate()
            k_max = inp.k_max
            index = TopKIndex(np.zeros((kv.batch, self._last_groups(q, kv), k_max), np.int32),
                              np.zeros((kv.batch, self._last_groups(q, kv)), np.int32), *self._granularity)
            self._bind(inp, I.SparseDecodeInputs(q, kv, index, self.scale))
        self._capacity = _capacity(kv)

    def _last_groups(self, q: Any, kv: DenseKV | PagedKV) -> int:
        return kv.num_kv_heads if self._options["shared"] else int(q.shape[1])


def _metadata(q: np.ndarray, kv: DenseKV | PagedKV, bounds: PageBounds | None) -> tuple[Any, ...] | None:
    """Everything a run's full check reads but the data: each NumPy buffer's shape, dtype, strides
    and flags (None when any buffer is not NumPy: such runs take the checked path)."""
    parts: list[Any] = [q.shape, q.dtype, q.strides, type(kv)]
    paged = isinstance(kv, PagedKV)
    arrays = (kv.k_pages, kv.v_pages, kv.page_table, kv.lengths) if paged else (kv.k, kv.v, kv.lengths)
    if bounds is not None:
        arrays += (bounds.kmin, bounds.kmax)
        parts.append(bounds.page_size)
    for a in arrays:
        if type(a) is not np.ndarray:
            return None
        parts += (a.shape, a.dtype, a.strides, a.flags.c_contiguous)
    return tuple(parts)


def _write(out: tuple[Any, Any], result: tuple[Any, Any]) -> None:
    if not (isinstance(out, tuple) and len(out) == 2):
        fail("DecodePlan.run", f"out must be a tuple (out, lse) of arrays, got {type(out).__name__}", TypeError)
    for name, dst, src in (("out", out[0], result[0]), ("lse", out[1], result[1])):
        if tuple(dst.shape) != tuple(src.shape) or dtype_name(dst) != dtype_name(src):
            fail("DecodePlan.run", f"out's {name} has shape {tuple(dst.shape)} {dtype_name(dst)}; expected "
                                   f"{tuple(src.shape)} {dtype_name(src)}")
        if hasattr(dst, "copy_"):
            dst.copy_(src)
        else:
            dst[...] = src

