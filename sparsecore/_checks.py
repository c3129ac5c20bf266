"""Small named checkers. Every message starts with the caller's name, names the argument, shows the
bad value and says what is allowed. Never ``assert`` on user input."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._arrays import dtype_name, is_array, kind_of


def fail(where: str, msg: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{where}: {msg}")


def check_array(where: str, name: str, x: Any) -> None:
    if not is_array(x):
        fail(where, f"{name} must be an array (NumPy, torch, CuPy or Numba device array), "
                    f"got {type(x).__name__}", TypeError)


def check_ndim(where: str, name: str, x: Any, ndim: int, layout: str) -> None:
    check_array(where, name, x)
    if len(x.shape) != ndim:
        fail(where, f"{name} has shape {tuple(x.shape)}; expected {ndim} dimension{'s' * (ndim != 1)} {layout}")


def check_dtype(where: str, name: str, x: Any, allowed: Sequence[str]) -> str:
    dt = dtype_name(x)
    if dt not in allowed:
        fail(where, f"{name} has dtype {dt}; allowed: {', '.join(allowed)}", TypeError)
    return dt


def check_same_dtype(where: str, named: dict[str, Any]) -> None:
    dts = {n: dtype_name(a) for n, a in named.items()}
    if len(set(dts.values())) > 1:
        desc = ", ".join(f"{n} is {d}" for n, d in dts.items())
        fail(where, f"value dtypes must match: {desc}", TypeError)


def check_same_place(where: str, named: dict[str, Any]) -> None:
    """All arrays of one call come from one library and one device."""
    kinds = {n: kind_of(a) for n, a in named.items()}
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        fail(where, f"all arrays must come from one library: {desc}", TypeError)
    devs = {n: _device_label(a) for n, a in named.items()}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        fail(where, f"all arrays must be on one device: {desc}")


def _device_label(x: Any) -> str:
    k = kind_of(x)
    if k == "torch":
        return str(x.device)
    if k == "cupy":
        return f"cuda:{x.device.id}"
    if k == "numba":
        return "cuda"
    return "cpu"


def check_int(where: str, name: str, v: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        fail(where, f"{name} must be an int, got {v!r} ({type(v).__name__})", TypeError)
    v = int(v)
    if lo is not None and v < lo:
        fail(where, f"{name} = {v}; must be >= {lo}")
    if hi is not None and v > hi:
        fail(where, f"{name} = {v}; must be <= {hi}")
    return v


def check_real(where: str, name: str, v: Any, *, allowed: str, positive: bool = False) -> float:
    """A finite real number (Python or NumPy scalar), ``>= 0`` or ``> 0``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        fail(where, f"{name} = {v!r} ({type(v).__name__}); must be {allowed}", TypeError)
    f = float(v)
    if not math.isfinite(f) or f < 0 or (positive and f == 0):
        fail(where, f"{name} = {v!r}; must be {allowed}")
    return f


def check_choice(where: str, name: str, v: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if v not in choices:
        fail(where, f"{name} = {v!r}; allowed: {', '.join(repr(c) for c in choices)}")

