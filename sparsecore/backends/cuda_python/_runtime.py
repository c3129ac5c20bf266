"""The cuda_python launcher's runtime: the CUDA driver through ``cuda.bindings.driver`` (no CuPy).

Kernels are loaded per (device, source, dtype) from the cubin that :mod:`._nvrtc` compiles (or finds
in the disk cache) and launched with ``cuLaunchKernel`` on the caller's current stream (torch's
current stream for torch tensors, CuPy's for CuPy arrays, the default stream for Numba arrays).
Device pointers come from the caller's tensors (``data_ptr``, CuPy's ``data.ptr``,
``__cuda_array_interface__``); outputs are allocated by the caller's library, so they are its arrays.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import numpy as np

from .. import cuda as C
from ..cuda import _arrays as A
from . import _nvrtc

_lock = threading.Lock()
_modules: dict[tuple[int, str, str], tuple[Any, dict[str, Any]]] = {}


@cache
def _driver() -> Any:
    from cuda.bindings import driver

    return driver


def _ok(res: Any, what: str) -> Any:
    drv = _driver()
    err = res[0] if isinstance(res, tuple) else res
    if err != drv.CUresult.CUDA_SUCCESS:
        _, msg = drv.cuGetErrorString(err)
        raise RuntimeError(f"cuda_python: {what} failed: {err} ({msg.decode() if isinstance(msg, bytes) else msg})")
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else res[1:]
    return None


@cache
def availability() -> tuple[str, ...]:
    try:
        drv = _driver()
    except ImportError as e:
        return (f"cuda-python is not installed (pip install cuda-python): {e}",)
    try:
        _nvrtc.version()
    except _nvrtc.NvrtcMissing as e:
        return (str(e),)
    if not C.include_dirs():
        return ("the CUDA headers cuda_fp16.h / cuda_bf16.h are not found (set CUDA_HOME or pip install "
                "nvidia-cuda-runtime)",)
    try:
        err = drv.cuInit(0)[0]
        if err != drv.CUresult.CUDA_SUCCESS:
            return (f"no CUDA device (cuInit returned {err})",)
        err, n = drv.cuDeviceGetCount()
    except Exception as e:  # noqa: BLE001 - a missing libcuda is a reason, not a crash of `info`
        return (f"no CUDA device (the CUDA driver library does not load: {type(e).__name__})",)
    if err != drv.CUresult.CUDA_SUCCESS or n == 0:
        return ("no CUDA device",)
    return ()


def version() -> str:
    try:
        from importlib import metadata

        return f"cuda-bindings {metadata.version('cuda-bindings')}"
    except Exception:  # noqa: BLE001
        return "cuda-bindings (not installed)"


@cache
def _device_info(index: int) -> tuple[Any, tuple[int, int], int]:
    """(primary context, compute capability, SM count) of device ``index``."""
    drv = _driver()
    _ok(drv.cuInit(0), "cuInit")
    dev = _ok(drv.cuDeviceGet(index), "cuDeviceGet")
    ctx = _ok(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    a = drv.CUdevice_attribute
    major = _ok(drv.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "attribute")
    minor = _ok(drv.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "attribute")
    sms = _ok(drv.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "attribute")
    return ctx, (int(major), int(minor)), int(sms)


def _function(index: int, src: str, dtype: str, name: str) -> Any:
    key = (index, src, dtype)
    with _lock:
        entry = _modules.get(key)
        if entry is None:
            _, cc, _ = _device_info(index)
            comp = _nvrtc.compile_program(src, dtype, cc)  # the device's own arch
            drv = _driver()
            image = np.frombuffer(comp.cubin, dtype=np.uint8)  # kept alive across the call
            mod = _ok(drv.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
            funcs = {n: _ok(drv.cuModuleGetFunction(mod, low.encode()), f"cuModuleGetFunction({n})")
                     for n, low in comp.lowered.items()}
            entry = (mod, funcs)
            _modules[key] = entry
    funcs = entry[1]
    if name not in funcs:
        raise ValueError(f"cuda_python: kernel {name!r} is not instantiated in {src} for {dtype}")
    return funcs[name]


class Runtime(A.ArrayMethods):
    """One call: the caller's library, device and stream (see :class:`sparsecore.backends.cuda._ops.Runtime`)."""

    def __init__(self, like: Any) -> None:
        self.like = like
        self.index = A.device_index(like)
        self.stream = A.stream_handle(like)
        ctx, self.cc, self.sm_count = _device_info(self.index)
        self._ctx = ctx

    def __enter__(self) -> Runtime:
        _ok(_driver().cuCtxPushCurrent(self._ctx), "cuCtxPushCurrent")
        return self

    def __exit__(self, *exc: Any) -> None:
        _ok(_driver().cuCtxPopCurrent(), "cuCtxPopCurrent")

    def launch(self, src: str, dtype: str, name: str, grid: tuple[int, int, int], block: int, args: list[Any]) -> None:
        drv = _driver()
        f = _function(self.index, src, dtype, name)
        # kernelParams: an array of pointers to each argument's bytes (the driver copies them at launch)
        vals = [np.array([a], dtype=a.dtype) for a in args]
        addrs = np.array([v.ctypes.data for v in vals], dtype=np.uint64)
        _ok(drv.cuLaunchKernel(f, grid[0], grid[1], grid[2], block, 1, 1, 0, drv.CUstream(self.stream),
                               addrs.ctypes.data, 0), f"cuLaunchKernel({name})")

    def read_int(self, x: Any, i: int) -> int:
        drv = _driver()
        size = A.itemsize(x)
        host = np.zeros(1, dtype=np.int64 if size == 8 else np.int32)
        _ok(drv.cuMemcpyDtoHAsync(host.ctypes.data, A.ptr(x) + i * size, size, drv.CUstream(self.stream)),
            "cuMemcpyDtoHAsync")
        _ok(drv.cuStreamSynchronize(drv.CUstream(self.stream)), "cuStreamSynchronize")
        return int(host[0])
