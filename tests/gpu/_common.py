"""Helpers shared by the gpu-tier test files: skip reasons, moving arrays between libraries,
comparisons with per-dtype tolerances, and input factories."""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from sparsecore import CSR, DenseKV, PagedKV, TiledELL
from sparsecore._arrays import to_host

DTYPES = ("float32", "float16", "bfloat16")
NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
#: (atol, rtol) of results accumulated in float32 and rounded once, relative to the magnitude scale.
TOL = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}


def gpu_reason() -> str | None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU"
    try:
        from numba import cuda
    except ImportError as e:
        return f"numba-cuda is not installed or does not import: {e}"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    if not cuda.is_available():
        return "no CUDA GPU (numba.cuda.is_available() is False)"
    return None


REASON = gpu_reason()
requires_gpu = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def cupy_module() -> Any:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


LIBS = ["torch", pytest.param("cupy", marks=pytest.mark.skipif(cupy_module() is None, reason="cupy is not installed"))]


# ---- moving arrays ------------------------------------------------------------------------------

def to_lib(x: Any, lib: str) -> Any:
    """A device copy of a host array (or of every array of a format) in ``lib``."""
    if hasattr(x, "map_arrays"):
        return x.map_arrays(lambda a: to_lib(a, lib))
    x = np.ascontiguousarray(x)
    if lib == "torch":
        import torch

        if x.dtype == NP["bfloat16"]:
            return torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16)
        return torch.from_numpy(x).cuda()
    cupy = cupy_module()
    if x.dtype == NP["bfloat16"]:
        try:
            return cupy.asarray(x.view(np.uint16)).view(NP["bfloat16"])
        except (TypeError, ValueError) as e:
            pytest.skip(f"this CuPy has no bfloat16 arrays: {e}")
    return cupy.asarray(x)


def host(x: Any) -> np.ndarray:
    return np.asarray(to_host(x))


def check_kind(x: Any, lib: str) -> None:
    if lib == "torch":
        import torch

        assert isinstance(x, torch.Tensor) and x.is_cuda, type(x)
    else:
        assert type(x).__module__.startswith("cupy"), type(x)


def close(actual: Any, expected: np.ndarray, dtype: str, scale: Any = 1.0, what: str = "") -> None:
    a = host(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: {a.shape} != {e.shape}"
    atol, rtol = TOL[dtype]
    with np.errstate(invalid="ignore"):
        same = (a == e) | (np.isnan(a) & np.isnan(e))
        bad = ~same & ~(np.abs(a - e) <= atol * np.asarray(scale, np.float64) + rtol * np.abs(e))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what} ({dtype}): {int(bad.sum())} of {a.size} out of tolerance; first at {i}: "
                             f"{a[i]} vs {e[i]}")


def exact(actual: Any, expected: np.ndarray, what: str) -> None:
    close(actual, expected, "float32", 0.0, what) if np.asarray(expected).dtype.kind == "f" else \
        np.testing.assert_array_equal(host(actual), expected, err_msg=what)


# ---- data ---------------------------------------------------------------------------------------

def sparse_dense(rng: np.random.Generator, m: int, k: int, density: float, dtype: str) -> np.ndarray:
    x = rng.uniform(0.5, 2.0, (m, k)) * rng.choice([-1.0, 1.0], (m, k))
    x[rng.random((m, k)) >= density] = 0.0
    x[0, :300] = rng.uniform(0.5, 2.0, min(300, k))  # one dense stretch: full tiles spill to the overflow
    if m > 2:
        x[2] = 0.0  # an empty row
    return x.astype(NP[dtype])


def kv_cache(rng: np.random.Generator, dtype: str, lengths: list[int], s: int, hkv: int, d: int, paged: bool,
             page_size: int = 16) -> DenseKV | PagedKV:
    b = len(lengths)
    k = rng.standard_normal((b, s, hkv, d)).astype(NP[dtype])
    v = rng.standard_normal((b, s, hkv, d)).astype(NP[dtype])
    for i, n in enumerate(lengths):
        k[i, n:] = np.nan
        v[i, n:] = np.nan
    if not paged:
        return DenseKV(k, v, np.asarray(lengths, np.int32))
    mp = -(-s // page_size)
    perm = rng.permutation(b * mp + 1)
    kp = np.full((b * mp + 1, page_size, hkv, d), np.nan, NP[dtype])
    vp = np.full_like(kp, np.nan)
    table = np.full((b, mp), -1, np.int32)
    for i, n in enumerate(lengths):
        for j in range(-(-n // page_size)):
            p, rows = perm[i * mp + j], min(page_size, n - j * page_size)
            table[i, j] = p
            kp[p, :rows] = k[i, j * page_size:j * page_size + rows]
            vp[p, :rows] = v[i, j * page_size:j * page_size + rows]
    return PagedKV(kp, vp, table, np.asarray(lengths, np.int32))


def abs_fmt(f: TiledELL | CSR) -> TiledELL | CSR:
    import dataclasses

    if isinstance(f, CSR):
        return dataclasses.replace(f, data=np.abs(f.data.astype(np.float64)))
    return dataclasses.replace(f, values=np.abs(f.values.astype(np.float64)),
                               overflow=None if f.overflow is None else abs_fmt(f.overflow))


# ---- FFN ops ------------------------------------------------------------------------------------
