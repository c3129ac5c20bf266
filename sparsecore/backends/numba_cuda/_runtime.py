"""What the numba_cuda backend needs from its surroundings: numba-cuda itself (imported lazily, so
the package imports without it), a device, and zero-copy views of the caller's arrays.

A :class:`Place` is made per call from the call's first array. It views any CUDA array (torch
tensor, CuPy array, Numba device array) as a Numba device array through
``__cuda_array_interface__`` without a copy and without a host synchronisation
(``as_cuda_array(..., sync=False)``: the kernels are launched on the producer's current stream
instead), allocates outputs with the caller's own library, and launches on that library's current
stream (torch: ``torch.cuda.current_stream``, CuPy: ``cupy.cuda.get_current_stream``, Numba: the
default stream). bfloat16 is viewed as uint16 (Numba has no bfloat16 array type in every version).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from ..._arrays import BFLOAT16, dtype_name, kind_of


@cache
def availability() -> tuple[str, ...]:
    """Why numba_cuda cannot run here (empty when it can). Cached: imports numba.cuda once."""
    try:
        from numba import cuda
    except ImportError as e:  # no numba, numba without its CUDA target, or without cuda-bindings
        if isinstance(e, ModuleNotFoundError) and e.name == "numba":
            return ("numba-cuda is not installed (pip install numba-cuda)",)
        return (f"numba-cuda is not installed or does not import ({e})",)
    try:
        ok = bool(cuda.is_available())
    except Exception as e:  # noqa: BLE001 - a broken driver is a reason, not a crash of `info`
        return (f"no CUDA device (numba.cuda.is_available() raised {type(e).__name__}: {e})",)
    if not ok:
        return ("no CUDA device (numba.cuda.is_available() is False)",)
    return ()


def kernels(dtype: str) -> Any:
    from . import _kernels

    return _kernels.build(dtype)


def common() -> Any:
    from . import _kernels

    return _kernels


_TORCH_DTYPES = ("float32", "float16", "bfloat16", "int16", "int32", "int64", "uint16")


class Place:
    """The library, device and stream of one call; views, allocations and launches."""

    def __init__(self, like: Any) -> None:
        from numba import cuda

        self.cuda = cuda
        self.kind = kind_of(like)
        self.device_index: int | None = None
        self.stream: Any = None
        if self.kind == "torch":
            import torch

            self.torch = torch
            self.device = like.device
            self.device_index = like.device.index if like.device.index is not None else torch.cuda.current_device()
            ptr = torch.cuda.current_stream(self.device).cuda_stream
            self._stream_ptr = ptr
        elif self.kind == "cupy":
            import cupy

            self.cupy = cupy
            self.device_index = int(like.device.id)
            self._stream_ptr = cupy.cuda.get_current_stream().ptr
        elif self.kind == "numba":
            self._stream_ptr = None
        else:
            raise TypeError(f"numba_cuda: cannot run on arrays of kind {self.kind!r}")
        self._ctx: Any = None

    def __enter__(self) -> Place:
        cuda = self.cuda
        if self.device_index is not None:
            self._ctx = cuda.gpus[self.device_index]
            self._ctx.__enter__()
        if self._stream_ptr is not None:
            self.stream = cuda.external_stream(self._stream_ptr) if self._stream_ptr else cuda.default_stream()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None

    # -- views ----------------------------------------------------------------------------------
    def view(self, x: Any) -> Any:
        """A Numba device array over the same memory (bfloat16 as uint16)."""
        bf16 = dtype_name(x) == "bfloat16"
        if self.kind == "numba":
            return x.view(np.uint16) if bf16 else x
        if self.kind == "torch":
            t = x.detach()
            if bf16:
                t = t.view(self.torch.int16)
            arr = self.cuda.as_cuda_array(t, sync=False)
        else:
            arr = self.cuda.as_cuda_array(x.view(self.cupy.uint16) if bf16 else x, sync=False)
        return arr.view(np.uint16) if bf16 else arr

    # -- allocation -----------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An uninitialised array of the caller's library (never read before a kernel writes it)."""
        shape = tuple(int(s) for s in shape)
        if self.kind == "torch":
            if dtype not in _TORCH_DTYPES:
                raise ValueError(f"numba_cuda: no torch dtype for {dtype!r}")
            return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)
        if self.kind == "cupy":
            return self.cupy.empty(shape, dtype=BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype))
        if dtype == "bfloat16":
            return self.cuda.device_array(shape, dtype=np.uint16, stream=self._numba_stream()).view(BFLOAT16)
        return self.cuda.device_array(shape, dtype=np.dtype(dtype), stream=self._numba_stream())

    def new(self, shape: tuple[int, ...], dtype: str) -> tuple[Any, Any]:
        """(native array, Numba view) of a fresh allocation."""
        a = self.empty(shape, dtype)
        return a, self.view(a)

    # -- launches -------------------------------------------------------------------------------
    def launch(self, kernel: Any, grid: tuple[int, ...], block: int, *args: Any) -> None:
        if any(int(g) <= 0 for g in grid):
            return
        grid = tuple(int(g) for g in grid)
        if self.stream is None:
            kernel[grid, block](*args)
        else:
            kernel[grid, block, self.stream](*args)

    def fill(self, view: Any, value: Any, nt: int) -> None:
        """view[...] = value on the device (a contiguous array of any rank)."""
        flat = view.reshape(int(np.prod(view.shape))) if len(view.shape) != 1 else view
        n = int(flat.shape[0])
        if n:
            self.launch(common().fill, (min(-(-n // nt), 1024),), nt, flat, value)

    def _numba_stream(self) -> Any:
        return self.stream if self.stream is not None else 0

    def read_int(self, view: Any, i: int) -> int:
        """The one synchronising read of the backend (pack's overflow total)."""
        host = view[i:i + 1].copy_to_host(stream=self._numba_stream())
        if self.stream is not None:
            self.stream.synchronize()
        return int(host[0])
