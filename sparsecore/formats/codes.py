"""KeyCodes: a reduced-precision copy of a KV cache's keys, kept beside the cache for cheap scoring
(``select_topk(method="int8", codes=...)``).

Buffers:

- ``codes[B, S, Hkv, D]`` int8: ``K[b, t, h] ~ codes[b, t, h] * scales[b, t, h]`` for logical token
  ``t < lengths[b]`` of sequence ``b`` (token order, also for a paged cache); positions past a
  length are never read.
- ``scales[B, S, Hkv]`` float32: one symmetric scale per (token, KV head), ``max |K[b, t, h]| / 127``.
  A key with a NaN or infinite component gets scale NaN: it ranks last, as a NaN score does.

At 64-dim float32 keys a code row is 68 bytes against 256 (3.8x fewer bytes to score).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._arrays import dtype_name, from_numpy, kind_of, to_host
from .._checks import check_dtype, check_ndim, fail
from . import _fastcheck, _summary
from .kv import DenseKV, PagedKV


@dataclass(frozen=True, eq=False)
class KeyCodes:
    codes: Any
    scales: Any

    def __post_init__(self) -> None:
        w = "KeyCodes"
        check_ndim(w, "codes", self.codes, 4, "[B, S, Hkv, D]")
        check_dtype(w, "codes", self.codes, ("int8",))
        check_ndim(w, "scales", self.scales, 3, "[B, S, Hkv]")
        check_dtype(w, "scales", self.scales, ("float32",))
        if tuple(self.scales.shape) != tuple(self.codes.shape[:3]):
            fail(w, f"scales has shape {tuple(self.scales.shape)}; expected {tuple(self.codes.shape[:3])} "
                    "= codes.shape[:3]")

    batch = property(lambda self: int(self.codes.shape[0]))
    max_len = property(lambda self: int(self.codes.shape[1]))
    num_kv_heads = property(lambda self: int(self.codes.shape[2]))
    head_dim = property(lambda self: int(self.codes.shape[3]))

    def __repr__(self) -> str:
        return (f"KeyCodes(B {self.batch}, S {self.max_len}, Hkv {self.num_kv_heads}, D {self.head_dim} int8, "
                f"{_summary.place(self.codes)})")

    def map_arrays(self, fn: Callable[[Any], Any]) -> KeyCodes:
        return KeyCodes(fn(self.codes), fn(self.scales))

    def arrays(self) -> dict[str, Any]:
        return {"codes": self.codes, "scales": self.scales}

    def check_matches(self, w: str, name: str, kv: DenseKV | PagedKV) -> None:
        """Raise unless these codes can describe ``kv``: batch, heads, head_dim, enough positions."""
        got = tuple(int(s) for s in self.codes.shape)
        need = (kv.batch, kv.max_len, kv.num_kv_heads, kv.head_dim)
        if got[0] != need[0] or got[1] < need[1] or got[2:] != need[2:]:
            fail(w, f"{name} has codes of shape {got}; for this kv expected (B, S, Hkv, D) = ({need[0]}, >= "
                    f"{need[1]}, {need[2]}, {need[3]})")


def _tokens(kv: DenseKV | PagedKV, b: int, lo: int, hi: int) -> np.ndarray:
    """Keys ``lo <= t < hi`` of sequence ``b``, ``[hi - lo, Hkv, D]`` float64, on the host."""
    if isinstance(kv, DenseKV):
        return to_host(kv.k[b, lo:hi]).astype(np.float64)
    ps = kv.page_size
    t = np.arange(lo, hi)
    pages = to_host(kv.page_table)[b, t // ps]
    return to_host(kv.k_pages)[pages, t % ps].astype(np.float64)


def quantize_keys(kv: DenseKV | PagedKV, *, out: KeyCodes | None = None, start: Any = None) -> KeyCodes:
    """The int8 copy of ``kv``'s keys, as arrays of ``kv``'s kind and place::

        amax = max over D of |K[b, t, h]|;  scale = float32(amax / 127)  (1 where amax == 0)
        codes[b, t, h] = clip(rint(K[b, t, h] / scale), -127, 127)   (in float64)
        a key with a NaN or infinite component: codes 0, scale NaN

    Without ``out``: new arrays of ``S = max_len`` positions (zeros past each length), of ``kv``'s
    array kind. With ``out`` (codes of this cache from an earlier call): positions ``start[b]`` (0
    without ``start``) to ``lengths[b] - 1`` are rewritten in place, e.g. only the new token of a
    decode step, and ``out`` is returned.

    Host arrays (NumPy, CPU torch) are converted by one compiled pass (NumPy without numba). A cache
    of torch CUDA tensors or CuPy arrays is converted on its device by the same float64 arithmetic
    in the array library's own operations (:func:`_quantize_on_device`: the same codes and scales,
    bit for bit; it reads ``lengths`` and ``start`` on the host, a synchronisation, and a decode step
    of one new key per sequence is one gather, one conversion and one scatter). numba device arrays
    are refused: pass CuPy or torch arrays.
    """
    w = "quantize_keys"
    if not isinstance(kv, (DenseKV, PagedKV)):
        fail(w, f"kv must be a DenseKV or a PagedKV, got {type(kv).__name__}", TypeError)
    keys_arr = kv.k if isinstance(kv, DenseKV) else kv.k_pages
    kind = kind_of(keys_arr)
    if kind == "cupy" or (kind == "torch" and keys_arr.device.type == "cuda"):
        if out is not None and not isinstance(out, KeyCodes):
            fail(w, f"out must be a KeyCodes, got {type(out).__name__}", TypeError)
        return _quantize_on_device(w, kv, out, start, kind)
    if not (kind == "numpy" or (kind == "torch" and keys_arr.device.type == "cpu")):
        where = f"torch tensors on {keys_arr.device}" if kind == "torch" else f"{kind} arrays"
        fail(w, f"kv holds {where}; quantize_keys converts NumPy arrays, torch tensors on the CPU or a CUDA "
                "device, and CuPy arrays")
    if out is None:
        shape = (kv.batch, kv.max_len, kv.num_kv_heads, kv.head_dim)
        codes, scales = np.zeros(shape, np.int8), np.zeros(shape[:3], np.float32)
        res = KeyCodes(from_numpy(codes, kind), from_numpy(scales, kind))
    else:
        if not isinstance(out, KeyCodes):
            fail(w, f"out must be a KeyCodes, got {type(out).__name__}", TypeError)
        out.check_matches(w, "out", kv)
        codes, scales = to_host(out.codes), to_host(out.scales)  # views of host arrays: written in place
        res = out
    lengths, first = _span(w, kv, start)
    if isinstance(kv, DenseKV) and lengths.max(initial=0) <= kv.max_len:
        keys = to_host(kv.k)
        fast = _compiled() if keys.dtype == np.float32 and codes.flags.writeable and scales.flags.writeable else None
        if fast is not None:  # float32 keys: one compiled pass, the same codes and scales as _quantize
            fast(keys, first, lengths, codes, scales)
            return res
    if isinstance(kv, DenseKV) and (lengths - first <= 1).all():
        # a decode step: one new key per sequence, quantised in one vectorised pass
        bs = np.flatnonzero(lengths - first == 1)
        if bs.size:
            c, sc = _quantize(to_host(kv.k)[bs, first[bs]].astype(np.float64))
            codes[bs, first[bs]] = c
            scales[bs, first[bs]] = sc
        return res
    for b in range(kv.batch):
        lo, hi = int(first[b]), int(lengths[b])
        if hi <= lo:
            continue
        codes[b, lo:hi], scales[b, lo:hi] = _quantize(_tokens(kv, b, lo, hi))
    if dtype_name(res.codes) != "int8":  # unreachable: constructed above
        fail(w, "internal: codes are not int8")
    return res


def _span(w: str, kv: DenseKV | PagedKV, start: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, first)`` on the host, int64: the positions ``first[b] <= t < lengths[b]`` to
    (re)write; ``start`` None is 0 (every token)."""
    lengths = to_host(kv.lengths).astype(np.int64)
    first = np.zeros(kv.batch, np.int64) if start is None else to_host(start).astype(np.int64)
    if first.shape != (kv.batch,) or (first < 0).any() or (first > lengths).any():
        fail(w, f"start = {first.tolist()}; expected {kv.batch} ints with 0 <= start[b] <= lengths[b] = "
                f"{lengths.tolist()}")
    return lengths, first


@functools.cache
def _compiled() -> Any | None:
    """``quantize(k, first, lengths, codes, scales)``: :func:`_quantize` of the float32 keys
    ``k[b, first[b]:lengths[b]]`` written into ``codes``/``scales`` in one compiled pass (a decode
    step's new key: about 2 us against 60-90 us for the NumPy passes, per layer), or None without
    numba. The same arithmetic, in float64: ``amax``, the scale rounded to float32, ``rint`` (ties to
    even, as NumPy's), the clip; a non-finite key gets codes 0 and scale NaN."""
    checks = _fastcheck._kernels()  # None without numba; sets the package's numba cache folder
    if checks is None:
        return None
    import numba

    @numba.njit(cache=True, nogil=True)
    def quantize(k, first, lengths, codes, scales):  # pragma: no cover - compiled
        d = k.shape[3]
        for b in range(k.shape[0]):
            for t in range(first[b], lengths[b]):
                for h in range(k.shape[2]):
                    amax = 0.0
                    finite = True
                    for j in range(d):
                        v = np.float64(k[b, t, h, j])
                        if not np.isfinite(v):
                            finite = False
                        amax = max(amax, abs(v))
                    if not finite:
                        for j in range(d):
                            codes[b, t, h, j] = 0
                        scales[b, t, h] = np.nan
                        continue
                    sc = np.float64(np.float32(amax / 127.0)) if amax > 0 else 1.0
                    for j in range(d):
                        c = np.rint(np.float64(k[b, t, h, j]) / sc)
                        codes[b, t, h, j] = np.int8(min(max(c, -127.0), 127.0))
                    scales[b, t, h] = np.float32(sc)

    return quantize


def _quantize(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8, scales float32)`` of keys ``k[..., D]`` (float64), as :func:`quantize_keys` says."""
    with np.errstate(invalid="ignore", over="ignore"):
        amax = np.abs(k).max(axis=-1)
        finite = np.isfinite(k).all(axis=-1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32).astype(np.float64)  # as stored
        c = np.where(finite[..., None], np.clip(np.rint(k / scale[..., None]), -127, 127), 0.0)
    return c.astype(np.int8), np.where(finite, scale, np.nan).astype(np.float32)


def _quantize_torch(k: Any) -> tuple[Any, Any]:
    """:func:`_quantize` in torch operations, on ``k``'s device (``k`` float64): the same arithmetic
    (``torch.round`` rounds half to even, as ``np.rint``; NaN propagates through ``amax``)."""
    import torch

    amax = k.abs().amax(dim=-1)
    finite = torch.isfinite(k).all(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.float32).to(torch.float64)
    c = torch.where(finite[..., None], torch.clamp(torch.round(k / scale[..., None]), -127, 127),
                    torch.zeros_like(k))
    return c.to(torch.int8), torch.where(finite, scale, torch.full_like(scale, float("nan"))).to(torch.float32)


def _quantize_cupy(k: Any) -> tuple[Any, Any]:
    """:func:`_quantize` in CuPy operations, on ``k``'s device (``k`` float64)."""
    import cupy

    amax = cupy.abs(k).max(axis=-1)
    finite = cupy.isfinite(k).all(axis=-1)
    scale = cupy.where(amax > 0, amax / 127.0, 1.0).astype(np.float32).astype(np.float64)
    c = cupy.where(finite[..., None], cupy.clip(cupy.rint(k / scale[..., None]), -127, 127), 0.0)
    return c.astype(np.int8), cupy.where(finite, scale, np.nan).astype(np.float32)


def _as_f64(x: Any, kind: str) -> Any:
    """A float64 copy of device keys (bfloat16 CuPy arrays through their bits: CuPy has no bfloat16
    arithmetic; a bfloat16 is the top half of a float32)."""
    if kind == "torch":
        import torch

        return x.to(torch.float64)
    if str(x.dtype) == "bfloat16":
        import cupy

        return (x.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32).astype(cupy.float64)
    return x.astype(np.float64)


def _quantize_on_device(w: str, kv: DenseKV | PagedKV, out: KeyCodes | None, start: Any, kind: str) -> KeyCodes:
    """:func:`quantize_keys` of a cache of torch CUDA tensors or CuPy arrays, on its device."""
    keys_arr = kv.k if isinstance(kv, DenseKV) else kv.k_pages
    if kind == "torch":
        import torch

        conv, dev = _quantize_torch, keys_arr.device

        def zeros(shape: tuple[int, ...], dtype: str) -> Any:
            return torch.zeros(shape, dtype=getattr(torch, dtype), device=dev)

        def index(a: Any) -> Any:
            return torch.as_tensor(a, dtype=torch.int64, device=dev)
    else:
        import cupy

        conv = _quantize_cupy

        def zeros(shape: tuple[int, ...], dtype: str) -> Any:
            return cupy.zeros(shape, dtype=dtype)

        def index(a: Any) -> Any:
            return cupy.asarray(a, dtype=np.int64)
    if out is None:
        shape = (kv.batch, kv.max_len, kv.num_kv_heads, kv.head_dim)
        res = KeyCodes(zeros(shape, "int8"), zeros(shape[:3], "float32"))
    else:
        out.check_matches(w, "out", kv)
        if kind_of(out.codes) != kind or kind_of(out.scales) != kind:
            fail(w, f"out holds {kind_of(out.codes)} arrays but kv holds {kind} arrays; keep them together")
        res = out
    lengths, first = _span(w, kv, start)
    paged = isinstance(kv, PagedKV)
    table = kv.page_table if paged else None

    def rows(bs: np.ndarray, ts: np.ndarray) -> Any:
        """The keys of (sequence bs[i], token ts[i]), ``[n, Hkv, D]``, gathered on the device."""
        if not paged:
            return keys_arr[index(bs), index(ts)]
        ps = kv.page_size
        pages = table[index(bs), index(ts // ps)]
        return keys_arr[pages.long() if kind == "torch" else pages.astype(np.int64), index(ts % ps)]

    n_new = lengths - first
    if (n_new <= 1).all():  # a decode step (or nothing): one gather, one conversion, one scatter
        bs = np.flatnonzero(n_new == 1)
        if bs.size:
            c, sc = conv(_as_f64(rows(bs, first[bs]), kind))
            ib, it = index(bs), index(first[bs])
            res.codes[ib, it] = c
            res.scales[ib, it] = sc
        return res
    for b in range(kv.batch):
        lo, hi = int(first[b]), int(lengths[b])
        if hi <= lo:
            continue
        ts = np.arange(lo, hi)
        c, sc = conv(_as_f64(rows(np.full(hi - lo, b), ts), kind))
        res.codes[b, lo:hi] = c
        res.scales[b, lo:hi] = sc
    return res
