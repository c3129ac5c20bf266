"""The caller's arrays as the CUDA C launchers see them: device pointer, device index, current stream,
contiguous copies and new allocations in the caller's own library (torch, CuPy or Numba). The
library of an array is imported only when an array of it is handled; nothing here imports a GPU
library at module import."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._arrays import BFLOAT16, dtype_name, kind_of

_NP = {"float32": np.float32, "float16": np.float16, "int16": np.int16, "int32": np.int32, "int64": np.int64}


def device_index(x: Any) -> int:
    k = kind_of(x)
    if k == "torch":
        import torch

        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    if k == "cupy":
        return int(x.device.id)
    if k == "numba":
        from numba import cuda

        return int(cuda.get_current_device().id)
    raise TypeError(f"cuda: cannot run on arrays of kind {k!r} ({type(x).__name__})")


def stream_handle(x: Any) -> int:
    """The CUDA stream the caller's library is working on (0: the legacy default stream)."""
    k = kind_of(x)
    if k == "torch":
        import torch

        return int(torch.cuda.current_stream(x.device).cuda_stream)
    if k == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def ptr(x: Any) -> int:
    k = kind_of(x)
    if k == "torch":
        return int(x.data_ptr())
    if k == "cupy":
        return int(x.data.ptr)
    return int(x.__cuda_array_interface__["data"][0])


def contig(x: Any) -> Any:
    """``x`` itself when C-contiguous, else a contiguous copy made on the device by its library."""
    k = kind_of(x)
    if k == "torch":
        return x if x.is_contiguous() else x.contiguous()
    if k == "cupy":
        import cupy

        return cupy.ascontiguousarray(x)
    if k == "numba":
        if x.is_c_contiguous():
            return x
        raise ValueError("cuda: Numba device arrays must be C-contiguous (copy them with numba.cuda first)")
    raise TypeError(f"cuda: cannot run on arrays of kind {k!r}")


def is_contiguous(x: Any) -> bool:
    """Whether ``x`` is C-contiguous (so its pointer can be written in place)."""
    k = kind_of(x)
    if k == "torch":
        return bool(x.is_contiguous())
    if k == "cupy":
        return bool(x.flags.c_contiguous)
    if k == "numba":
        return bool(x.is_c_contiguous())
    return bool(np.asarray(x).flags.c_contiguous)


def empty(like: Any, shape: tuple[int, ...], dtype: str, stream: int = 0) -> Any:
    """An uninitialised array of ``like``'s library on its device (never read before a kernel writes it)."""
    shape = tuple(int(s) for s in shape)
    k = kind_of(like)
    if k == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    if k == "cupy":
        import cupy

        with cupy.cuda.Device(int(like.device.id)):
            return cupy.empty(shape, dtype=BFLOAT16 if dtype == "bfloat16" else np.dtype(_NP[dtype]))
    if k == "numba":
        from numba import cuda

        if dtype == "bfloat16":
            return cuda.device_array(shape, dtype=np.uint16).view(BFLOAT16)
        return cuda.device_array(shape, dtype=np.dtype(_NP[dtype]))
    raise TypeError(f"cuda: cannot allocate arrays of kind {k!r}")


def itemsize(x: Any) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "int32": 4, "int64": 8,
            "float64": 8}[dtype_name(x)]


class ArrayMethods:
    """The array half of a launcher's ``Runtime`` (see :class:`sparsecore.backends.cuda._ops.Runtime`), for a
    launcher that keeps the caller's array in ``self.like``: outputs on its device, raw pointers, contiguity."""

    like: Any

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return empty(self.like, shape, dtype)

    def ptr(self, x: Any) -> int:
        return ptr(x)

    def contig(self, x: Any) -> Any:
        return contig(x)
