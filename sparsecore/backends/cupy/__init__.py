"""cupy: the CUDA C kernels of ``sparsecore/backends/cuda`` compiled by ``cupy.RawModule`` (NVRTC, with
name expressions for the template instantiations) and launched by CuPy. Takes CuPy arrays and torch
CUDA tensors (zero-copy, by device pointer), returns the caller's kind, launches on the caller's
current stream (torch's, through ``cupy.cuda.ExternalStream``).

Importing needs neither CuPy nor a GPU: the classes say why they cannot run ("cupy is not
installed", "no CUDA device"). See ``docs/kernels.md``.
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


CLASSES = [register(c) for c in make_classes("cupy", _availability, _runtime, ("cupy", "torch"))]
globals().update({c.__name__: c for c in CLASSES})

__all__ = [c.__name__ for c in CLASSES]
