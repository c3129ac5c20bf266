"""numba_cpu: ``@njit(parallel=True)`` host kernels, the fast path on a machine without a GPU.

float32, float16 and bfloat16 values (16-bit values are read through a lookup table), float32
accumulation. float64 stays with the reference. Compiled kernels are cached on disk in the user
cache folder (``$XDG_CACHE_HOME/sparsecore/numba``, or ``NUMBA_CACHE_DIR`` when set), never inside
the installed package.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from importlib import metadata
from typing import Any, ClassVar

import numpy as np

from ..._arrays import BFLOAT16
from ...formats.csr import CSR
from ...formats.kv import DenseKV, PageBounds, PagedKV
from ...formats.tiled_ell import TiledELL
from ...formats.topk import TopKIndex
from ...ops import inputs as I
from ...ops.dispatcher import BackendOp, register


@functools.cache
def _numba_version() -> str | None:
    try:
        return metadata.version("numba")
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _k() -> Any:
    """The compiled-kernel module (imports numba; sets its cache folder unless the user did)."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        import numba

        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        numba.config.CACHE_DIR = os.path.join(base, "sparsecore", "numba")
    from ...warmup import install_compile_notice

    install_compile_notice()  # a first use that compiles says so on stderr, once per op and dtype
    from . import kernels as k

    return k


@functools.cache
def _lut(dtype: str) -> np.ndarray:
    bits = np.arange(1 << 16, dtype=np.uint16)
    return bits.view(np.float16 if dtype == "float16" else BFLOAT16).astype(np.float32)


_NO_LUT = np.zeros(1, np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 as is; 16-bit floats as their uint16 bit patterns (zero-copy)."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _lut_for(dtype: str) -> np.ndarray:
    return _lut(dtype) if dtype in ("float16", "bfloat16") else _NO_LUT


def _out_dtype(dtype: str) -> Any:
    return BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)


@functools.lru_cache(maxsize=64)
def _no_overflow(m: int, value_dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empty overflow of an M-row TiledELL (shared: kernels only read it)."""
    return np.zeros(m + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, value_dtype)


def _overflow(a: TiledELL, value_dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if a.overflow is None:
        return _no_overflow(a.shape[0], np.dtype(value_dtype))
    return a.overflow.indptr, a.overflow.indices, a.overflow.data


def _ell_args(a: TiledELL) -> tuple[Any, ...]:
    o_ptr, o_idx, o_val = _overflow(a, a.values.dtype)
    return _bits(a.values), a.cols, a.counts, a.tile, o_ptr, o_idx, _bits(o_val)


def _as_pages(kv: DenseKV | PagedKV) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense cache seen as B pages of S tokens (zero-copy), so one kernel serves both layouts."""
    if isinstance(kv, PagedKV):
        return kv.k_pages, kv.v_pages, kv.page_table
    return kv.k, kv.v, _dense_table(kv.batch)


def _max_len(kv: Any) -> int:
    """A cache's capacity in tokens (a DenseKV / PagedKV or their NumPy views)."""
    if kv.paged:
        return int(kv.page_table.shape[1]) * int(kv.k_pages.shape[1])
    return int(kv.k.shape[1])


def _every_key(candidates: int, kv: Any) -> bool:
    """Whether ``candidates`` hold every key of every row: at least the cache's capacity, or at least
    each sequence's length (a static cache is longer than the tokens in it)."""
    return candidates >= _max_len(kv) or candidates >= int(np.max(kv.lengths))


def _f32_query(q: np.ndarray) -> np.ndarray:
    """A decode query as float32 (exact for 16-bit floats; float32 as is): the kernels that score int8
    codes then compile one variant for every query dtype."""
    return q if q.dtype == np.float32 else q.astype(np.float32)


#: the key scales of an adaptive selection that scores the keys themselves (none: not int8 codes)
_NO_KSCALES = np.zeros((0, 0, 0), np.float32)


@functools.lru_cache(maxsize=64)
def _dense_table(b: int) -> np.ndarray:
    """The page table of a dense cache seen as B pages, ``[[0], [1], ...]``: shared, only read by the
    kernels (left writeable: a read-only array is another argument type, another compile)."""
    return np.arange(b, dtype=np.int32)[:, None]


#: below this many multiply-adds a call runs on one thread: waking the pool costs more than it saves,
#: and with more runnable threads than cores (torch's pool, other processes) a parallel region
#: waits milliseconds for a descheduled thread
PARALLEL_MIN_WORK = int(os.environ.get("SPARSECORE_CPU_PARALLEL_MIN_WORK", 1 << 20))


def _elements(*arrays: Any) -> int:
    return sum(math.prod(a.shape) for a in arrays)


class _NumbaCpu(BackendOp):
    NAME: ClassVar[str] = "numba_cpu"
    BACKEND: ClassVar[str] = "numba_cpu"
    DEVICE: ClassVar[str] = "host"
    DTYPES: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")

    @classmethod
    def availability_reasons(cls) -> list[str]:
        return [] if _numba_version() else ["numba is not installed (pip install 'sparsecore[numba]')"]

    @classmethod
    def work(cls, inp: Any) -> int:
        """A rough count of the call's multiply-adds (default: the elements it reads)."""
        return _elements(*inp.named_arrays().values())

    @classmethod
    def serial(cls, inp: Any) -> bool:
        """True when the call runs a serial kernel (no thread pool to size)."""
        return False

    @classmethod
    def _serial(cls, inp: Any) -> bool:
        """:meth:`serial`, computed once per call (apply and run both ask)."""
        key = "_sc_serial_" + cls.NAME
        s = inp.__dict__.get(key)
        if s is None:
            s = inp.__dict__[key] = bool(cls.serial(inp))
        return s

    @classmethod
    def apply(cls, inp: Any) -> Any:
        if cls._serial(inp):  # a serial kernel opens no parallel region: no lock, no pool to size
            return super().apply(inp)
        lock = _serialise()
        if lock is None:
            return cls._apply(inp)
        with lock:
            return cls._apply(inp)

    @classmethod
    def _apply(cls, inp: Any) -> Any:
        if cls.work(inp) >= PARALLEL_MIN_WORK:
            return super().apply(inp)
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return super().apply(inp)
        finally:
            numba.set_num_threads(threads)


#: numba's ``workqueue`` threading layer (its fallback without OpenMP or TBB) aborts the process when
#: two threads enter parallel regions at once; calls are serialised by this lock while the layer is
#: workqueue, or not yet known (it is picked by the first parallel region, which may be concurrent).
_PARALLEL_LOCK = threading.RLock()
_layer: str | None = None


def _serialise() -> threading.RLock | None:
    """The lock to hold around a kernel call, or None when the threading layer is thread safe."""
    global _layer
    if _layer is None:
        import numba

        try:
            _layer = str(numba.threading_layer())
        except ValueError:  # no parallel region has run yet: the layer is not chosen
            return _PARALLEL_LOCK
    return _PARALLEL_LOCK if _layer == "workqueue" else None


def _stored(a: TiledELL | CSR) -> int:
    """Stored entries of a sparse operand, counted from shapes (slots, padding included)."""
    if isinstance(a, CSR):
        return a.nnz
    return math.prod(a.values.shape) + (a.overflow.nnz if a.overflow is not None else 0)


#: decode-size FFN calls: up to this many rows of A, with (stored slots x output width) under
#: ROW_KERNEL_MAX_WORK, run the serial row kernels (no grouping, no thread pool); larger calls run
#: the grouped parallel kernels, except spmm, whose calls of up to ROW_KERNEL_MAX_ROWS rows always
#: run its row kernel (rows in parallel past ROW_KERNEL_MAX_WORK: each row the same sums, the same
#: bits). Chosen from shapes only, so a shape always runs the same kernel.
ROW_KERNEL_MAX_ROWS = 16
ROW_KERNEL_MAX_WORK = 8 * PARALLEL_MIN_WORK


def _row_kernels(a: TiledELL | CSR, width: int) -> bool:
    return a.shape[0] <= ROW_KERNEL_MAX_ROWS and _stored(a) * width < ROW_KERNEL_MAX_WORK


def _sparse_args(a: TiledELL | CSR) -> tuple[Any, ...]:
    """The kernels' arguments for a sparse operand, kept on the (frozen) format: its buffers never
    change after construction, so a decode loop that passes one packed matrix builds them once."""
    d = a.__dict__
    args = d.get("_sc_kernel_args")
    if args is None:
        args = _ell_args(a) if isinstance(a, TiledELL) else _csr_as_ell_args(a)
        object.__setattr__(a, "_sc_kernel_args", args)
    return args


@register
class Pack(_NumbaCpu):
    OP = "pack"

    @classmethod
    def serial(cls, inp: I.PackInputs) -> bool:
        """Decode-size packs (up to ROW_KERNEL_MAX_ROWS rows, small) run the serial launchers."""
        return inp.x.shape[0] <= ROW_KERNEL_MAX_ROWS and math.prod(inp.x.shape) < PARALLEL_MIN_WORK

    @classmethod
    def run(cls, inp: I.PackInputs) -> TiledELL:
        k = _k()
        x = inp.x
        m, kk = x.shape
        tile, cap = inp.tile, inp.capacity
        nt = -(-kk // tile)
        lut = _lut_for(inp.dtype)
        relu = inp.activation == "relu"
        thr = np.float32(inp.threshold_f32)
        serial = cls._serial(inp)  # decode size: the same rows on the calling thread
        counts = np.empty((m, nt), np.int32)
        row_over = np.empty(m, np.int64)
        (k.pack_count_serial if serial else k.pack_count)(_bits(x), thr, relu, tile, cap, lut, counts, row_over)
        values = np.zeros((m, nt, cap), x.dtype)
        cols = np.zeros((m, nt, cap), np.int16)
        o_ptr = np.zeros(m + 1, np.int64)
        np.cumsum(row_over, out=o_ptr[1:])
        n_over = int(o_ptr[-1])
        o_idx = np.empty(n_over, np.int64)
        o_val = np.empty(n_over, x.dtype)
        (k.pack_fill_serial if serial else k.pack_fill)(_bits(x), thr, relu, tile, cap, lut, _bits(values), cols,
                                                         o_ptr, o_idx, _bits(o_val))
        overflow = None
        if n_over:
            idx_t = np.int32 if max(kk, n_over) < 2**31 else np.int64
            overflow = CSR(o_ptr.astype(idx_t), o_idx.astype(idx_t), o_val, (m, kk))
        return TiledELL(values, cols, counts, (m, kk), tile, overflow)


@register
class GatedPack(_NumbaCpu):
    OP = "gated_pack"
    DTYPES: ClassVar[tuple[str, ...]] = ("float32",)  # 16-bit products round like the reference: not yet

    @classmethod
    def serial(cls, inp: I.GatedPackInputs) -> bool:
        return inp.gate.shape[0] <= ROW_KERNEL_MAX_ROWS and math.prod(inp.gate.shape) < PARALLEL_MIN_WORK

    @classmethod
    def run(cls, inp: I.GatedPackInputs) -> TiledELL:
        h = np.empty(inp.gate.shape, np.float32)
        _k().gated_product(inp.gate, inp.up, inp.activation == "relu", h)
        return Pack.run(I.PackInputs(h, inp.threshold, None, inp.tile, inp.capacity))


@register
class Unpack(_NumbaCpu):
    OP = "unpack"

    @classmethod
    def run(cls, inp: I.UnpackInputs) -> np.ndarray:
        a = inp.a
        out = np.empty(a.shape, a.values.dtype)
        _k().unpack(*_ell_args(a), _bits(out))
        return out


#: bytes of one (row chunk x column block) output tile of the grouped products; it stays in cache
OUT_TILE_BYTES = int(os.environ.get("SPARSECORE_CPU_TILE_BYTES", 2 << 20))
MAX_CHUNK_ROWS = int(os.environ.get("SPARSECORE_CPU_CHUNK_ROWS", 512))


def _finish(out32: np.ndarray, dtype: str) -> np.ndarray:
    return out32 if dtype == "float32" else out32.astype(_out_dtype(dtype))


def _group(a: TiledELL | CSR, chunk_rows: int, lut: np.ndarray) -> tuple[np.ndarray, ...]:
    """Entries grouped by (row chunk, column): see kernels.group_by_column."""
    return _k().group_by_column(*_sparse_args(a), a.shape[1], chunk_rows, lut)


def _csr_as_ell_args(a: CSR) -> tuple[Any, ...]:
    """A CSR as a TiledELL without slots: every entry is 'overflow'."""
    m = a.shape[0]
    data = _bits(a.data)
    return (np.zeros((m, 0, 1), data.dtype), np.zeros((m, 0, 1), np.int16), np.zeros((m, 0), np.int32), 1,
            a.indptr, a.indices, data)


def _tiles(m: int, n: int) -> tuple[int, int]:
    """(rows per chunk, columns per block) for the grouped products: the output tile of a task
    (rows x columns, float32) fits OUT_TILE_BYTES, a share of a core's L2, so the adds of all its
    entries stay in cache; the weight block it streams is read from memory about once."""
    chunk = max(1, min(m, MAX_CHUNK_ROWS))
    block = OUT_TILE_BYTES // (4 * chunk)
    block = max(64, min(1024, block // 16 * 16))
    return chunk, max(1, min(n, block))


def _threads() -> int:
    import numba

    return int(numba.get_num_threads())


def _spmm_grouped(ptr: np.ndarray, rows: np.ndarray, vals: np.ndarray, w: np.ndarray, lut: np.ndarray,
                  m: int, chunk: int, block: int) -> np.ndarray:
    out = np.empty((m, w.shape[1]), np.float32)
    _k().spmm_grouped(ptr, rows, vals, np.ascontiguousarray(_bits(w)), lut, chunk, block, out)
    return out


@register
class Spmm(_NumbaCpu):
    OP = "spmm"

    @classmethod
    def work(cls, inp: I.SpmmInputs) -> int:
        return _stored(inp.a) * int(inp.w.shape[1])

    @classmethod
    def serial(cls, inp: I.SpmmInputs) -> bool:
        return _row_kernels(inp.a, int(inp.w.shape[1]))

    @classmethod
    def run(cls, inp: I.SpmmInputs) -> np.ndarray:
        a, w = inp.a, inp.w
        lut = _lut_for(inp.dtype)
        if a.shape[0] <= ROW_KERNEL_MAX_ROWS:  # decode sizes: the row kernel, rows in parallel if much work
            out = np.empty((a.shape[0], w.shape[1]), np.float32)
            kernel = _k().spmm_rows if cls._serial(inp) else _k().spmm_rows_par
            if not kernel(*_sparse_args(a), np.ascontiguousarray(_bits(w)), lut, out):
                _out_of_bounds(a, "spmm", "a")
            return _finish(out, inp.dtype)
        chunk, block = _tiles(a.shape[0], w.shape[1])
        ptr, rows, vals, _ = _group(a, chunk, lut)
        return _finish(_spmm_grouped(ptr, rows, vals, w, lut, a.shape[0], chunk, block), inp.dtype)

    @classmethod
    def runner(cls, inp: I.SpmmInputs) -> Any:
        """Decode-size calls: the row-kernel launcher (it allocates each call's output)."""
        if not cls._serial(inp):
            return None
        launch = cls.launcher(inp)
        return lambda i: launch(i.a, i.w)

    @classmethod
    def launcher(cls, inp: I.SpmmInputs) -> Any:
        """``launch(a, w) -> out`` for calls of ``inp``'s plan (sparsecore.OpPlan): the row kernel
        of a decode-size call bound once (rows in parallel when it has much work); other sizes run
        :meth:`apply`."""
        m, n, dtype = inp.a.shape[0], int(inp.w.shape[1]), inp.dtype
        if m > ROW_KERNEL_MAX_ROWS:
            return lambda a, w: cls.apply(type(inp)(a, w))
        lut = _lut_for(dtype)
        kernel = _k().spmm_rows if cls._serial(inp) else _guarded(_k().spmm_rows_par, False)

        def launch(a: Any, w: np.ndarray) -> np.ndarray:
            out = np.empty((m, n), np.float32)
            if not kernel(*_sparse_args(a), np.ascontiguousarray(_bits(w)), lut, out):
                _out_of_bounds(a, "spmm", "a")
            return _finish(out, dtype)

        launch.checks_bounds = True  # type: ignore[attr-defined]  # the row kernel checks its indices
        return launch


@register
class ThresholdSpmm(_NumbaCpu):
    OP = "threshold_spmm"

    @classmethod
    def work(cls, inp: I.ThresholdSpmmInputs) -> int:
        return math.prod(inp.x.shape) + int(inp.x.shape[0]) * math.prod(inp.w.shape) // 100  # ~1 % kept

    @classmethod
    def serial(cls, inp: I.ThresholdSpmmInputs) -> bool:
        return inp.x.shape[0] <= ROW_KERNEL_MAX_ROWS

    @classmethod
    def runner(cls, inp: I.ThresholdSpmmInputs) -> Any:
        """Decode-size calls: the row kernel bound once (each call allocates its output)."""
        if not cls._serial(inp):
            return None
        m, n, dtype, lut = int(inp.x.shape[0]), int(inp.w.shape[1]), inp.dtype, _lut_for(inp.dtype)
        thr, kernel = np.float32(inp.threshold_f32), _k().threshold_spmm_rows
        return lambda i: _finish(_threshold_spmm(kernel, i.x, thr, i.w, lut, m, n), dtype)

    @classmethod
    def run(cls, inp: I.ThresholdSpmmInputs) -> np.ndarray:
        kernel = _k().threshold_spmm_rows if cls._serial(inp) else _k().threshold_spmm
        out = _threshold_spmm(kernel, inp.x, np.float32(inp.threshold_f32), inp.w, _lut_for(inp.dtype),
                              int(inp.x.shape[0]), int(inp.w.shape[1]))
        return _finish(out, inp.dtype)


@register
class ThresholdMlp(_NumbaCpu):
    OP = "threshold_mlp"

    @classmethod
    def work(cls, inp: I.ThresholdMlpInputs) -> int:
        m, d = inp.x.shape
        k, n = inp.w_down.shape
        return int(m) * (int(d) * 2 * int(k) + int(k) * int(n)) // 2  # ~half of the rows kept

    @classmethod
    def serial(cls, inp: I.ThresholdMlpInputs) -> bool:
        return inp.x.shape[0] <= ROW_KERNEL_MAX_ROWS

    @classmethod
    def runner(cls, inp: I.ThresholdMlpInputs) -> Any:
        """Decode-size calls: the row kernel bound once (each call allocates its output)."""
        if not cls._serial(inp):
            return None
        kernel, n, dtype, lut = _k().threshold_mlp_rows, int(inp.w_down.shape[1]), inp.dtype, _lut_for(inp.dtype)
        t_in, t_h, relu = np.float32(inp.input_threshold_f32), np.float32(inp.threshold_f32), inp.activation == "relu"
        return lambda i: _finish(_threshold_mlp(kernel, i.x, t_in, i.w_gate_up, relu, t_h, i.w_down, lut, n, i.kept),
                                 dtype)

    @classmethod
    def run(cls, inp: I.ThresholdMlpInputs) -> np.ndarray:
        kernel = _k().threshold_mlp_rows if cls._serial(inp) else _k().threshold_mlp
        out = _threshold_mlp(kernel, inp.x, np.float32(inp.input_threshold_f32), inp.w_gate_up,
                             inp.activation == "relu", np.float32(inp.threshold_f32), inp.w_down,
                             _lut_for(inp.dtype), int(inp.w_down.shape[1]), inp.kept)
        return _finish(out, inp.dtype)


def _threshold_mlp(kernel: Any, x: np.ndarray, t_in: np.float32, w_gu: np.ndarray, relu: bool, t_h: np.float32,
                   w_down: np.ndarray, lut: np.ndarray, n: int, kept: np.ndarray | None) -> np.ndarray:
    out = np.empty((x.shape[0], n), np.float32)
    counts = np.empty(x.shape[0], np.int64) if kept is None else kept
    kernel(np.ascontiguousarray(_bits(x)), t_in, np.ascontiguousarray(_bits(w_gu)), relu, t_h,
           np.ascontiguousarray(_bits(w_down)), lut, counts, out)
    return out


def _out_of_bounds(a: TiledELL | CSR, op: str, name: str) -> None:
    """A row kernel found an index out of range (and stopped before reading through it): raise the
    format's own message (its check_bounds names the buffer, the element and the range)."""
    a.check_bounds(op, name)
    raise ValueError(f"{op}: {name} holds an index out of range (a count, an offset or an overflow pointer)")


def _threshold_spmm(kernel: Any, x: np.ndarray, thr: np.float32, w: np.ndarray, lut: np.ndarray, m: int,
                    n: int) -> np.ndarray:
    out = np.empty((m, n), np.float32)
    kernel(np.ascontiguousarray(_bits(x)), thr, np.ascontiguousarray(_bits(w)), lut, out)
    return out


@register
class Sddmm(_NumbaCpu):
    OP = "sddmm"

    @classmethod
    def work(cls, inp: I.SddmmInputs) -> int:
        return _stored(inp.pattern) * int(inp.x.shape[1])

    @classmethod
    def serial(cls, inp: I.SddmmInputs) -> bool:
        return _row_kernels(inp.pattern, int(inp.x.shape[1]))

    @classmethod
    def run(cls, inp: I.SddmmInputs) -> TiledELL | CSR:
        p, x, w = inp.pattern, inp.x, inp.w
        lut = _lut_for(inp.dtype)
        if cls._serial(inp):
            return cls._rows(inp, lut)
        chunk, _ = _tiles(p.shape[0], x.shape[1])
        # the pattern's values (unused here) are read with the pattern's own table: a float16
        # pattern of float32 operands has 16-bit values that the float32 table cannot index
        ptr, rows, _, pos = _group(p, chunk, _lut_for(p.dtype))
        dots = np.empty(rows.shape[0], np.float32)
        _k().dots_grouped(ptr, rows, np.ascontiguousarray(_bits(x)), np.ascontiguousarray(_bits(w)), lut, dots)
        if isinstance(p, CSR):
            data = np.empty(p.nnz, np.float32)
            _k().scatter_positions(pos, dots, np.empty(0, np.float32), data)
            return CSR(p.indptr, p.indices, _finish(data, inp.dtype), p.shape, p.sorted)
        slots = np.zeros(p.values.size, np.float32)
        over = np.empty(0 if p.overflow is None else p.overflow.nnz, np.float32)
        _k().scatter_positions(pos, dots, slots, over)
        overflow = None
        if p.overflow is not None:
            o = p.overflow
            overflow = CSR(o.indptr, o.indices, _finish(over, inp.dtype), o.shape, o.sorted)
        values = _finish(slots.reshape(p.values.shape), inp.dtype)
        return TiledELL(values, p.cols, p.counts, p.shape, p.tile, overflow, p.sorted)

    @classmethod
    def _rows(cls, inp: I.SddmmInputs, lut: np.ndarray) -> TiledELL | CSR:
        p = inp.pattern
        _, cols, counts, tile, o_ptr, o_idx, _ = _sparse_args(p)
        x, w = np.ascontiguousarray(_bits(inp.x)), np.ascontiguousarray(_bits(inp.w))
        if isinstance(p, CSR):
            data = np.empty(p.nnz, np.float32)
            _k().sddmm_rows(cols, counts, tile, o_ptr, o_idx, x, w, lut, np.empty(0, np.float32), data)
            return CSR(p.indptr, p.indices, _finish(data, inp.dtype), p.shape, p.sorted)
        slots = np.zeros(p.values.size, np.float32)
        over = np.empty(0 if p.overflow is None else p.overflow.nnz, np.float32)
        _k().sddmm_rows(cols, counts, tile, o_ptr, o_idx, x, w, lut, slots, over)
        overflow = None
        if p.overflow is not None:
            o = p.overflow
            overflow = CSR(o.indptr, o.indices, _finish(over, inp.dtype), o.shape, o.sorted)
        return TiledELL(_finish(slots.reshape(p.values.shape), inp.dtype), p.cols, p.counts, p.shape, p.tile,
                        overflow, p.sorted)


@register
class SpmmT(_NumbaCpu):
    OP = "spmm_t"

    @classmethod
    def work(cls, inp: I.SpmmTInputs) -> int:
        return _stored(inp.a) * int(inp.dy.shape[1])

    @classmethod
    def serial(cls, inp: I.SpmmTInputs) -> bool:
        return _row_kernels(inp.a, int(inp.dy.shape[1]))

    @classmethod
    def run(cls, inp: I.SpmmTInputs) -> np.ndarray:
        a, dy = inp.a, inp.dy
        lut = _lut_for(inp.dtype)
        if cls._serial(inp):
            out = np.empty((a.shape[1], dy.shape[1]), np.float32)
            _k().spmm_t_rows(*_sparse_args(a), np.ascontiguousarray(_bits(dy)), lut, out)
            return _finish(out, inp.dtype)
        ptr, rows, vals, _ = _group(a, max(a.shape[0], 1), lut)
        out = np.empty((a.shape[1], dy.shape[1]), np.float32)
        _k().spmm_t_grouped(ptr, rows, vals, np.ascontiguousarray(_bits(dy)), lut, out)
        return _finish(out, inp.dtype)


@register
class GatedFfn(_NumbaCpu):
    OP = "gated_ffn"

    @classmethod
    def work(cls, inp: I.GatedFfnInputs) -> int:
        return _stored(inp.gate) * int(inp.x.shape[1] + inp.w_down.shape[1])

    @classmethod
    def serial(cls, inp: I.GatedFfnInputs) -> bool:
        return _row_kernels(inp.gate, int(inp.x.shape[1] + inp.w_down.shape[1]))

    @classmethod
    def run(cls, inp: I.GatedFfnInputs) -> np.ndarray:
        g = inp.gate
        m = g.shape[0]
        lut = _lut_for(inp.dtype)
        if cls._serial(inp):
            out = np.empty((m, inp.w_down.shape[1]), np.float32)
            c = np.ascontiguousarray
            _k().gated_rows(*_sparse_args(g), c(_bits(inp.x)), c(_bits(inp.w_up)), c(_bits(inp.w_down)), lut, out)
            return _finish(out, inp.dtype)
        return cls._grouped(inp, lut)

    @classmethod
    def runner(cls, inp: I.GatedFfnInputs) -> Any:
        """Decode-size calls: the row-kernel launcher (it allocates each call's output)."""
        if not cls._serial(inp):
            return None
        launch = cls.launcher(inp)
        return lambda i: launch(i.x, i.gate, i.w_up, i.w_down)

    @classmethod
    def launcher(cls, inp: I.GatedFfnInputs) -> Any:
        """``launch(x, gate, w_up, w_down) -> out`` for calls of ``inp``'s plan (sparsecore.OpPlan)."""
        if not cls._serial(inp):
            return lambda *args: cls.apply(type(inp)(*args))
        m, n, dtype = inp.gate.shape[0], int(inp.w_down.shape[1]), inp.dtype
        lut = _lut_for(dtype)
        kernel = _k().gated_rows

        def launch(x: np.ndarray, gate: Any, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
            out = np.empty((m, n), np.float32)
            c = np.ascontiguousarray
            kernel(*_sparse_args(gate), c(_bits(x)), c(_bits(w_up)), c(_bits(w_down)), lut, out)
            return _finish(out, dtype)

        return launch

    @classmethod
    def _grouped(cls, inp: I.GatedFfnInputs, lut: np.ndarray) -> np.ndarray:
        g = inp.gate
        m = g.shape[0]
        chunk, block = _tiles(m, inp.w_down.shape[1])
        ptr, rows, vals, _ = _group(g, chunk, lut)
        h = np.empty(rows.shape[0], np.float32)
        _k().dots_grouped(ptr, rows, np.ascontiguousarray(_bits(inp.x)), np.ascontiguousarray(_bits(inp.w_up)),
                          lut, h)
        h *= vals  # h = g * (x[m] . w_up[j])
        return _finish(_spmm_grouped(ptr, rows, h, inp.w_down, lut, m, chunk, block), inp.dtype)


@register
class PageBoundsOp(_NumbaCpu):
    OP = "page_bounds"

    @classmethod
    def work(cls, inp: I.PageBoundsInputs) -> int:
        """Keys read: the pages from ``start`` (all without it) to each sequence's length."""
        ps = inp.unit_page_size
        ln = -(-np.asarray(inp.kv.lengths, np.int64) // ps)
        first = 0 if inp.start is None else np.asarray(inp.start, np.int64) // ps
        return int(np.maximum(ln - first, 0).sum()) * ps * inp.kv.num_kv_heads * inp.kv.head_dim

    @classmethod
    def serial(cls, inp: I.PageBoundsInputs) -> bool:
        return cls.work(inp) < PARALLEL_MIN_WORK

    @classmethod
    def run(cls, inp: I.PageBoundsInputs) -> PageBounds:
        kv = inp.kv
        k_pages, _, page_table = _as_pages(kv)
        ps = inp.unit_page_size
        out = inp.out
        if out is None:
            shape = (kv.batch, inp.num_pages, kv.num_kv_heads, kv.head_dim)
            out = PageBounds(np.zeros(shape, k_pages.dtype), np.zeros(shape, k_pages.dtype), ps)
        first = np.zeros(kv.batch, np.int64) if inp.start is None else np.asarray(inp.start, np.int64) // ps
        kernel = _k().page_bounds_serial if cls._serial(inp) else _k().page_bounds
        kernel(_bits(k_pages), page_table, kv.lengths, first, ps, _lut_for(inp.dtype), _bits(out.kmin), _bits(out.kmax))
        return out

    @classmethod
    def launcher(cls, inp: I.PageBoundsInputs) -> Any:
        """``launch(kv, out, start)``: a decode step's update of ``out`` in place from ``start``
        (DecodePlan's ``update_from``), on the calling thread (a step adds a page or two)."""
        ps, lut, kernel = inp.unit_page_size, _lut_for(inp.dtype), _k().page_bounds_serial
        dense_table = _dense_table(inp.kv.batch)

        def launch(kv: Any, out: Any, start: np.ndarray) -> None:
            kp, pt = (kv.k_pages, kv.page_table) if kv.paged else (kv.k, dense_table)
            kernel(_bits(kp), pt, kv.lengths, start.astype(np.int64) // ps, ps, lut, _bits(out.kmin), _bits(out.kmax))

        return launch


def _guarded(fn: Any, serial: bool) -> Any:
    """``fn`` as the backend calls a kernel: a serial kernel as it is; a parallel one under the
    workqueue lock (see :func:`_serialise`)."""
    if serial:
        return fn

    def guarded(*args: Any) -> Any:
        lock = _serialise()
        if lock is None:
            return fn(*args)
        with lock:
            return fn(*args)

    return guarded


@register
class SelectTopk(_NumbaCpu):
    OP = "select_topk"

    @classmethod
    def work(cls, inp: I.SelectTopkInputs) -> int:
        """Key elements scored: every key (exact), every page's bounds (stored Quest bounds) or
        every key again (Quest from the keys)."""
        kv, ps = inp.kv, inp.unit_page_size
        rows = kv.num_kv_heads if inp.shared else int(inp.q.shape[1])
        per_row = kv.max_len if ps is None or inp.bounds is None else 2 * -(-kv.max_len // ps)
        if inp.method == "int8":  # a byte per element instead of 2 or 4
            per_row = -(-kv.max_len // 4) + inp.rescore
        if inp.top_p is not None and inp.shared and not inp.candidates:  # one score per query head of the group
            per_row *= int(inp.q.shape[1]) // kv.num_kv_heads
        return kv.batch * rows * per_row * kv.head_dim

    @classmethod
    def serial(cls, inp: I.SelectTopkInputs) -> bool:
        return cls.work(inp) < PARALLEL_MIN_WORK

    @classmethod
    def run(cls, inp: I.SelectTopkInputs) -> TopKIndex:
        kv = inp.kv
        k_pages, _, page_table = _as_pages(kv)
        ps = inp.unit_page_size
        rows = kv.num_kv_heads if inp.shared else inp.q.shape[1]
        k_max = inp.k_max
        indices = np.empty((kv.batch, rows, k_max), np.int32)
        counts = np.empty((kv.batch, rows), np.int32)
        if inp.bounds is None:
            bmin = bmax = np.zeros((0, 0, 0, 0), k_pages.dtype)
        else:
            bmin, bmax = inp.bounds.kmin, inp.bounds.kmax
        if inp.candidates:  # the launcher's two kernels, with buffers of this call's own
            cls.launcher(inp)(inp.q, kv, inp.codes, indices, counts)
            return TopKIndex._from_kernel(indices, counts)
        if inp.top_p is not None:  # exact scores, or (int8) the codes' as the dense cache they are
            kernel = _k().select_top_p_serial if cls._serial(inp) else _k().select_top_p
            if inp.method == "int8":  # a float32 query (exact): one compiled variant for every dtype
                q, src, table, kscales = _f32_query(inp.q), inp.codes.codes, _dense_table(kv.batch), inp.codes.scales
            else:
                q, src, table, kscales = _bits(inp.q), _bits(k_pages), page_table, _NO_KSCALES
            kernel(q, src, table, kv.lengths, kscales, inp.k, inp.k_min, inp.sink, inp.window, inp.shared,
                   inp.top_p, _scale(inp.scale, kv.head_dim), _lut_for(inp.dtype), indices, counts)
            return TopKIndex._from_kernel(indices, counts)
        if inp.method == "int8":
            kernel = _k().select_int8_serial if cls._serial(inp) else _k().select_int8
            kernel(_bits(inp.q), _bits(k_pages), page_table, kv.lengths, inp.codes.codes,
                   inp.codes.scales, inp.k, inp.rescore, inp.sink, inp.window, inp.shared,
                   _lut_for(inp.dtype), indices, counts)
            return TopKIndex._from_kernel(indices, counts)
        args = (_bits(inp.q), _bits(k_pages), page_table, kv.lengths, inp.k, inp.sink, inp.forced_window, inp.shared)
        if ps is None:
            (_k().select_topk_serial if cls._serial(inp) else _k().select_topk)(*args, _lut_for(inp.dtype), indices,
                                                                             counts)
        else:
            (_k().select_quest_serial if cls._serial(inp) else _k().select_quest)(
                *args, ps, _bits(bmin), _bits(bmax), _lut_for(inp.dtype), indices, counts)
        return TopKIndex._from_kernel(indices, counts, "token" if ps is None else "page", ps)

    @classmethod
    def runner(cls, inp: I.SelectTopkInputs) -> Any:
        """Decode-size calls: the launcher, writing new buffers on each call."""
        if not cls._serial(inp):
            return None
        launch = cls.launcher(inp)
        rows = inp.kv.num_kv_heads if inp.shared else int(inp.q.shape[1])
        ci = (inp.kv.batch, rows)
        ii = ci + (inp.k_max,)
        ps = inp.unit_page_size
        gran = "token" if ps is None else "page"
        int8 = inp.method == "int8"

        def run(i: I.SelectTopkInputs) -> TopKIndex:
            indices, counts = launch(i.q, i.kv, i.codes if int8 else i.bounds, np.empty(ii, np.int32),
                                     np.empty(ci, np.int32))
            return TopKIndex._from_kernel(indices, counts, gran, ps)

        return run

    @classmethod
    def launcher(cls, inp: I.SelectTopkInputs) -> Any:
        """``launch(q, kv, bounds[, indices, counts]) -> (indices, counts)`` for calls of ``inp``'s plan
        (same shapes but for the cache's length, same scalars): every shape decision made here, once
        (DecodePlan). Without ``indices``/``counts`` it writes the launcher's own two buffers,
        overwritten by its next launch. For the int8 method the third argument is the KeyCodes (or
        their NumPy views) instead of bounds."""
        kv, ps, shared = inp.kv, inp.unit_page_size, inp.shared
        b = kv.batch
        rows = kv.num_kv_heads if shared else int(inp.q.shape[1])
        k_max, k, sink, window = inp.k_max, int(inp.k), int(inp.sink), inp.forced_window
        lut = _lut_for(inp.dtype)
        paged = isinstance(kv, PagedKV)
        dense_table = _dense_table(b)
        none = _bits(np.zeros((0, 0, 0, 0), _out_dtype(inp.dtype)))

        indices = np.empty((b, rows, k_max), np.int32)  # the plan's workspace: each launch overwrites it
        counts = np.empty((b, rows), np.int32)

        if inp.method == "int8":
            return _guarded(cls._int8_launcher(inp, indices, counts), cls._serial(inp))
        if inp.top_p is not None and not inp.candidates:
            top_p, k_min, win = inp.top_p, int(inp.k_min), int(inp.window)
            scale = _scale(inp.scale, kv.head_dim)
            adaptive = _k().select_top_p_serial if cls._serial(inp) else _k().select_top_p

            def launch_p(q: np.ndarray, kv: Any, bounds: Any, indices: np.ndarray = indices,
                         counts: np.ndarray = counts) -> tuple[np.ndarray, np.ndarray]:
                adaptive(_bits(q), _bits(kv.k_pages if paged else kv.k), kv.page_table if paged else dense_table,
                         kv.lengths, _NO_KSCALES, k, k_min, sink, win, shared, top_p, scale, lut, indices, counts)
                return indices, counts

            return _guarded(launch_p, cls._serial(inp))
        if ps is None:
            exact = _k().select_topk_serial if cls._serial(inp) else _k().select_topk
            c = int(inp.candidates)
            rank, space = cls._mass_ranker(inp) if c else (None, None)
            every = cls._mass_of_every_key(inp) if c else None

            def launch_exact(q: np.ndarray, kv: Any, bounds: Any, indices: np.ndarray = indices,
                             counts: np.ndarray = counts) -> tuple[np.ndarray, np.ndarray]:
                k_pages, table = kv.k_pages if paged else kv.k, kv.page_table if paged else dense_table
                if rank is None:
                    exact(_bits(q), _bits(k_pages), table, kv.lengths, k, sink, window, shared, lut, indices, counts)
                elif _every_key(c, kv):  # every key a candidate: one pass, each key's mass
                    every(_bits(q), _bits(k_pages), table, kv.lengths, _NO_KSCALES, indices, counts)
                else:  # the c best by the summed score, then the k of highest mass among them
                    cind, ccnt = space(kv)
                    exact(_bits(q), _bits(k_pages), table, kv.lengths, c, sink, window, shared, lut, cind, ccnt)
                    rank(q, k_pages, table, kv.lengths, None, indices, counts)
                return indices, counts

            return _guarded(launch_exact, cls._serial(inp))
        quest = _k().select_quest_serial if cls._serial(inp) else _k().select_quest

        def launch(q: np.ndarray, kv: Any, bounds: Any, indices: np.ndarray = indices,
                   counts: np.ndarray = counts) -> tuple[np.ndarray, np.ndarray]:
            if bounds is None:
                bmin = bmax = none
            else:
                bmin, bmax = _bits(bounds.kmin), _bits(bounds.kmax)
            quest(_bits(q), _bits(kv.k_pages if paged else kv.k), kv.page_table if paged else dense_table,
                  kv.lengths, k, sink, window, shared, ps, bmin, bmax, lut, indices, counts)
            return indices, counts

        return _guarded(launch, cls._serial(inp))

    @classmethod
    def _int8_launcher(cls, inp: I.SelectTopkInputs, indices: np.ndarray, counts: np.ndarray) -> Any:
        """:meth:`launcher` of method="int8": ``launch(q, kv, codes[, indices, counts])``, ranking (or,
        with ``top_p``, the adaptive budget) over the codes' scores."""
        kv, shared = inp.kv, inp.shared
        paged = isinstance(kv, PagedKV)
        dense_table = _dense_table(kv.batch)
        lut = _lut_for(inp.dtype)
        k, sink, window = int(inp.k), int(inp.sink), int(inp.window)
        if inp.top_p is not None and not inp.candidates:
            top_p, k_min, scale = inp.top_p, int(inp.k_min), _scale(inp.scale, kv.head_dim)
            adaptive = _k().select_top_p_serial if cls._serial(inp) else _k().select_top_p

            def launch_p(q: np.ndarray, kv: Any, codes: Any, indices: np.ndarray = indices,
                         counts: np.ndarray = counts) -> tuple[np.ndarray, np.ndarray]:
                adaptive(_f32_query(q), codes.codes, dense_table, kv.lengths, codes.scales, k, k_min, sink, window,
                         shared, top_p, scale, lut, indices, counts)
                return indices, counts

            return launch_p
        rescore = int(inp.rescore)
        select = _k().select_int8_serial if cls._serial(inp) else _k().select_int8
        c = int(inp.candidates)
        rank, space = cls._mass_ranker(inp) if c else (None, None)
        every = cls._mass_of_every_key(inp) if c else None

        def launch(q: np.ndarray, kv: Any, codes: Any, indices: np.ndarray = indices,
                   counts: np.ndarray = counts) -> tuple[np.ndarray, np.ndarray]:
            k_pages, table = kv.k_pages if paged else kv.k, kv.page_table if paged else dense_table
            if rank is None:
                select(_bits(q), _bits(k_pages), table, kv.lengths, codes.codes, codes.scales, k, rescore, sink,
                       window, shared, lut, indices, counts)
            elif _every_key(c, kv):  # every key a candidate: one pass, each key's mass
                every(_f32_query(q), codes.codes, dense_table, kv.lengths, codes.scales, indices, counts)
            else:  # the c best by the summed int8 score, then the k of highest mass among them
                cind, ccnt = space(kv)
                select(_bits(q), _bits(k_pages), table, kv.lengths, codes.codes, codes.scales, c, 0, sink, window,
                       shared, lut, cind, ccnt)
                rank(q, k_pages, table, kv.lengths, codes, indices, counts)
            return indices, counts

        return launch

    @classmethod
    def _mass_of_every_key(cls, inp: I.SelectTopkInputs) -> Any:
        """``every(q, k_pages, page_table, lengths, kscales, indices, counts)``: ``candidates`` that hold
        every key of the cache, as one pass of the adaptive budget's kernel (each key's mass from
        each head's own score; ``top_p`` or, for a fixed k, never reached): the same selection as
        ranking them all by mass, without the summed-score ranking first."""
        kernel = _k().select_top_p_serial if cls._serial(inp) else _k().select_top_p
        k, k_min, sink, window, shared = int(inp.k), int(inp.k_min), int(inp.sink), int(inp.window), inp.shared
        top_p = np.inf if inp.top_p is None else inp.top_p
        scale, lut = _scale(inp.scale, inp.kv.head_dim), _lut_for(inp.dtype)

        def every(q: np.ndarray, k_pages: np.ndarray, page_table: np.ndarray, lengths: np.ndarray,
                  kscales: np.ndarray, indices: np.ndarray, counts: np.ndarray) -> None:
            kernel(q, k_pages, page_table, lengths, kscales, k, k_min, sink, window, shared, top_p, scale, lut,
                   indices, counts)

        return every

    @classmethod
    def _mass_ranker(cls, inp: I.SelectTopkInputs) -> tuple[Any, Any]:
        """``(rank, space)`` of ``candidates``: ``space(kv)`` is the workspace ``(cind, ccnt)`` a ranking
        kernel writes the candidate rows of a call on ``kv`` into (``min(candidates + sink + window,
        capacity)`` wide, grown with the cache); ``rank(q, k_pages, page_table, lengths, codes,
        indices, counts)`` ranks those rows by their estimated attention mass and writes the kept ones
        into ``indices``/``counts``; each unit scored per query head from the keys (``codes`` None) or
        from the int8 codes (a float32 query, the codes as the dense cache they are: one compiled
        variant for every query dtype)."""
        kernel = _k().rank_by_mass_serial if cls._serial(inp) else _k().rank_by_mass
        kv = inp.kv
        rows = kv.num_kv_heads if inp.shared else int(inp.q.shape[1])
        wide = int(inp.candidates) + int(inp.sink) + int(inp.window)
        work = [np.empty((kv.batch, rows, min(wide, _max_len(kv))), np.int32), np.empty((kv.batch, rows), np.int32)]

        def space(kv: Any) -> tuple[np.ndarray, np.ndarray]:
            need = min(wide, _max_len(kv))
            if work[0].shape[2] < need:  # a cache grown past the candidates the workspace holds
                work[0] = np.empty(work[0].shape[:2] + (need,), np.int32)
            return work[0], work[1]

        k, k_min, sink, window, shared = int(inp.k), int(inp.k_min), int(inp.sink), int(inp.window), inp.shared
        top_p = np.inf if inp.top_p is None else inp.top_p  # fixed k: the mass never reaches inf
        scale, lut = _scale(inp.scale, kv.head_dim), _lut_for(inp.dtype)
        dense_table = _dense_table(kv.batch)
        tail = inp.tail_stride

        def rank(q: np.ndarray, k_pages: np.ndarray, page_table: np.ndarray, lengths: np.ndarray, codes: Any,
                 indices: np.ndarray, counts: np.ndarray) -> None:
            cind, ccnt = work
            if codes is None:
                kernel(_bits(q), _bits(k_pages), page_table, lengths, _NO_KSCALES, k, k_min, sink, window, shared,
                       top_p, scale, tail, lut, cind, ccnt, indices, counts)
            else:
                kernel(_f32_query(q), codes.codes, dense_table, lengths, codes.scales, k, k_min, sink, window,
                       shared, top_p, scale, tail, lut, cind, ccnt, indices, counts)

        return rank, space


#: decode splits each row so that a call has about this many tasks (a few per core on a 16-core host).
#: A constant, not ``os.cpu_count()``: the split count decides the order of the float32 additions,
#: so it depends on the shapes only and a result has the same bits on every machine.
DECODE_TASKS = 64
#: a decode call with less work than this (``B * Hq * D * keys per row * 2``, as ``work`` counts it) is
#: not split: it runs on the calling thread (the default PARALLEL_MIN_WORK is the same number), where
#: splits would only add a merge (and its compile on a first call). A constant, not PARALLEL_MIN_WORK
#: (the environment may change that one): the split count, and so the bits, depend on the shapes only.
SPLIT_MIN_WORK = 1 << 20


def _n_split(tasks: int, work: int, total: int) -> int:
    """Splits per row: about DECODE_TASKS tasks in all, each split with at least 256 keys of work
    (``work``: keys per row), none when the call's ``total`` work is under SPLIT_MIN_WORK (a function
    of the shapes only)."""
    if total < SPLIT_MIN_WORK:
        return 1
    want = -(-DECODE_TASKS // max(tasks, 1))
    return max(1, min(want, work // 256 if work >= 256 else 1))


def _scale(scale: float | None, d: int) -> np.float32:
    """The attention's scale as the kernels take it: ``1 / sqrt(D)`` by default."""
    return np.float32(1.0 / math.sqrt(d) if scale is None else scale)


def _decode(q: np.ndarray, kv: DenseKV | PagedKV, index: TopKIndex | None, scale: float | None, dtype: str,
            serial: bool) -> tuple[np.ndarray, np.ndarray]:
    k = _k()
    bsz, hq, d = q.shape
    k_pages, v_pages, page_table = _as_pages(kv)
    if index is None:
        dense, shared, unit = True, True, 1
        indices = np.zeros((bsz, kv.num_kv_heads, 0), np.int32)
        counts = np.zeros((bsz, kv.num_kv_heads), np.int32)
        rows, work = kv.num_kv_heads, kv.max_len
    else:
        dense = False
        shared = index.groups == kv.num_kv_heads
        unit = index.page_size if index.granularity == "page" else 1
        indices, counts = index.indices, index.counts
        rows, work = index.groups, index.k_max * unit
    n_split = _n_split(bsz * rows, work, bsz * hq * d * work * 2)
    o_part = np.empty((bsz, hq, n_split, d), np.float32)
    lse_part = np.empty((bsz, hq, n_split), np.float32)
    # the tasks (and so the bits) are the same either way; serial runs them on the calling thread
    partial = k.decode_partial_serial if serial else k.decode_partial
    partial(_bits(q), _bits(k_pages), _bits(v_pages), page_table, kv.lengths, indices, counts, unit, dense, shared,
            _scale(scale, d), n_split, _lut_for(dtype), o_part, lse_part)
    if n_split == 1:  # the split axis has length 1: dropping it is a view
        return _finish(o_part.reshape(bsz, hq, d), dtype), lse_part.reshape(bsz, hq)
    out = np.empty((bsz, hq, d), np.float32)
    lse = np.empty((bsz, hq), np.float32)
    (k.merge_splits_serial if serial else k.merge_splits)(o_part, lse_part, out, lse)
    return _finish(out, dtype), lse


@register
class SparseDecode(_NumbaCpu):
    OP = "sparse_decode"

    @classmethod
    def work(cls, inp: I.SparseDecodeInputs) -> int:
        unit = inp.index.page_size if inp.index.granularity == "page" else 1
        return math.prod(inp.q.shape) * inp.index.k_max * unit * 2

    @classmethod
    def serial(cls, inp: I.SparseDecodeInputs) -> bool:
        return cls.work(inp) < PARALLEL_MIN_WORK

    @classmethod
    def run(cls, inp: I.SparseDecodeInputs) -> tuple[np.ndarray, np.ndarray]:
        return _decode(inp.q, inp.kv, inp.index, inp.scale, inp.dtype, cls._serial(inp))

    @classmethod
    def runner(cls, inp: I.SparseDecodeInputs) -> Any:
        """Decode-size float32 calls that are not split: the launcher writing new outputs directly."""
        q = inp.q
        unit = inp.index.page_size if inp.index.granularity == "page" else 1
        if (not cls._serial(inp) or inp.dtype != "float32"
                or _n_split(q.shape[0] * inp.index.groups, inp.index.k_max * unit, cls.work(inp)) != 1):
            return None
        launch = cls.launcher(inp)
        o_shape, l_shape = tuple(q.shape), tuple(q.shape[:2])

        def run(i: I.SparseDecodeInputs) -> tuple[np.ndarray, np.ndarray]:
            out, lse = np.empty(o_shape, np.float32), np.empty(l_shape, np.float32)
            launch(i.q, i.kv, i.index.indices, i.index.counts, out, lse)  # the direct path: no workspace
            return out, lse

        return run

    @classmethod
    def launcher(cls, inp: I.SparseDecodeInputs) -> Any:
        """``launch(q, kv, indices, counts, out, lse)`` for calls of ``inp``'s plan: writes the step's
        output into ``out`` (q's dtype) and ``lse`` (float32, C-contiguous), both NumPy ``[B, Hq, D]`` /
        ``[B, Hq]``. A float32 call that is not split writes them directly (no workspace, no copy)."""
        kern = _k()
        q, kv, index = inp.q, inp.kv, inp.index
        bsz, hq, d = q.shape
        unit = index.page_size if index.granularity == "page" else 1
        shared = index.groups == kv.num_kv_heads
        n_split = _n_split(bsz * index.groups, index.k_max * unit, cls.work(inp))
        scale = _scale(inp.scale, d)
        serial = cls._serial(inp)
        partial = kern.decode_partial_serial if serial else kern.decode_partial
        merge = kern.merge_splits_serial if serial else kern.merge_splits
        lut = _lut_for(inp.dtype)
        paged = isinstance(kv, PagedKV)
        dense_table = _dense_table(bsz)
        f32 = inp.dtype == "float32"

        o_part = np.empty((bsz, hq, n_split, d), np.float32)  # workspace, overwritten by each launch
        lse_part = np.empty((bsz, hq, n_split), np.float32)
        o32 = np.empty((bsz, hq, d), np.float32)  # the float32 result when out is another dtype or layout
        direct = f32 and n_split == 1
        o_shape, l_shape = (bsz, hq, 1, d), (bsz, hq, 1)

        def launch(q: np.ndarray, kv: Any, indices: np.ndarray, counts: np.ndarray, out: np.ndarray,
                   lse: np.ndarray) -> None:
            if paged:
                kp, vp, pt = kv.k_pages, kv.v_pages, kv.page_table
            else:
                kp, vp, pt = kv.k, kv.v, dense_table
            if direct and out.flags.c_contiguous and lse.flags.c_contiguous:  # views [B, Hq, 1, D] / [B, Hq, 1]
                partial(q, kp, vp, pt, kv.lengths, indices, counts, unit, False, shared, scale, 1, lut,
                        out.reshape(o_shape), lse.reshape(l_shape))
                return
            partial(_bits(q), _bits(kp), _bits(vp), pt, kv.lengths, indices, counts, unit, False, shared, scale,
                    n_split, lut, o_part, lse_part)
            if n_split == 1:
                out[...] = o_part[:, :, 0]
                lse[...] = lse_part[:, :, 0]
            elif f32 and out.flags.c_contiguous:
                merge(o_part, lse_part, out, lse)
            else:
                merge(o_part, lse_part, o32, lse)
                out[...] = o32

        return _guarded(launch, serial)


@register
class DenseDecode(_NumbaCpu):
    OP = "dense_decode"

    @classmethod
    def work(cls, inp: I.DenseDecodeInputs) -> int:
        return math.prod(inp.q.shape) * inp.kv.max_len * 2

    @classmethod
    def serial(cls, inp: I.DenseDecodeInputs) -> bool:
        return cls.work(inp) < PARALLEL_MIN_WORK

    @classmethod
    def run(cls, inp: I.DenseDecodeInputs) -> tuple[np.ndarray, np.ndarray]:
        return _decode(inp.q, inp.kv, None, inp.scale, inp.dtype, cls._serial(inp))


@register
class MergeAttention(_NumbaCpu):
    OP = "merge_attention"

    @classmethod
    def run(cls, inp: I.MergeAttentionInputs) -> tuple[np.ndarray, np.ndarray]:
        shape = inp.o1.shape
        d = shape[-1]
        rows = math.prod(shape[:-1])  # not reshape(-1, d): D may be 0
        o1 = np.ascontiguousarray(inp.o1).reshape(rows, d)
        o2 = np.ascontiguousarray(inp.o2).reshape(rows, d)
        out = np.empty(o1.shape, np.float32)
        lse = np.empty(o1.shape[0], np.float32)
        _k().merge_pair(_bits(o1), np.ascontiguousarray(inp.lse1).reshape(-1),
                             _bits(o2), np.ascontiguousarray(inp.lse2).reshape(-1), _lut_for(inp.dtype), out, lse)
        return _finish(out, inp.dtype).reshape(shape), lse.reshape(shape[:-1])
