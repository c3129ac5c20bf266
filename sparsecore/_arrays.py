"""Array interop: which library an array belongs to, where it lives, and zero-copy host views.

sparsecore takes NumPy arrays, torch tensors, CuPy arrays and Numba device arrays, and returns the
kind it was given. Host backends work on NumPy views of host inputs (zero-copy: DLPack for torch,
``view`` tricks for bfloat16, which DLPack exchange with NumPy does not cover); device inputs never
come back to the host here.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

#: dtypes a value buffer may have (float64 only on host backends: gradcheck, oracle use).
VALUE_DTYPES = ("float64", "float32", "float16", "bfloat16")


_KIND_BY_TYPE: dict[type, str] = {}


def kind_of(x: Any) -> str:
    """'numpy', 'torch', 'cupy', 'numba' or 'other' for anything that is not an array we know
    (decided by the type, memoised per type: every op asks for every buffer, several times)."""
    t = type(x)
    k = _KIND_BY_TYPE.get(t)
    if k is None:
        k = _kind_of_type(x)
        _KIND_BY_TYPE[t] = k
    return k


def _kind_of_type(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__ or ""
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    # numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) gives device arrays without the interface
    if mod.startswith("numba") and (hasattr(x, "__cuda_array_interface__") or type(x).__name__ == "FakeCUDAArray"):
        return "numba"
    return "other"


def is_array(x: Any) -> bool:
    return kind_of(x) != "other"


def device_of(x: Any) -> str:
    """'host' or 'cuda'."""
    k = kind_of(x)
    if k == "numpy":
        return "host"
    if k == "torch":
        return "cuda" if x.device.type == "cuda" else ("host" if x.device.type == "cpu" else x.device.type)
    if k in ("cupy", "numba"):
        return "cuda"
    return "host"


_DTYPE_NAMES: dict[tuple[type, Any], str] = {}


def dtype_name(x: Any) -> str:
    """Library-neutral dtype name: 'float32', 'bfloat16', 'int16', ... (memoised per dtype object:
    NumPy's ``dtype.name`` alone costs microseconds, and every op asks for several)."""
    dt = x.dtype
    key = (type(dt), dt)
    name = _DTYPE_NAMES.get(key)
    if name is None:
        name = str(dt).removeprefix("torch.") if kind_of(x) == "torch" else np.dtype(dt).name
        _DTYPE_NAMES[key] = name
    return name


def to_numpy(x: Any) -> np.ndarray:
    """Zero-copy NumPy view of a host array (NumPy or CPU torch tensor)."""
    k = kind_of(x)
    if k == "numpy":
        return x
    if k == "torch":
        if not x.is_cpu:
            raise ValueError(f"to_numpy: tensor is on {x.device}; device arrays never move to the host implicitly")
        t = x.detach() if x.requires_grad else x
        torch = sys.modules["torch"]  # imported: x is a tensor
        if t.dtype is torch.bfloat16:  # NumPy has no bfloat16: its bits, viewed as ml_dtypes' bfloat16
            return t.view(torch.int16).numpy().view(BFLOAT16)
        return t.numpy()  # shares the memory (a few times cheaper than DLPack for the small tensors of decode)
    raise TypeError(f"to_numpy: expected a NumPy array or a CPU torch tensor, got {type(x).__name__}")


def from_numpy(a: np.ndarray, kind: str) -> Any:
    """Wrap a NumPy array as ``kind`` without copying (host kinds only)."""
    if kind == "numpy":
        return a
    if kind == "torch":
        torch = _torch()
        if not a.flags.writeable:  # torch.from_numpy wants writeable memory
            a = a.copy()
        if a.dtype == BFLOAT16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    raise ValueError(f"from_numpy: cannot make a host array of kind {kind!r}")


def _torch() -> Any:
    import torch

    return torch


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy (or view, for host arrays) of any array: only for explicit calls such as
    ``validate()`` and conversions that the user asked for, never inside an op."""
    k = kind_of(x)
    if k == "torch" and x.device.type != "cpu":
        return to_numpy(x.detach().cpu())
    if k == "cupy":
        return x.get()
    if k == "numba":
        return x.copy_to_host()
    return to_numpy(x)
