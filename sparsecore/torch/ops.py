"""Every public op as a ``torch.library`` custom op in the namespace ``sparsecore``.

Formats cross the op boundary as their tensors plus plain ints (``torch.library`` ops take tensors,
scalars and strings only):

- a sparse operand (TiledELL or CSR) is ``values, cols, counts, ov_indptr?, ov_indices?, ov_data?,
  m, k, tile, sorted``. A TiledELL without overflow passes ``None`` for the three ``ov_`` buffers.
  A CSR passes ``tile = 0`` and its ``indptr, indices, data`` as the ``ov_`` buffers; its
  ``values, cols, counts`` are empty placeholders (see :meth:`TorchCSR.op_args`).
- a TopKIndex is ``indices, counts`` plus ``index_page_size`` (``None``: token granularity).
- a KV cache is ``k, v, lengths, page_table?`` (``page_table`` given: a PagedKV, ``k, v`` are pages).
- a PageBounds is ``kmin, kmax`` (its ``page_size`` travels as the op's ``page_size``);
  ``page_bounds_update`` writes them in place (declared in ``mutates_args``).

The bodies rebuild the :mod:`sparsecore` formats around the tensors (zero-copy) and call the public
ops, so the dispatcher picks numba_cpu / reference for CPU tensors and the GPU backends for CUDA
tensors. The fake (meta) implementations derive output shapes from input shapes only, after running
the same cheap ``Inputs.validate()`` as the real op (so bad input raises the same message under
``torch.compile``). ``pack``'s overflow size depends on the data: its fake gives the overflow an
unbacked size from ``torch.library.get_ctx().new_dynamic_size()``; the overflow ``indptr`` is always
``[M + 1]`` int64 and an empty overflow is a zero-length CSR, never ``None``, so the outputs have
one fixed schema.

Users hold one object per format: :class:`TorchTiledELL`, :class:`TorchCSR`, :class:`TorchTopKIndex`
(NamedTuples of tensors, so ``torch.compile`` passes them in and out of a graph without a break).
The Python functions at the bottom take those (or :mod:`sparsecore` formats holding tensors) and call
the custom ops; their gradients are registered in :mod:`sparsecore.torch.functional`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .. import ops as _ops
from .._arrays import from_numpy as _from_numpy
from .._arrays import to_numpy as _to_numpy
from ..formats.csr import CSR
from ..formats.kv import DenseKV, PageBounds, PagedKV
from ..formats.tiled_ell import TiledELL
from ..formats.topk import TopKIndex, topk_capacity
from ..ops import inputs as _I

__all__ = ["TorchTiledELL", "TorchCSR", "TorchTopKIndex", "TorchPageBounds", "as_torch_sparse", "as_torch_index",
           "pack", "gated_pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn", "relu_gate", "page_bounds",
           "select_topk", "sparse_decode", "dense_decode", "merge_attention", "OP_NAMES", "SparseArgs", "N_SPARSE"]

NS = "sparsecore"
Tensor = torch.Tensor

#: the qualified names of the custom ops, ``torch.ops.sparsecore.<name>``.
OP_NAMES: tuple[str, ...] = ("pack", "gated_pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn", "relu_gate",
                             "page_bounds", "page_bounds_update", "select_topk", "sparse_decode", "dense_decode",
                             "merge_attention")


# --------------------------------------------------------------------------------------------------
# torch-side holders of the formats
# --------------------------------------------------------------------------------------------------

class TorchCSR(NamedTuple):
    """A :class:`sparsecore.CSR` as tensors: ``indptr[M + 1]``, ``indices[nnz]``, ``data[nnz]``."""

    indptr: Tensor
    indices: Tensor
    data: Tensor
    shape: tuple[int, int]
    sorted: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to_format(self) -> CSR:
        return CSR(self.indptr, self.indices, self.data, tuple(self.shape), self.sorted)

    @classmethod
    def from_format(cls, a: CSR) -> TorchCSR:
        return cls(_as_tensor(a.indptr), _as_tensor(a.indices), _as_tensor(a.data), tuple(a.shape), a.sorted)

    def with_values(self, data: Tensor) -> TorchCSR:
        return self._replace(data=data)

    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def op_args(self) -> SparseArgs:
        """The sparse-operand arguments of the custom ops (``tile = 0`` marks a CSR)."""
        return SparseArgs(_placeholder(self.data, 3), _placeholder(self.indices, 3, torch.int16),
                          _placeholder(self.indices, 2, torch.int32), self.indptr, self.indices, self.data,
                          self.shape[0], self.shape[1], 0, bool(self.sorted))


class TorchTiledELL(NamedTuple):
    """A :class:`sparsecore.TiledELL` as tensors (the buffers of ``docs/formats.md``).

    ``overflow_*`` are the overflow CSR's ``indptr[M + 1]``, ``indices[n]``, ``data[n]``, or all
    ``None``. What :func:`pack` returns always has them (an empty overflow has ``n = 0``).
    """

    values: Tensor
    cols: Tensor
    counts: Tensor
    shape: tuple[int, int]
    tile: int
    overflow_indptr: Tensor | None = None
    overflow_indices: Tensor | None = None
    overflow_data: Tensor | None = None
    sorted: bool = True

    @property
    def capacity(self) -> int:
        return self.values.shape[2]  # int, or a SymInt while torch.compile traces

    @property
    def n_tiles(self) -> int:
        return self.values.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def overflow(self) -> TorchCSR | None:
        if self.overflow_indptr is None:
            return None
        return TorchCSR(self.overflow_indptr, self.overflow_indices, self.overflow_data, tuple(self.shape),
                        self.sorted)

    def filled(self) -> Tensor:
        """Bool ``[M, n_tiles, capacity]``: which slots hold data (the rest are padding)."""
        return torch.arange(self.capacity, device=self.counts.device) < self.counts.unsqueeze(-1)

    def nnz(self) -> Tensor:
        """Stored entries (slots and overflow) as a 0-d int64 tensor (no host sync)."""
        n = self.counts.sum(dtype=torch.int64)
        if self.overflow_indices is not None:
            n = n + self.overflow_indices.shape[0]
        return n

    def nnz_per_row(self) -> Tensor:
        """Stored entries per row, ``[M]`` int64."""
        n = self.counts.sum(dim=1, dtype=torch.int64)
        if self.overflow_indptr is not None:
            n = n + self.overflow_indptr.diff().to(torch.int64)
        return n

    def density(self) -> Tensor:
        """Fraction of the ``M * K`` entries that are stored, a 0-d float32 tensor."""
        m, k = self.shape
        return self.nnz().to(torch.float32) / torch.sym_max(m * k, 1)

    def with_values(self, values: Tensor, overflow_data: Tensor | None = None) -> TorchTiledELL:
        """The same structure with other values (``overflow_data`` required iff there is an overflow)."""
        return self._replace(values=values, overflow_data=overflow_data)

    def to_format(self) -> TiledELL:
        ov = self.overflow
        return TiledELL(self.values, self.cols, self.counts, tuple(self.shape), int(self.tile),
                        None if ov is None else ov.to_format(), self.sorted)

    @classmethod
    def from_format(cls, a: TiledELL) -> TorchTiledELL:
        ov = a.overflow
        return cls(_as_tensor(a.values), _as_tensor(a.cols), _as_tensor(a.counts), tuple(a.shape), int(a.tile),
                   None if ov is None else _as_tensor(ov.indptr), None if ov is None else _as_tensor(ov.indices),
                   None if ov is None else _as_tensor(ov.data), a.sorted)

    def to_dense(self) -> Tensor:
        return unpack(self)

    def op_args(self) -> SparseArgs:
        """The sparse-operand arguments of the custom ops."""
        return SparseArgs(self.values, self.cols, self.counts, self.overflow_indptr, self.overflow_indices,
                          self.overflow_data, self.shape[0], self.shape[1], self.tile, bool(self.sorted))


class TorchTopKIndex(NamedTuple):
    """A :class:`sparsecore.TopKIndex` as tensors: ``indices[B, G, k_max]``, ``counts[B, G]`` int32."""

    indices: Tensor
    counts: Tensor
    granularity: str = "token"
    page_size: int | None = None

    def to_format(self) -> TopKIndex:
        return TopKIndex(self.indices, self.counts, self.granularity, self.page_size)

    @classmethod
    def from_format(cls, index: TopKIndex) -> TorchTopKIndex:
        return cls(_as_tensor(index.indices), _as_tensor(index.counts), index.granularity, index.page_size)


class TorchPageBounds(NamedTuple):
    """A :class:`sparsecore.PageBounds` as tensors: ``kmin[B, P, Hkv, D]``, ``kmax`` (the keys' dtype)."""

    kmin: Tensor
    kmax: Tensor
    page_size: int

    def to_format(self) -> PageBounds:
        return PageBounds(self.kmin, self.kmax, self.page_size)

    @classmethod
    def from_format(cls, b: PageBounds) -> TorchPageBounds:
        return cls(_as_tensor(b.kmin), _as_tensor(b.kmax), b.page_size)


SparseLike = TorchTiledELL | TorchCSR | TiledELL | CSR


def _as_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return _from_numpy(_to_numpy(x), "torch")  # NumPy (host) buffers: zero-copy (bfloat16 by its bits)


def _on_host(*ts: Tensor | None) -> bool:
    """True when every tensor given is on the CPU. The FFN custom ops then call :mod:`sparsecore`
    with NumPy views of their tensors (zero-copy) and wrap the NumPy results back: the public path
    on NumPy arrays skips the per-buffer torch conversions inside the dispatcher (about 50 us less
    per call at decode sizes). Device tensors are passed as they are."""
    return all(t is None or t.device.type == "cpu" for t in ts)


def _view(t: Tensor | None, host: bool) -> Any:
    """``t`` as the op takes it: a NumPy view when ``host`` (see :func:`_on_host`), else itself."""
    return _to_numpy(t) if host and t is not None else t


def _placeholder(like: Tensor, ndim: int, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_zeros((0,) * ndim, dtype=dtype or like.dtype)


def as_torch_sparse(a: Any, where: str = "sparsecore.torch", name: str = "a") -> TorchTiledELL | TorchCSR:
    """``a`` as a :class:`TorchTiledELL` or :class:`TorchCSR` (a sparsecore format holding tensors,
    or one holding NumPy arrays, which is wrapped zero-copy)."""
    if isinstance(a, (TorchTiledELL, TorchCSR)):
        return a
    if isinstance(a, TiledELL):
        return TorchTiledELL.from_format(a)
    if isinstance(a, CSR):
        return TorchCSR.from_format(a)
    raise TypeError(f"{where}: {name} must be a TorchTiledELL, TorchCSR, sparsecore.TiledELL or sparsecore.CSR, "
                    f"got {type(a).__name__}; convert a dense tensor with sparsecore.torch.pack")


def as_torch_index(index: Any, where: str = "sparse_decode") -> TorchTopKIndex:
    if isinstance(index, TorchTopKIndex):
        return index
    if isinstance(index, TopKIndex):
        return TorchTopKIndex.from_format(index)
    raise TypeError(f"{where}: index must be a TorchTopKIndex or a sparsecore.TopKIndex, got {type(index).__name__}")


def _like(a: TorchTiledELL | TorchCSR, values: Tensor, ov_data: Tensor) -> TorchTiledELL | TorchCSR:
    """``a``'s structure with the values an op returned in the sparse-operand layout."""
    if isinstance(a, TorchCSR):
        return a._replace(data=ov_data)
    return a._replace(values=values, overflow_data=None if a.overflow_indptr is None else ov_data)


# --------------------------------------------------------------------------------------------------
# inside the ops: tensors <-> formats
# --------------------------------------------------------------------------------------------------

class SparseArgs(NamedTuple):
    """The sparse operand (TiledELL or CSR) as the custom ops take it, field by field:
    ``values, cols, counts, ov_indptr?, ov_indices?, ov_data?, m, k, tile, sorted``. A CSR has
    ``tile = 0``, its ``indptr, indices, data`` in the ``ov_`` fields and empty placeholders for
    ``values, cols, counts``; a TiledELL without overflow has ``None`` in the three ``ov_`` fields.
    ``torch.ops.sparsecore.<op>(*args, ...)`` spreads it into a schema's positional arguments;
    :meth:`take` reads it back from an autograd ``inputs`` tuple."""

    values: Tensor
    cols: Tensor
    counts: Tensor
    ov_indptr: Tensor | None
    ov_indices: Tensor | None
    ov_data: Tensor | None
    m: int
    k: int
    tile: int
    sorted: bool

    @classmethod
    def take(cls, inputs: Sequence[Any], start: int) -> SparseArgs:
        """The operand at ``inputs[start : start + 10]``."""
        return cls(*inputs[start:start + len(cls._fields)])

    @property
    def is_csr(self) -> bool:
        return self.tile == 0

    @property
    def has_overflow(self) -> bool:
        return self.ov_indptr is not None

    def with_values(self, values: Tensor, ov_data: Tensor | None) -> SparseArgs:
        """The same structure with other values (``ov_data`` is dropped when there is no overflow)."""
        return self._replace(values=values, ov_data=ov_data if self.has_overflow else None)

    def to_format(self, host: bool = False) -> TiledELL | CSR:
        """The :mod:`sparsecore` format around the same tensors (no copy); with ``host``, around NumPy
        views of them (see :func:`_on_host`)."""
        shape = (self.m, self.k)
        ip, ix, dt = (_view(t, host) for t in (self.ov_indptr, self.ov_indices, self.ov_data))
        if self.is_csr:
            return CSR(ip, ix, dt, shape, self.sorted)
        ov = None
        if ip is not None or ix is not None or dt is not None:
            if ip is None or ix is None or dt is None:
                raise ValueError("sparsecore: a TiledELL's overflow needs all of indptr, indices and data (or none)")
            ov = CSR(ip, ix, dt, shape, self.sorted)
        return TiledELL(_view(self.values, host), _view(self.cols, host), _view(self.counts, host), shape, self.tile,
                        ov, self.sorted)

    @property
    def tensors(self) -> tuple[Tensor | None, ...]:
        return self.values, self.cols, self.counts, self.ov_indptr, self.ov_indices, self.ov_data

    def concrete(self) -> bool:
        return _concrete(self.m, self.k, self.tile)


#: the number of positional arguments a sparse operand takes in a custom op's schema
N_SPARSE = len(SparseArgs._fields)


def _kv(k: Tensor, v: Tensor, lengths: Tensor, page_table: Tensor | None) -> DenseKV | PagedKV:
    return DenseKV(k, v, lengths) if page_table is None else PagedKV(k, v, page_table, lengths)


def _index(indices: Tensor, counts: Tensor, page_size: int | None) -> TopKIndex:
    return TopKIndex(indices, counts, "token" if page_size is None else "page", page_size)


def _concrete(*vals: Any) -> bool:
    """True when no int argument is symbolic: the sparsecore formats and ``Inputs`` take Python ints,
    so the fake implementations run their cheap validation only then (under dynamic shapes the real
    op still validates when it runs)."""
    return not any(isinstance(v, torch.SymInt) for v in vals)


def _fresh(out: Tensor, *inputs: Any) -> Tensor:
    """A custom op's output may not alias an input: copy in the rare case a backend returned a view."""
    out = out.contiguous()
    if out.numel() == 0:
        return out.clone()
    p = out.untyped_storage().data_ptr()
    for t in inputs:
        if isinstance(t, Tensor) and t.numel() and t.untyped_storage().data_ptr() == p:
            return out.clone()
    return out


# --------------------------------------------------------------------------------------------------
# the custom ops
# --------------------------------------------------------------------------------------------------



@torch.library.custom_op(f"{NS}::pack", mutates_args=())
def _pack(x: Tensor, threshold: float, activation: str | None, tile: int, capacity: int | None,
          backend: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = _ops.pack(_view(x, _on_host(x)), threshold=threshold, activation=activation, tile=tile, capacity=capacity,
                  backend=backend)
    return _pack_outputs(a, x)


def _pack_outputs(a: TiledELL, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    values, cols, counts = (_fresh(_as_tensor(t), *inputs) for t in (a.values, a.cols, a.counts))
    m = a.shape[0]
    if a.overflow is None:
        ip = torch.zeros(m + 1, dtype=torch.int64, device=values.device)
        ix = torch.zeros(0, dtype=torch.int64, device=values.device)
        dt = values.new_zeros(0)
    else:
        ip = _as_tensor(a.overflow.indptr).to(torch.int64)
        ix = _as_tensor(a.overflow.indices).to(torch.int64)
        dt = _fresh(_as_tensor(a.overflow.data), *inputs)
        ip, ix = _fresh(ip, *inputs), _fresh(ix, *inputs)
    return values, cols, counts, ip, ix, dt


def _pack_fake_outputs(x: Tensor, tile: int, capacity: int) -> tuple[Tensor, ...]:
    m, k = x.shape
    nt = (k + tile - 1) // tile
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((m, nt, capacity)), x.new_empty((m, nt, capacity), dtype=torch.int16),
            x.new_empty((m, nt), dtype=torch.int32), x.new_empty((m + 1,), dtype=torch.int64),
            x.new_empty((nnz,), dtype=torch.int64), x.new_empty((nnz,)))


@_pack.register_fake
def _(x, threshold, activation, tile, capacity, backend):
    if not _concrete(tile, capacity):
        return _pack_fake_outputs(x, tile, capacity if capacity is not None else torch.sym_max(tile // 8, 1))
    inp = _I.PackInputs(x, threshold, activation, tile, capacity)
    inp.validate()
    return _pack_fake_outputs(x, inp.tile, inp.capacity)


@torch.library.custom_op(f"{NS}::gated_pack", mutates_args=())
def _gated_pack(gate: Tensor, up: Tensor, threshold: float, activation: str | None, tile: int, capacity: int | None,
                backend: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    h = _on_host(gate, up)
    a = _ops.gated_pack(_view(gate, h), _view(up, h), threshold=threshold, activation=activation, tile=tile,
                        capacity=capacity, backend=backend)
    return _pack_outputs(a, gate, up)


@_gated_pack.register_fake
def _(gate, up, threshold, activation, tile, capacity, backend):
    if not _concrete(tile, capacity):
        return _pack_fake_outputs(gate, tile, capacity if capacity is not None else torch.sym_max(tile // 8, 1))
    inp = _I.GatedPackInputs(gate, up, threshold, activation, tile, capacity)
    inp.validate()
    return _pack_fake_outputs(gate, inp.tile, inp.capacity)


@torch.library.custom_op(f"{NS}::relu_gate", mutates_args=())
def _relu_gate(x: Tensor, w_gate: Tensor, threshold: float, tile: int, capacity: int | None,
               backend: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_gate(x, w_gate)
    z = x @ w_gate.T
    a = _ops.pack(_view(z, _on_host(z)), threshold=threshold, activation="relu", tile=tile, capacity=capacity,
                  backend=backend)
    return _pack_outputs(a, x, w_gate)


def _check_gate(x: Tensor, w_gate: Tensor) -> None:
    w = "relu_gate"
    if x.dim() != 2 or w_gate.dim() != 2:
        raise ValueError(f"{w}: x has shape {tuple(x.shape)} and w_gate has shape {tuple(w_gate.shape)}; expected "
                         "2 dimensions each, x[M, D] and w_gate[K, D]")
    if x.shape[1] != w_gate.shape[1]:
        raise ValueError(f"{w}: x has shape {tuple(x.shape)} and w_gate has shape {tuple(w_gate.shape)}; "
                         "x.shape[1] must equal w_gate.shape[1] (D)")
    if x.dtype != w_gate.dtype:
        raise TypeError(f"{w}: x has dtype {x.dtype} but w_gate has {w_gate.dtype}; they must match")


@_relu_gate.register_fake
def _(x, w_gate, threshold, tile, capacity, backend):
    _check_gate(x, w_gate)
    g = x.new_empty((x.shape[0], w_gate.shape[0]))
    if not _concrete(tile, capacity):
        return _pack_fake_outputs(g, tile, capacity if capacity is not None else torch.sym_max(tile // 8, 1))
    inp = _I.PackInputs(g, threshold, "relu", tile, capacity)
    inp.validate()
    return _pack_fake_outputs(g, inp.tile, inp.capacity)


@torch.library.custom_op(f"{NS}::unpack", mutates_args=())
def _unpack(values: Tensor, cols: Tensor, counts: Tensor, ov_indptr: Tensor | None, ov_indices: Tensor | None,
            ov_data: Tensor | None, m: int, k: int, tile: int, sorted: bool, backend: str | None) -> Tensor:
    sp = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted)
    a = sp.to_format(_on_host(*sp.tensors))
    return _fresh(_as_tensor(_ops.unpack(a, backend=backend)), values, ov_data)


@_unpack.register_fake
def _(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, backend):
    if _concrete(m, k, tile):
        a = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted).to_format()
        _I.UnpackInputs(a).validate()
    return values.new_empty((m, k))


@torch.library.custom_op(f"{NS}::spmm", mutates_args=())
def _spmm(values: Tensor, cols: Tensor, counts: Tensor, ov_indptr: Tensor | None, ov_indices: Tensor | None,
          ov_data: Tensor | None, m: int, k: int, tile: int, sorted: bool, w: Tensor, backend: str | None) -> Tensor:
    sp = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted)
    h = _on_host(*sp.tensors, w)
    return _fresh(_as_tensor(_ops.spmm(sp.to_format(h), _view(w, h), backend=backend)), w)


@_spmm.register_fake
def _(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, w, backend):
    if _concrete(m, k, tile):
        a = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted).to_format()
        _I.SpmmInputs(a, w).validate()
    return w.new_empty((m, w.shape[1]))


@torch.library.custom_op(f"{NS}::sddmm", mutates_args=())
def _sddmm(x: Tensor, w: Tensor, values: Tensor, cols: Tensor, counts: Tensor, ov_indptr: Tensor | None,
           ov_indices: Tensor | None, ov_data: Tensor | None, m: int, k: int, tile: int, sorted: bool,
           backend: str | None) -> tuple[Tensor, Tensor]:
    """Returns ``(values, ov_data)`` in the pattern's layout (``ov_data`` empty without an overflow;
    for a CSR pattern ``values`` is the empty placeholder and ``ov_data`` the CSR's data)."""
    sp = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted)
    h = _on_host(*sp.tensors, x, w)
    r = _ops.sddmm(_view(x, h), _view(w, h), sp.to_format(h), backend=backend)
    if isinstance(r, CSR):
        return x.new_zeros(values.shape), _fresh(_as_tensor(r.data), x, w, ov_data)
    vals = _fresh(_as_tensor(r.values), x, w, values)
    ov = x.new_zeros(0) if r.overflow is None else _fresh(_as_tensor(r.overflow.data), x, w, ov_data)
    return vals, ov


@_sddmm.register_fake
def _(x, w, values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, backend):
    if _concrete(m, k, tile):
        a = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted).to_format()
        _I.SddmmInputs(x, w, a).validate()
    ov = x.new_empty((0,)) if ov_data is None else x.new_empty(ov_data.shape)
    return x.new_empty(values.shape), ov


@torch.library.custom_op(f"{NS}::spmm_t", mutates_args=())
def _spmm_t(values: Tensor, cols: Tensor, counts: Tensor, ov_indptr: Tensor | None, ov_indices: Tensor | None,
            ov_data: Tensor | None, m: int, k: int, tile: int, sorted: bool, dy: Tensor,
            backend: str | None) -> Tensor:
    sp = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted)
    h = _on_host(*sp.tensors, dy)
    return _fresh(_as_tensor(_ops.spmm_t(sp.to_format(h), _view(dy, h), backend=backend)), dy)


@_spmm_t.register_fake
def _(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, dy, backend):
    if _concrete(m, k, tile):
        a = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted).to_format()
        _I.SpmmTInputs(a, dy).validate()
    return dy.new_empty((k, dy.shape[1]))


@torch.library.custom_op(f"{NS}::gated_ffn", mutates_args=())
def _gated_ffn(x: Tensor, values: Tensor, cols: Tensor, counts: Tensor, ov_indptr: Tensor | None,
               ov_indices: Tensor | None, ov_data: Tensor | None, m: int, k: int, tile: int, sorted: bool,
               w_up: Tensor, w_down: Tensor, backend: str | None) -> Tensor:
    sp = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted)
    h = _on_host(*sp.tensors, x, w_up, w_down)
    out = _ops.gated_ffn(_view(x, h), sp.to_format(h), _view(w_up, h), _view(w_down, h), backend=backend)
    return _fresh(_as_tensor(out), x, w_up, w_down)


@_gated_ffn.register_fake
def _(x, values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, w_up, w_down, backend):
    if _concrete(m, k, tile):
        g = SparseArgs(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted).to_format()
        _I.GatedFfnInputs(x, g, w_up, w_down).validate()
    return x.new_empty((m, w_down.shape[1]))


def _bounds(kmin: Tensor | None, kmax: Tensor | None, page_size: int | None) -> PageBounds | None:
    return None if kmin is None else PageBounds(kmin, kmax, page_size)


@torch.library.custom_op(f"{NS}::page_bounds", mutates_args=())
def _page_bounds(k_cache: Tensor, v_cache: Tensor, lengths: Tensor, page_table: Tensor | None, page_size: int,
                 backend: str | None) -> tuple[Tensor, Tensor]:
    r = _ops.page_bounds(_kv(k_cache, v_cache, lengths, page_table), page_size, backend=backend)
    return _fresh(_as_tensor(r.kmin), k_cache), _fresh(_as_tensor(r.kmax), k_cache)


@_page_bounds.register_fake
def _(k_cache, v_cache, lengths, page_table, page_size, backend):
    inp = _I.PageBoundsInputs(_kv(k_cache, v_cache, lengths, page_table), page_size)
    if _concrete(page_size):
        inp.validate()
    max_len = k_cache.shape[1] if page_table is None else page_table.shape[1] * k_cache.shape[1]
    shape = (k_cache.shape[0] if page_table is None else page_table.shape[0], -(-max_len // page_size),
             k_cache.shape[2], k_cache.shape[3])
    return k_cache.new_empty(shape), k_cache.new_empty(shape)


@torch.library.custom_op(f"{NS}::page_bounds_update", mutates_args=("kmin", "kmax"))
def _page_bounds_update(k_cache: Tensor, v_cache: Tensor, lengths: Tensor, page_table: Tensor | None,
                        kmin: Tensor, kmax: Tensor, page_size: int, start: Tensor | None,
                        backend: str | None) -> None:
    _ops.page_bounds(_kv(k_cache, v_cache, lengths, page_table), out=PageBounds(kmin, kmax, page_size),
                     start=start, backend=backend)


@_page_bounds_update.register_fake
def _(k_cache, v_cache, lengths, page_table, kmin, kmax, page_size, start, backend):
    if _concrete(page_size):
        _I.PageBoundsInputs(_kv(k_cache, v_cache, lengths, page_table), None, PageBounds(kmin, kmax, page_size),
                            start).validate()


@torch.library.custom_op(f"{NS}::select_topk", mutates_args=())
def _select_topk(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, page_table: Tensor | None, k: int,
                 method: str, sink: int, window: int, shared: bool, page_size: int | None,
                 bounds_min: Tensor | None, bounds_max: Tensor | None, backend: str | None,
                 top_p: float | None = None, k_min: int = 0, scale: float | None = None,
                 candidates: int = 0, tail_sample: int | None = None) -> tuple[Tensor, Tensor]:
    kv = _kv(k_cache, v_cache, lengths, page_table)
    r = _ops.select_topk(q, kv, k, method=method, sink=sink, window=window, shared=shared, page_size=page_size,
                         bounds=_bounds(bounds_min, bounds_max, page_size), top_p=top_p, k_min=k_min, scale=scale,
                         candidates=candidates, tail_sample=tail_sample, backend=backend)
    return _fresh(_as_tensor(r.indices), q, lengths), _fresh(_as_tensor(r.counts), q, lengths)


@_select_topk.register_fake
def _(q, k_cache, v_cache, lengths, page_table, k, method, sink, window, shared, page_size, bounds_min, bounds_max,
      backend, top_p=None, k_min=0, scale=None, candidates=0, tail_sample=None):
    inp = _I.SelectTopkInputs(q, _kv(k_cache, v_cache, lengths, page_table), k, method, sink, window, shared,
                              page_size, None, top_p, k_min, scale, None, 0, candidates, tail_sample)
    if _concrete(k, sink, window, page_size, k_min, candidates, tail_sample):
        inp.validate()
        if bounds_min is not None:
            _I.SelectTopkInputs(q, inp.kv, k, method, sink, window, shared, page_size,
                                _bounds(bounds_min, bounds_max, page_size)).validate()
    g = k_cache.shape[2] if shared else q.shape[1]
    max_len = k_cache.shape[1] if page_table is None else page_table.shape[1] * k_cache.shape[1]
    kmax = topk_capacity(k, sink, window if method != "quest" else torch.sym_max(window, 1), max_len,
                         inp.unit_page_size)
    b = q.shape[0]
    return q.new_empty((b, g, kmax), dtype=torch.int32), q.new_empty((b, g), dtype=torch.int32)


@torch.library.custom_op(f"{NS}::sparse_decode", mutates_args=())
def _sparse_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, page_table: Tensor | None,
                   indices: Tensor, counts: Tensor, index_page_size: int | None, scale: float | None,
                   backend: str | None) -> tuple[Tensor, Tensor]:
    kv = _kv(k_cache, v_cache, lengths, page_table)
    out, lse = _ops.sparse_decode(q, kv, _index(indices, counts, index_page_size), scale=scale, backend=backend)
    return _fresh(out, q), _fresh(lse, q)


@_sparse_decode.register_fake
def _(q, k_cache, v_cache, lengths, page_table, indices, counts, index_page_size, scale, backend):
    kv = _kv(k_cache, v_cache, lengths, page_table)
    if _concrete(index_page_size):
        _I.SparseDecodeInputs(q, kv, _index(indices, counts, index_page_size), scale).validate()
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op(f"{NS}::dense_decode", mutates_args=())
def _dense_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, page_table: Tensor | None,
                  scale: float | None, backend: str | None) -> tuple[Tensor, Tensor]:
    out, lse = _ops.dense_decode(q, _kv(k_cache, v_cache, lengths, page_table), scale=scale, backend=backend)
    return _fresh(out, q), _fresh(lse, q)


@_dense_decode.register_fake
def _(q, k_cache, v_cache, lengths, page_table, scale, backend):
    _I.DenseDecodeInputs(q, _kv(k_cache, v_cache, lengths, page_table), scale).validate()
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op(f"{NS}::merge_attention", mutates_args=())
def _merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor,
                     backend: str | None) -> tuple[Tensor, Tensor]:
    out, lse = _ops.merge_attention(o1, lse1, o2, lse2, backend=backend)
    return _fresh(_as_tensor(out), o1, o2), _fresh(_as_tensor(lse), lse1, lse2)


@_merge_attention.register_fake
def _(o1, lse1, o2, lse2, backend):
    _I.MergeAttentionInputs(o1, lse1, o2, lse2).validate()
    return o1.new_empty(o1.shape), lse1.new_empty(lse1.shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# the Python face: formats in, formats out
# --------------------------------------------------------------------------------------------------

def _ell_from_outputs(outs: Sequence[Tensor], shape: tuple[int, int], tile: int) -> TorchTiledELL:
    values, cols, counts, ip, ix, dt = outs
    # no int(): under torch.compile with dynamic shapes M stays symbolic instead of being specialised
    return TorchTiledELL(values, cols, counts, (shape[0], shape[1]), tile, ip, ix, dt, True)


def pack(x: Tensor, *, threshold: float = 0.0, activation: str | None = None, tile: int = 256,
         capacity: int | None = None, backend: str | None = None) -> TorchTiledELL:
    """:func:`sparsecore.pack` as a custom op; differentiable w.r.t. ``x`` (the gradient reaches the
    kept entries only; with ``activation="relu"`` the ReLU is fused)."""
    outs = torch.ops.sparsecore.pack(x, threshold, activation, tile, capacity, backend)
    return _ell_from_outputs(outs, tuple(x.shape), tile)


def gated_pack(gate: Tensor, up: Tensor, *, threshold: float = 0.0, activation: str | None = "relu", tile: int = 256,
               capacity: int | None = None, backend: str | None = None) -> TorchTiledELL:
    """:func:`sparsecore.gated_pack` as a custom op; differentiable w.r.t. ``gate`` and ``up`` (the
    gradient reaches the kept entries only)."""
    outs = torch.ops.sparsecore.gated_pack(gate, up, threshold, activation, tile, capacity, backend)
    return _ell_from_outputs(outs, tuple(gate.shape), tile)


def relu_gate(x: Tensor, w_gate: Tensor, *, threshold: float = 0.0, tile: int = 256, capacity: int | None = None,
              backend: str | None = None) -> TorchTiledELL:
    """``pack(x @ w_gate.T, activation="relu")`` as one op whose backward is sparse:
    ``dx = spmm(dH, w_gate)``, ``dw_gate = spmm_t(dH, x)`` (the hidden gradient stays packed)."""
    outs = torch.ops.sparsecore.relu_gate(x, w_gate, threshold, tile, capacity, backend)
    return _ell_from_outputs(outs, (x.shape[0], w_gate.shape[0]), tile)


def unpack(a: TorchTiledELL | TiledELL, *, backend: str | None = None) -> Tensor:
    """The dense ``[M, K]`` tensor of ``a``."""
    a = as_torch_sparse(a, "unpack")
    if isinstance(a, TorchCSR):
        raise TypeError("unpack: a must be a TiledELL, got TorchCSR")
    return torch.ops.sparsecore.unpack(*a.op_args(), backend)


def spmm(a: SparseLike, w: Tensor, *, backend: str | None = None) -> Tensor:
    """``A @ W`` (:func:`sparsecore.spmm`); differentiable w.r.t. ``a``'s values and ``w``."""
    a = as_torch_sparse(a, "spmm")
    return torch.ops.sparsecore.spmm(*a.op_args(), w, backend)


def sddmm(x: Tensor, w: Tensor, pattern: SparseLike, *, backend: str | None = None) -> TorchTiledELL | TorchCSR:
    """``x @ W.T`` at ``pattern``'s positions (:func:`sparsecore.sddmm`); differentiable w.r.t. ``x``, ``w``."""
    p = as_torch_sparse(pattern, "sddmm", "pattern")
    values, ov = torch.ops.sparsecore.sddmm(x, w, *p.op_args(), backend)
    return _like(p, values, ov)


def spmm_t(a: SparseLike, dy: Tensor, *, backend: str | None = None) -> Tensor:
    """``A.T @ dy`` (:func:`sparsecore.spmm_t`); differentiable w.r.t. ``a``'s values and ``dy``."""
    a = as_torch_sparse(a, "spmm_t")
    return torch.ops.sparsecore.spmm_t(*a.op_args(), dy, backend)


def gated_ffn(x: Tensor, gate: SparseLike, w_up: Tensor, w_down: Tensor, *, backend: str | None = None) -> Tensor:
    """:func:`sparsecore.gated_ffn`; differentiable w.r.t. ``x``, the gate's values, ``w_up``, ``w_down``."""
    g = as_torch_sparse(gate, "gated_ffn", "gate")
    return torch.ops.sparsecore.gated_ffn(x, *g.op_args(), w_up, w_down, backend)


def _kv_args(kv: Any, where: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    if isinstance(kv, DenseKV):
        return kv.k, kv.v, kv.lengths, None
    if isinstance(kv, PagedKV):
        return kv.k_pages, kv.v_pages, kv.lengths, kv.page_table
    raise TypeError(f"{where}: kv must be a DenseKV or a PagedKV, got {type(kv).__name__}")


def _as_torch_bounds(b: Any, where: str, name: str) -> TorchPageBounds:
    if isinstance(b, TorchPageBounds):
        return b
    if isinstance(b, PageBounds):
        return TorchPageBounds.from_format(b)
    raise TypeError(f"{where}: {name} must be a TorchPageBounds or a sparsecore.PageBounds, got {type(b).__name__}")


def page_bounds(kv: DenseKV | PagedKV, page_size: int | None = None, *, out: TorchPageBounds | PageBounds | None = None,
                start: Tensor | None = None, backend: str | None = None) -> TorchPageBounds:
    """:func:`sparsecore.page_bounds` as custom ops: new bounds (``sparsecore::page_bounds``) or, with
    ``out``, ``out``'s tensors updated in place (``sparsecore::page_bounds_update``) and ``out`` returned."""
    kc, vc, ln, pt = _kv_args(kv, "page_bounds")
    if out is None:
        if start is not None:
            raise ValueError("page_bounds: start is given without out; start says which pages of out to recompute")
        ps = page_size if page_size is not None else (int(kc.shape[1]) if pt is not None else 16)
        kmin, kmax = torch.ops.sparsecore.page_bounds(kc, vc, ln, pt, ps, backend)
        return TorchPageBounds(kmin, kmax, ps)
    ob = _as_torch_bounds(out, "page_bounds", "out")
    if page_size is not None and page_size != ob.page_size:
        raise ValueError(f"page_bounds: page_size = {page_size} but out.page_size = {ob.page_size}; give one or "
                         "make them equal")
    torch.ops.sparsecore.page_bounds_update(kc, vc, ln, pt, ob.kmin, ob.kmax, ob.page_size, start, backend)
    return ob


def select_topk(q: Tensor, kv: DenseKV | PagedKV, k: int, *, method: str = "exact", sink: int = 0, window: int = 0,
                shared: bool = True, page_size: int | None = None, bounds: TorchPageBounds | PageBounds | None = None,
                top_p: float | None = None, k_min: int = 0, scale: float | None = None, candidates: int = 0,
                tail_sample: int | None = None, backend: str | None = None) -> TorchTopKIndex:
    """:func:`sparsecore.select_topk` as a custom op (``kv`` a DenseKV / PagedKV holding tensors;
    ``bounds`` from :func:`page_bounds`)."""
    kc, vc, ln, pt = _kv_args(kv, "select_topk")
    bmin = bmax = None
    if bounds is not None:
        tb = _as_torch_bounds(bounds, "select_topk", "bounds")
        if page_size is not None and page_size != tb.page_size:
            raise ValueError(f"select_topk: page_size = {page_size} but bounds.page_size = {tb.page_size}; they "
                             "must be equal (or leave page_size out)")
        bmin, bmax, page_size = tb.kmin, tb.kmax, tb.page_size
    indices, counts = torch.ops.sparsecore.select_topk(q, kc, vc, ln, pt, k, method, sink, window, shared,
                                                       page_size, bmin, bmax, backend, top_p, k_min, scale,
                                                       candidates, tail_sample)
    if method != "quest":
        return TorchTopKIndex(indices, counts)
    ps = page_size if page_size is not None else (int(kc.shape[1]) if pt is not None else 16)
    return TorchTopKIndex(indices, counts, "page", ps)


def sparse_decode(q: Tensor, kv: DenseKV | PagedKV, index: TorchTopKIndex | TopKIndex, *, scale: float | None = None,
                  backend: str | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sparsecore.sparse_decode` as a custom op: ``(out[B, Hq, D], lse[B, Hq] float32)``."""
    kc, vc, ln, pt = _kv_args(kv, "sparse_decode")
    ix = as_torch_index(index)
    ps = ix.page_size if ix.granularity == "page" else None
    return torch.ops.sparsecore.sparse_decode(q, kc, vc, ln, pt, ix.indices, ix.counts, ps, scale, backend)


def dense_decode(q: Tensor, kv: DenseKV | PagedKV, *, scale: float | None = None,
                 backend: str | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sparsecore.dense_decode` as a custom op."""
    kc, vc, ln, pt = _kv_args(kv, "dense_decode")
    return torch.ops.sparsecore.dense_decode(q, kc, vc, ln, pt, scale, backend)


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor, *,
                    backend: str | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sparsecore.merge_attention` as a custom op."""
    return torch.ops.sparsecore.merge_attention(o1, lse1, o2, lse2, backend)


# --------------------------------------------------------------------------------------------------
# the ops of the table without a custom op written above: made from their @op row
# --------------------------------------------------------------------------------------------------

#: a field's annotation (as written in sparsecore.ops.inputs) -> its type in a torch.library schema
_SCHEMA_TYPES = {"Any": "Tensor", "float": "float", "int": "int", "bool": "bool", "str": "str",
                 "float | None": "float?", "int | None": "int?", "str | None": "str?",
                 "Out | None": None}  # an optional buffer the op writes (threshold_mlp's kept): not in the
#                                         custom op, which stays functional (so it can have an autograd rule)
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}
_LIB = torch.library.Library(NS, "FRAGMENT")


def _table_op(row: Any) -> Any:
    """``torch.ops.sparsecore.<op>`` and its Python face for a row of the op table that declares
    ``out_shape`` (arrays and plain scalars in, one array of the op's value dtype out): the real
    implementation dispatches the op (CPU tensors as NumPy views), the fake one validates the
    arguments as the real one does and builds the output from ``out_shape``; there is no gradient
    (backward raises). None for a row whose fields have another type."""
    import dataclasses

    every = [f for f in dataclasses.fields(row.inputs) if f.name != "OP"]
    kinds_all = [f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "?") for f in every]
    if row.out_shape is None or any(k not in _SCHEMA_TYPES for k in kinds_all):
        return None
    outs = tuple(f.name for f, k in zip(every, kinds_all) if _SCHEMA_TYPES[k] is None)
    fields = [f for f in every if f.name not in outs]
    kinds = [k for k in kinds_all if _SCHEMA_TYPES[k] is not None]
    names = tuple(f.name for f in fields)
    arrays = tuple(k == "Any" for k in kinds)
    args = ", ".join(f"{_SCHEMA_TYPES[k]} {n}" for n, k in zip(names, kinds))
    _LIB.define(f"{row.name}({args}, str? backend) -> Tensor")

    def impl(*vals: Any) -> Tensor:
        *vals, backend = vals
        tensors = [v for v, a in zip(vals, arrays) if a]
        host = _on_host(*tensors)
        inp = row.inputs(**{n: _view(v, host) if a else v for n, v, a in zip(names, vals, arrays)})
        return _fresh(_as_tensor(_ops.dispatch(inp, backend)), *tensors)

    def fake(*vals: Any) -> Tensor:
        *vals, backend = vals
        inp = row.inputs(**dict(zip(names, vals)))
        if _concrete(*vals):
            inp.validate()
        first = next(v for v, a in zip(vals, arrays) if a and v is not None)
        return first.new_empty(row.out_shape(inp), dtype=_TORCH_DTYPES[inp.dtype])

    def backward(ctx: Any, grad: Tensor) -> Any:
        raise NotImplementedError(f"sparsecore.torch.{row.name} has no gradient (its custom op is made from "
                                  "the op table, forward only); detach its inputs or call it under torch.no_grad()")

    _LIB.impl(row.name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NS}::{row.name}", fake, lib=_LIB)
    torch.library.register_autograd(f"{NS}::{row.name}", backward, lib=_LIB)
    op = getattr(torch.ops.sparsecore, row.name)

    def face(*args: Any, backend: str | None = None, **scalars: Any) -> Tensor:
        inp = row.inputs(*args, **scalars)
        for n in outs:
            if getattr(inp, n) is not None:
                raise ValueError(f"sparsecore.torch.{row.name}: {n} is not taken by the custom op (it writes no "
                                 f"buffer); call sparsecore.{row.name} for it")
        return op(*(getattr(inp, n) for n in names), backend)

    face.__name__ = face.__qualname__ = row.name
    face.__doc__ = (f":func:`sparsecore.{row.name}` as the custom op ``torch.ops.sparsecore.{row.name}`` (made from "
                    f"its row of the op table: arguments {', '.join(names)}, no gradient).")
    return face


def _table_ops() -> dict[str, Any]:
    from ..ops.table import TABLE

    made = {}
    for row in TABLE:
        if row.name not in OP_NAMES:
            face = _table_op(row)
            if face is not None:
                made[row.name] = face
    return made


#: the Python faces of the custom ops made from the op table, by op name
TABLE_OPS: dict[str, Any] = _table_ops()
globals().update(TABLE_OPS)
__all__ += list(TABLE_OPS)
OP_NAMES += tuple(TABLE_OPS)
