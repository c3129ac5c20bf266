"""cuda_python: the CUDA C kernels of ``sparsecore/backends/cuda`` compiled by NVRTC and launched through
the CUDA driver API of cuda-python (``cuda.bindings``); no CuPy needed. Takes torch CUDA tensors,
CuPy arrays and Numba device arrays (raw device pointers), returns the caller's kind, launches on the
caller's current stream.

Importing needs neither cuda-python nor a GPU: the classes say why they cannot run ("cuda-python is
not installed", "no CUDA device"). See ``docs/kernels.md``.
"""

from __future__ import annotations

from typing import Any

from ...ops.dispatcher import register
from ..cuda._classes import make_classes


def _availability() -> list[str]:
    from ._runtime import availability

    return list(availability())


def _runtime(like: Any) -> Any:
    from ._runtime import Runtime

    return Runtime(like)


CLASSES = [register(c) for c in make_classes("cuda_python", _availability, _runtime,
                                              ("torch", "cupy", "numba"))]
globals().update({c.__name__: c for c in CLASSES})

__all__ = [c.__name__ for c in CLASSES]
