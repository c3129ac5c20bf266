"""The cupy launcher's runtime: ``cupy.RawModule`` with name expressions (CuPy compiles with NVRTC and
caches the binary on disk itself, keyed by source, options, arch and compiler), launched on CuPy's
current stream, or on torch's current stream for torch tensors (as a ``cupy.cuda.ExternalStream``).
Torch tensors are used in place through their device pointers; outputs are allocated by the caller's
library."""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

from .. import cuda as C
from ..cuda import _arrays as A

_lock = threading.Lock()
_modules: dict[tuple[int, str, str], Any] = {}


@cache
def availability() -> tuple[str, ...]:
    try:
        import cupy
    except ImportError:
        return ("cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)",)
    except Exception as e:  # noqa: BLE001 - a CuPy that does not import is a reason
        return (f"cupy does not import: {type(e).__name__}: {e}",)
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        return (f"no CUDA device (cupy: {type(e).__name__}: {e})",)
    if n == 0:
        return ("no CUDA device",)
    return ()


def _module(index: int, src: str, dtype: str) -> Any:
    key = (index, src, dtype)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            import cupy

            with cupy.cuda.Device(index):
                # no -std: CuPy may add its own and NVRTC's default (C++17) is what the sources need
                opts = tuple(o for o in C.BASE_OPTIONS if not o.startswith("-std")) + C.include_options()
                mod = cupy.RawModule(code=C.source(src), options=opts, name_expressions=C.names_for(src, dtype))
                mod.compile()
            _modules[key] = mod
    return mod


@cache
def _sm_count(index: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceProperties(index)["multiProcessorCount"])


class Runtime(A.ArrayMethods):
    """One call: the caller's library, device and stream (see :class:`sparsecore.backends.cuda._ops.Runtime`)."""

    def __init__(self, like: Any) -> None:
        import cupy

        self.cupy = cupy
        self.like = like
        self.index = A.device_index(like)
        self.sm_count = _sm_count(self.index)
        self._dev: Any = None
        self._stream: Any = None
        self._torch_stream = A.stream_handle(like) if A.kind_of(like) == "torch" else None

    def __enter__(self) -> Runtime:
        self._dev = self.cupy.cuda.Device(self.index)
        self._dev.__enter__()
        if self._torch_stream is not None:
            self._stream = self.cupy.cuda.ExternalStream(self._torch_stream, self.index)
            self._stream.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stream is not None:
            self._stream.__exit__(*exc)
        self._dev.__exit__(*exc)

    def launch(self, src: str, dtype: str, name: str, grid: tuple[int, int, int], block: int, args: list[Any]) -> None:
        kern = _module(self.index, src, dtype).get_function(name)
        kern(grid, (block, 1, 1), tuple(args))  # numpy scalars by value; pointers as uint64

    def read_int(self, x: Any, i: int) -> int:
        import numpy as np

        cp = self.cupy
        size = A.itemsize(x)
        host = np.zeros(1, dtype=np.int64 if size == 8 else np.int32)
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(host.ctypes.data, A.ptr(x) + i * size, size,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        stream.synchronize()
        return int(host[0])
