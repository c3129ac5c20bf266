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
import sys
from typing import Any

import numpy as np

from .._arrays import dtype_name, from_numpy, kind_of, to_numpy
from .._checks import fail
from ..formats import _fastcheck
from ..formats.codes import KeyCodes
from ..formats.kv import DenseKV, PageBounds, PagedKV
from ..formats.topk import TopKIndex, topk_capacity
from . import inputs as I
from .dispatcher import _deep_validation, check_no_grad, dispatch, plan

__all__ = ["DecodePlan"]


def _shape_of(q: Any, kv: DenseKV | PagedKV) -> tuple[Any, ...]:
    """What a run must share with the plan: the cache's kind, the query's shape and dtype, and the
    cache's heads and head size (and page size); the cache's capacity (``S``, or the pages) may grow
    from run to run, as a decode loop's cache does."""
    if isinstance(kv, PagedKV):
        return type(kv), tuple(q.shape), dtype_name(q), tuple(kv.k_pages.shape[1:])
    return type(kv), tuple(q.shape), dtype_name(q), tuple(kv.k.shape[2:])


def _capacity(kv: Any) -> int:
    """Tokens the cache can hold: ``S``, or ``max_pages * page_size`` (a DenseKV, a PagedKV, or their
    NumPy views)."""
    if kv.paged:
        return int(kv.page_table.shape[1]) * int(kv.k_pages.shape[1])
    return int(kv.k.shape[1])


class DecodePlan:
    """Top-k decode attention planned for one batch shape, run per layer and per step::

        plan = sc.DecodePlan(q, kv, k=64, method="quest", sink=4, window=64, bounds=bounds)
        for layer in layers:                       # every layer of the same shape, every step
            out, lse = plan.run(q[layer], kv[layer], bounds=bounds[layer])

    ``run`` means exactly::

        index = sc.select_topk(q, kv, k, method=..., sink=..., window=..., shared=..., bounds=bounds,
                               top_p=..., k_min=..., scale=scale if top_p or candidates else None,
                               codes=codes, rescore=..., candidates=..., tail_sample=...)
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
                 bounds: PageBounds | None = None, scale: float | None = None, top_p: float | None = None,
                 k_min: int = 0, codes: KeyCodes | None = None, rescore: int = 0, candidates: int = 0,
                 tail_sample: int | None = None, backend: str | None = None) -> None:
        # an adaptive budget estimates the attention mass with the attention's own scale
        select_inp = I.SelectTopkInputs(q, kv, k, method, sink, window, shared, page_size, bounds, top_p, k_min,
                                        scale if top_p is not None or candidates else None, codes, rescore,
                                        candidates, tail_sample)
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
        self._has_codes = codes is not None
        self._host = select_inp.device == "host"
        self._unit, self._forced_window = select_inp.unit_page_size, select_inp.forced_window
        self._last: TopKIndex | tuple[Any, Any] | None = index
        self._granularity = (index.granularity, index.page_size)
        self._bind(select_inp, I.SparseDecodeInputs(q, kv, index, self.scale))

    def _bind(self, select_inp: I.SelectTopkInputs, decode_inp: I.SparseDecodeInputs) -> None:
        """The launchers of the fast path: host inputs (NumPy, or CPU torch tensors through zero-copy
        NumPy views) of backends that offer them (``BackendOp.launcher``: closures that hold every
        shape decision and the workspace, and only launch). ``_seen`` is the metadata of the last run
        checked in full (:func:`_metadata`: everything but the data and the cache's capacity); a run
        with the same metadata goes straight to the launchers."""
        self._fast_select = self._fast_decode = None
        self._seen: Any = None
        if os.environ.get("SPARSECORE_VALIDATE") == "always" or not self._host \
                or select_inp.kind not in ("numpy", "torch"):
            return
        if select_inp.kind == "torch":
            select_inp, decode_inp = select_inp.map_arrays(to_numpy), decode_inp.map_arrays(to_numpy)
        fs, fd = self._select.backend.launcher(select_inp), self._decode.backend.launcher(decode_inp)
        checks = _fastcheck._kernels()  # the compiled bounds checks (None without numba)
        if fs is None or fd is None or checks is None:
            return
        self._lengths_ok = checks.lengths_ok  # a DenseKV's lengths in 0..S, called on its NumPy view
        self._fast_select, self._fast_decode = fs, fd
        self._fast_bounds = None
        if select_inp.bounds is not None:  # update_from: the page_bounds launcher
            pb_inp = I.PageBoundsInputs(select_inp.kv, None, select_inp.bounds,
                                        np.zeros(select_inp.kv.batch, np.int32))
            self._fast_bounds = plan(pb_inp, self._backend).backend.launcher(pb_inp)
        self._k_max = select_inp.k_max
        self._bucket = _capacity(select_inp.kv).bit_length()  # the launchers' kernel choice holds in this range

    def _capacity_fits(self, capacity: int) -> bool:
        """A run's cache capacity differs from the last one (a growing cache): True when the bound
        launchers still fit (same ``k_max`` and capacity range); ``k`` past the capacity is an error."""
        self._check_k_fits(capacity)
        o = self._options
        fits = (topk_capacity(o["k"], o["sink"], self._forced_window, capacity, self._unit) == self._k_max
                and capacity.bit_length() == self._bucket)
        if fits:
            self._capacity = capacity
        return fits

    def _check_k_fits(self, capacity: int) -> None:
        """``k`` units must fit a cache of ``capacity`` tokens (tokens, or Quest pages)."""
        ps = self._unit
        units = capacity if ps is None else -(-capacity // ps)
        if self._options["k"] > units:
            fail("DecodePlan.run", f"k = {self._options['k']} exceeds the cache's capacity of {units} "
                                   f"{'tokens' if ps is None else 'pages'}; make a plan with a smaller k")

    @property
    def last_index(self) -> TopKIndex | None:
        """The selection of the last run (a NumPy plan's index buffers are its workspace: the next
        run overwrites them; copy them to keep them)."""
        if isinstance(self._last, tuple):
            indices, counts, torch = self._last
            if torch:
                indices, counts = from_numpy(indices, "torch"), from_numpy(counts, "torch")
            self._last = TopKIndex(indices, counts, *self._granularity)
        return self._last

    @property
    def last_counts(self) -> Any:
        """``last_index.counts`` without building the index (a NumPy array for host plans that ran
        their launchers, whatever the inputs' kind: statistics read it without a conversion)."""
        return self._last[1] if isinstance(self._last, tuple) else None if self._last is None else self._last.counts

    @property
    def backends(self) -> dict[str, str]:
        """The backend (or variant) name that runs each of the two ops."""
        return {"select_topk": self._select.backend.NAME, "sparse_decode": self._decode.backend.NAME}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"DecodePlan(q {self._shape[1]} {self._shape[2]}, {opts}; backends {self.backends})"

    def run(self, q: Any, kv: DenseKV | PagedKV, *, bounds: PageBounds | None = None, update_from: Any = None,
            out: tuple[Any, Any] | None = None, codes: KeyCodes | None = None) -> tuple[Any, Any]:
        """``(out[B, Hq, D], lse[B, Hq])`` of this step (see the class docstring). ``update_from[B]``
        int32 (with ``bounds``): first bring ``bounds`` up to date in place for the tokens from
        ``update_from[b]`` on, ``page_bounds(kv, out=bounds, start=update_from)`` (a decode step that
        appended tokens passes the lengths before it), so that one call is update + select + attend."""
        if self._fast_select is not None and (update_from is None or self._fast_bounds is not None):
            views = _host_views(q, kv, bounds if codes is None else codes, update_from)
            if views is not None and _metadata(*views) == self._seen:
                capacity = _capacity(views[1])
                if capacity == self._capacity or self._capacity_fits(capacity):
                    return self._run_fast(q, kv, views, out)
        if _shape_of(q, kv) != self._shape:
            fail("DecodePlan.run", f"q {tuple(q.shape)} {dtype_name(q)} with cache rows {_shape_of(q, kv)[3]} "
                                   f"does not match the plan's q {self._shape[1]} {self._shape[2]} with cache rows "
                                   f"{self._shape[3]}; make a plan for this shape")
        if _capacity(kv) != self._capacity:
            self._grown(q, kv, bounds, codes)
        if (bounds is not None) != self._has_bounds:
            fail("DecodePlan.run", f"bounds is {'given' if bounds is not None else 'missing'}; a plan made "
                                   f"{'with' if self._has_bounds else 'without'} bounds runs "
                                   f"{'with' if self._has_bounds else 'without'} them")
        if update_from is not None and bounds is None:
            fail("DecodePlan.run", "update_from is given without bounds; it updates the bounds of a Quest plan")
        if (codes is not None) != self._has_codes:
            fail("DecodePlan.run", f"codes are {'given' if codes is not None else 'missing'}; a plan made "
                                   f"{'with' if self._has_codes else 'without'} codes runs "
                                   f"{'with' if self._has_codes else 'without'} them")
        if codes is not None and self._host:
            codes.check_matches("DecodePlan.run", "codes", kv)  # shapes only: what keeps the kernel in bounds
        opts = dict(self._options, bounds=bounds, codes=codes)
        select_inp = I.SelectTopkInputs(q, kv, **opts)
        if type(q) is not np.ndarray:  # NumPy arrays carry no gradient
            check_no_grad(select_inp)
        checking = os.environ.get("SPARSECORE_VALIDATE") == "always"
        if checking:
            select_inp.validate()
            select_inp.validate_data()
        elif self._host:  # the cache's lengths and page table: cheap, and what keeps a kernel in bounds
            kv.check_bounds("DecodePlan.run", "kv")
        if self._fast_select is not None and not checking and (update_from is None or self._fast_bounds is not None):
            views = _host_views(q, kv, bounds if codes is None else codes, update_from)
            if views is not None:
                select_inp.validate()  # in full, once per change of the metadata (a new cache, other bounds)
                if update_from is not None:
                    I.PageBoundsInputs(kv, None, bounds, update_from).validate()
                if select_inp.k_max != self._k_max or _capacity(kv).bit_length() != self._bucket:
                    self._bind(select_inp, I.SparseDecodeInputs(q, kv, self._example_index(select_inp), self.scale))
                self._seen = _metadata(*views)
                return self._run_fast(q, kv, views, out)
        if update_from is not None:
            dispatch(I.PageBoundsInputs(kv, None, bounds, update_from), self._backend)
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

    def _run_fast(self, q: Any, kv: DenseKV | PagedKV, views: tuple[Any, Any, Any, Any],
                  out: tuple[Any, Any] | None) -> tuple[Any, Any]:
        """The launch of a run whose metadata was checked: the bounds' pages and the cache's lengths
        (and page ids in use) are checked (one compiled pass: what keeps the kernels in bounds),
        then the two launchers run on the NumPy views."""
        qn, kvn, bn, start = views
        if bn is not None and not hasattr(bn, "kmin"):  # int8 codes: they must hold the cache's capacity
            if min(bn.codes.shape[1], bn.scales.shape[1]) < self._capacity:
                fail("DecodePlan.run", f"codes hold {min(bn.codes.shape[1], bn.scales.shape[1])} positions; the "
                                       f"cache's capacity is {self._capacity}")
        elif bn is not None and bn.kmax.shape[1] != bn.kmin.shape[1]:
            fail("DecodePlan.run", f"bounds.kmax holds {bn.kmax.shape[1]} pages and bounds.kmin {bn.kmin.shape[1]}; "
                                   "they must hold the same pages")
        if bn is not None and hasattr(bn, "kmin") and bn.kmin.shape[1] < -(-self._capacity // bn.page_size):
            fail("DecodePlan.run", f"bounds hold {bn.kmin.shape[1]} pages; the cache's capacity of "
                                   f"{self._capacity} tokens needs {-(-self._capacity // bn.page_size)}")
        if not (_fastcheck.paged_kv_ok(kvn.page_table, kvn.lengths, kvn.k_pages.shape[1], kvn.k_pages.shape[0])
                if kvn.paged else self._lengths_ok(kvn.lengths, kvn.k.shape[1])):
            kv.check_bounds("DecodePlan.run", "kv")  # names the fault
        if start is not None:
            if not _fastcheck.start_ok(start, kvn.lengths):
                I.PageBoundsInputs(kv, None, None, start)._check_start()  # names the fault
                fail("DecodePlan.run", f"update_from has shape {start.shape}; expected ({kvn.lengths.shape[0]},)")
            self._fast_bounds(kvn, bn, start)
        indices, counts = self._fast_select(qn, kvn, bn)
        self._last = (indices, counts, qn is not q)  # made a TopKIndex (of q's kind) when asked for
        b, hq, d = qn.shape
        if out is not None:
            dst = _host_out(out, qn)
            if dst is not None:
                self._fast_decode(qn, kvn, indices, counts, *dst)
                return out
        o, lse = np.empty((b, hq, d), qn.dtype), np.empty((b, hq), np.float32)
        self._fast_decode(qn, kvn, indices, counts, o, lse)
        if qn is q:
            result = o, lse
        else:  # fresh, writeable: torch's own from_numpy (a bfloat16 output goes through the converter)
            tfn = sys.modules["torch"].from_numpy
            result = (from_numpy(o, "torch") if o.dtype.itemsize == 2 else tfn(o)), tfn(lse)
        if out is None:
            return result
        _write(out, result)
        return out

    def _example_index(self, select_inp: I.SelectTopkInputs) -> TopKIndex:
        """An index of the shape select_topk gives ``select_inp`` (for binding the decode launcher)."""
        g = select_inp.kv.num_kv_heads if select_inp.shared else int(select_inp.q.shape[1])
        shape = (select_inp.kv.batch, g)
        return TopKIndex(np.zeros(shape + (select_inp.k_max,), np.int32), np.zeros(shape, np.int32),
                         *self._granularity)

    def _launch(self, backend: Any, inp: Any, q: Any) -> Any:
        """``backend.apply(inp)``; NumPy inputs of a host backend whose call needs no thread pool go
        straight to its ``run`` (nothing to convert, nothing to lock: the planned path's overhead)."""
        if type(q) is np.ndarray and backend.DEVICE == "host" and getattr(backend, "serial", None) is not None \
                and backend.serial(inp):
            return backend.run(inp)
        return backend.apply(inp)

    def _grown(self, q: Any, kv: DenseKV | PagedKV, bounds: PageBounds | None, codes: KeyCodes | None) -> None:
        """The cache's capacity changed: check that ``k`` still fits; a GPU backend's limits may
        depend on the capacity, so its choice is made again (host backends have no such limits)."""
        self._check_k_fits(_capacity(kv))
        if self._select.backend.DEVICE != "host" or self._decode.backend.DEVICE != "host":
            inp = I.SelectTopkInputs(q, kv, **dict(self._options, bounds=bounds, codes=codes))
            self._select = plan(inp, self._backend)
            index = self._select.backend.apply(inp)
            self._decode = plan(I.SparseDecodeInputs(q, kv, index, self.scale), self._backend)
        self._capacity = _capacity(kv)


class _HostKV:
    """NumPy views of a cache's buffers (what the launchers read), and whether it is paged."""

    __slots__ = ("k", "v", "k_pages", "v_pages", "page_table", "lengths", "paged", "__dict__")

    def __init__(self, kv: DenseKV | PagedKV, conv: Any) -> None:
        self.paged = isinstance(kv, PagedKV)
        if self.paged:
            self.k_pages, self.v_pages, self.page_table = conv(kv.k_pages), conv(kv.v_pages), conv(kv.page_table)
        else:
            self.k, self.v = conv(kv.k), conv(kv.v)
        self.lengths = conv(kv.lengths)


class _HostBounds:
    __slots__ = ("kmin", "kmax", "page_size", "__dict__")

    def __init__(self, bounds: PageBounds, conv: Any) -> None:
        self.kmin, self.kmax, self.page_size = conv(bounds.kmin), conv(bounds.kmax), bounds.page_size


class _HostCodes:
    __slots__ = ("codes", "scales", "__dict__")

    def __init__(self, codes: KeyCodes, conv: Any) -> None:
        self.codes, self.scales = conv(codes.codes), conv(codes.scales)


def _host_views(q: Any, kv: DenseKV | PagedKV, bounds: PageBounds | KeyCodes | None, start: Any = None
                ) -> tuple[Any, Any, Any, Any] | None:
    """``(q, kv, bounds, start)`` as NumPy (views of CPU torch tensors, zero-copy), or None for
    anything else: device arrays, other kinds, or a tensor that requires grad while grad mode is on
    (the checked path refuses it). ``bounds`` is the selection's side data: a Quest plan's
    PageBounds, or an int8 plan's KeyCodes."""
    t = type(q)
    if t is np.ndarray:
        if _all_numpy(kv, bounds, start):  # NumPy throughout: the objects themselves are the views
            return q, kv, bounds, start
        conv = _same
    elif kind_of(q) == "torch" and q.is_cpu:
        return _torch_host_views(q, kv, bounds, start)
    else:
        return None
    try:
        hkv, hb = _HostKV(kv, conv), None if bounds is None else _side_type(bounds)(bounds, conv)
        return conv(q), hkv, hb, None if start is None else conv(start)
    except _NotHost:
        return None


def _torch_host_views(q: Any, kv: DenseKV | PagedKV, bounds: PageBounds | None, start: Any
                      ) -> tuple[Any, Any, Any, Any] | None:
    """:func:`_host_views` of a CPU tensor ``q`` (the planned path's torch overhead: every line here
    is paid per run). A format passed again (a loop over one cache) keeps its views."""
    if sys.modules["torch"].is_grad_enabled() and _requires_grad(q, kv, bounds):
        return None
    try:
        hkv = _torch_views(kv, _HostKV, _kv_tensors(kv))
        hb = None if bounds is None else _torch_views(bounds, _side_type(bounds), _side_arrays(bounds))
        return _torch_view(q), hkv, hb, None if start is None else _torch_view(start)
    except _NotHost:
        return None


def _requires_grad(q: Any, kv: DenseKV | PagedKV, bounds: PageBounds | None) -> bool:
    """A tensor that requires grad (while grad mode is on: the checked path refuses it)."""
    if getattr(q, "requires_grad", False):
        return True
    for a in _values(kv, bounds):
        if getattr(a, "requires_grad", False):
            return True
    return False


def _side_type(side: PageBounds | KeyCodes) -> type:
    return _HostCodes if isinstance(side, KeyCodes) else _HostBounds


def _side_arrays(side: PageBounds | KeyCodes) -> tuple[Any, Any]:
    return (side.codes, side.scales) if isinstance(side, KeyCodes) else (side.kmin, side.kmax)


def _kv_tensors(kv: DenseKV | PagedKV) -> tuple[Any, ...]:
    if kv.paged:
        return kv.k_pages, kv.v_pages, kv.page_table, kv.lengths
    return kv.k, kv.v, kv.lengths


def _torch_views(fmt: Any, make: Any, tensors: tuple[Any, ...]) -> Any:
    """``make(fmt, _torch_view)``, kept on the (frozen) format of CPU tensors with each tensor's data
    pointer, shape and strides: a run that finds them unchanged reuses the views (and their metadata);
    a tensor resized or re-pointed in place (``resize_``, ``set_``, ``as_strided_``) makes new ones."""
    key = [(t.data_ptr(), t.shape, t.stride()) for t in tensors]
    d = fmt.__dict__
    found = d.get("_sc_torch_views")
    if found is not None and found[0] == key:
        return found[1]
    views = make(fmt, _torch_view)
    object.__setattr__(fmt, "_sc_torch_views", (key, views))
    return views


def _all_numpy(kv: DenseKV | PagedKV, bounds: PageBounds | None, start: Any) -> bool:
    nd = np.ndarray
    if kv.paged:
        ok = type(kv.k_pages) is nd and type(kv.v_pages) is nd and type(kv.page_table) is nd
    else:
        ok = type(kv.k) is nd and type(kv.v) is nd
    return ok and type(kv.lengths) is nd and (bounds is None or all(type(a) is nd for a in _side_arrays(bounds))) \
        and (start is None or type(start) is nd)


class _NotHost(Exception):
    pass


def _same(a: Any) -> np.ndarray:
    if type(a) is not np.ndarray:
        raise _NotHost
    return a


def _torch_view(a: Any) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor (``Tensor.numpy()`` refuses device tensors and tensors
    that require grad: those take the checked path)."""
    if kind_of(a) != "torch":
        raise _NotHost
    if a.dtype is sys.modules["torch"].bfloat16:  # NumPy has no bfloat16: to_numpy views its bits
        if a.device.type != "cpu" or a.requires_grad:
            raise _NotHost
        return to_numpy(a)
    try:
        return a.numpy()
    except (TypeError, RuntimeError):
        raise _NotHost from None


def _values(kv: DenseKV | PagedKV, bounds: PageBounds | KeyCodes | None) -> tuple[Any, ...]:
    vals = (kv.k_pages, kv.v_pages) if isinstance(kv, PagedKV) else (kv.k, kv.v)
    return vals if bounds is None else vals + _side_arrays(bounds)


def _host_out(out: Any, q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """NumPy views of ``out=(out, lse)`` when the launcher can write them directly (C-contiguous,
    writeable, the step's shapes and dtypes); None otherwise (the result is then copied in)."""
    if type(out) is not tuple or len(out) != 2:
        return None
    try:
        o, lse = (_same(a) if type(a) is np.ndarray else _torch_view(a) for a in out)
    except _NotHost:
        return None
    b, hq, d = q.shape
    if o.shape == (b, hq, d) and o.dtype == q.dtype and lse.shape == (b, hq) and lse.dtype == np.float32 \
            and o.flags.c_contiguous and lse.flags.c_contiguous and o.flags.writeable and lse.flags.writeable:
        return o, lse
    return None


def _metadata(q: np.ndarray, kv: Any, bounds: Any, start: np.ndarray | None) -> tuple[Any, ...]:
    """Everything a run's full check reads but the data and the cache's capacity (which may grow,
    a decode loop's cache: checked on its own): each buffer's shape, dtype, strides (and the bounds'
    layout) with the capacity's axis left out. The cache's and the bounds' part is kept on the
    (frozen) NumPy formats, as their signature is (:mod:`sparsecore.ops.base`): a decode loop that
    passes the same cache object each step reads only the step's ``q`` and ``start``."""
    return (q.shape, q.dtype, q.strides, None if start is None else (start.shape, start.dtype, start.strides),
            _cached_meta(kv, _kv_meta), None if bounds is None else _cached_meta(bounds, _side_meta))


def _cached_meta(obj: Any, fn: Any) -> tuple[Any, ...]:
    d = getattr(obj, "__dict__", None)
    if d is None:
        return fn(obj)
    m = d.get("_sc_plan_meta")
    if m is None:
        m = fn(obj)
        object.__setattr__(obj, "_sc_plan_meta", m)
    return m


def _kv_meta(kv: Any) -> tuple[Any, ...]:
    if kv.paged:  # capacity: max_pages (page_table's axis 1); the page pool's size P may change too
        arrays = ((kv.k_pages, 1), (kv.v_pages, 1), (kv.page_table, 2), (kv.lengths, 0))
    else:  # capacity: S, axis 1
        arrays = ((kv.k, 2), (kv.v, 2), (kv.lengths, 0))
    return (kv.paged,) + _arrays_meta(arrays)


def _side_meta(side: Any) -> tuple[Any, ...]:
    if not hasattr(side, "kmin"):  # int8 codes [B, S, Hkv, D] and scales [B, S, Hkv]: S may grow
        return ("codes", side.codes.shape[:1], side.scales.shape[:1], side.codes.flags.c_contiguous,
                side.scales.flags.c_contiguous) + _arrays_meta(((side.codes, 2), (side.scales, 2)))
    return _bounds_meta(side)


def _bounds_meta(bounds: Any) -> tuple[Any, ...]:
    # their page count may grow with the cache (checked against the capacity); an update writes them
    return (bounds.page_size, bounds.kmin.shape[:1], bounds.kmax.shape[:1],
            bounds.kmin.flags.c_contiguous, bounds.kmin.flags.writeable, bounds.kmax.flags.c_contiguous,
            bounds.kmax.flags.writeable) + _arrays_meta(((bounds.kmin, 2), (bounds.kmax, 2)))


def _arrays_meta(arrays: tuple[tuple[Any, int], ...]) -> tuple[Any, ...]:
    parts: tuple[Any, ...] = ()
    for a, keep in arrays:  # keep: the first axis after the capacity's (0: no capacity axis)
        if keep == 0:
            parts += (a.shape, a.dtype, a.strides)
        else:
            parts += (a.shape[:1] if keep == 2 else (), a.shape[keep:], a.dtype, a.strides[keep:])
    return parts


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

