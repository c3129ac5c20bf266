"""One-line summaries of the formats (their ``repr``) and the host-side counts behind them.

A summary never moves data: counts that need the data (nnz, density, filled tokens) are read from
host arrays only; for device arrays the summary says ``on cuda`` instead, and the ``nnz`` properties
copy the small count buffers to the host (a synchronisation) when asked explicitly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import device_of, dtype_name, kind_of, to_host


def place(x: Any) -> str:
    """``numpy``, ``torch cpu``, ``torch cuda:0``, ``cupy cuda:0``, ``numba cuda``."""
    k = kind_of(x)
    if k == "numpy":
        return "numpy"
    if k == "torch":
        return f"torch {x.device}"
    if k == "cupy":
        return f"cupy cuda:{x.device.id}"
    return f"{k} {device_of(x)}"


def on_host(x: Any) -> bool:
    return device_of(x) == "host"


def total(x: Any) -> int:
    """Sum of an integer array (copied to the host first when it lives on a device)."""
    return int(np.asarray(to_host(x), dtype=np.int64).sum())


def shape_text(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)


def density_text(nnz: int, size: int) -> str:
    return f"{nnz / size:.2%}" if size else "-"


def head(name: str, shape: Any, x: Any) -> str:
    return f"{name}({shape_text(shape)} {dtype_name(x)}, {place(x)}"
