"""Plan once, run many: top-k decode attention for a decode loop (FlashInfer's plan/run split).

A decode step of one layer is ``select_topk`` then ``sparse_decode``. Everything those two calls
decide from shapes (validation, the backend, ``k_max``, the default scale) is the same for every
layer of a model and every step of a batch, so :class:`DecodePlan` decides it once; each
:meth:`DecodePlan.run` then only launches, with no validation of the unchanged metadata and no host
synchronisation. ``SPARSECORE_VALIDATE=always`` makes every run check its data, for debugging.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._arrays import dtype_name
from .._checks import fail
from ..formats.codes import KeyCodes
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

        index = sc.select_topk(q, kv, k, method=..., sink=..., window=..., shared=..., bounds=bounds,
                               top_p=..., k_min=..., scale=scale if top_p else None, codes=codes, rescore=...)
        out, lse = sc.sparse_decode(q, kv, index, scale=scale)

    ``q`` and ``kv`` given to the constructor are examples of the shapes to come (their data is
    used once, to plan); a run takes arrays of the same library, a query of the same shape and dtype,
    and a cache with the same heads, head size and page size (checked: anything else is a
    ``ValueError``, not a wrong answer), whose capacity may have grown (a decode loop's cache) as
    long as it still holds ``k`` units. Each run returns new ``out`` and
    ``lse`` unless ``out=(out, lse)`` gives buffers to write. The index of the last run is
    :attr:`last_index` (it is overwritten by the next run).
    """

    def __init__(self, q: Any, kv: DenseKV | PagedKV, k: int, *, method: str = "exact", sink: int = 0,
                 window: int = 0, shared: bool = True, page_size: int | None = None,
                 bounds: PageBounds | None = None, scale: float | None = None, top_p: float | None = None,
                 k_min: int = 0, codes: KeyCodes | None = None, rescore: int = 0, backend: str | None = None) -> None:
        # an adaptive budget estimates the attention mass with the attention's own scale
        select_inp = I.SelectTopkInputs(q, kv, k, method, sink, window, shared, page_size, bounds, top_p, k_min,
                                        scale if top_p is not None else None, codes, rescore)
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
        self.last_index: TopKIndex | None = index

    @property
    def backends(self) -> dict[str, str]:
        """The backend (or variant) name that runs each of the two ops."""
        return {"select_topk": self._select.backend.NAME, "sparse_decode": self._decode.backend.NAME}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"DecodePlan(q {self._shape[1]} {self._shape[2]}, {opts}; backends {self.backends})"

    def run(self, q: Any, kv: DenseKV | PagedKV, *, bounds: PageBounds | None = None,
            out: tuple[Any, Any] | None = None, codes: KeyCodes | None = None) -> tuple[Any, Any]:
        """``(out[B, Hq, D], lse[B, Hq])`` of this step (see the class docstring)."""
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
        index = self._launch(self._select.backend, select_inp, q)
        self.last_index = index
        decode_inp = I.SparseDecodeInputs(q, kv, index, self.scale)
        if checking:
            decode_inp.validate()
            decode_inp.validate_data()
        result = self._launch(self._decode.backend, decode_inp, q)
        if out is None:
            return result
        _write(out, result)
        return out


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
        inp = I.SelectTopkInputs(q, kv, **dict(self._options, bounds=bounds, codes=codes))
        ps = inp.unit_page_size
        units = kv.max_len if ps is None else -(-kv.max_len // ps)
        if self._options["k"] > units:
            fail("DecodePlan.run", f"k = {self._options['k']} exceeds the cache's capacity of {units} "
                                   f"{'tokens' if ps is None else 'pages'}; make a plan with a smaller k")
        if self._select.backend.DEVICE != "host" or self._decode.backend.DEVICE != "host":
            self._select = plan(inp, self._backend)
            index = self._select.backend.apply(inp)
            self._decode = plan(I.SparseDecodeInputs(q, kv, index, self.scale), self._backend)
        self._capacity = _capacity(kv)


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

