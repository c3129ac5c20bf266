"""Compile tier: every numba_cuda kernel, every value-dtype specialisation, through
``numba.cuda.compile_ptx`` for sm_80 and sm_90 (no GPU needed: libNVVM and NVRTC are enough), then
through ``ptxas -v``: no register spills, a register bound, and no float64 arithmetic (a float literal
that slipped in would promote a whole expression to the slow FP64 pipe)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.compile

CCS = ((8, 0), (9, 0))
#: 128-thread blocks at <= 160 registers still fit 3 blocks per SM; the kernels use at most ~126.
REGISTER_LIMIT = 160
DTYPES = ("float32", "float16", "bfloat16")
_TOOLCHAIN_ERRORS = ("DynamicLibNotFoundError", "NvvmSupportError", "NvrtcSupportError", "NvvmError",
                     "CudaSupportError")


def _kernel_modules() -> tuple[Any, Any]:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1: the simulator has no compiler; run the compile tier without it")
    try:
        from numba import cuda  # noqa: F401
    except ImportError as e:
        pytest.skip(f"numba-cuda is not installed or does not import: {e}")
    from sparsecore.backends.numba_cuda import _kernels, _signatures

    return _kernels, _signatures


@functools.cache
def _toolchain_problem() -> str | None:
    """None when compile_ptx works here; otherwise why (libNVVM or NVRTC missing)."""
    from numba import cuda

    def probe(a):  # pragma: no cover - compiled, never run
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, "void(float32[::1])", cc=(8, 0))
    except Exception as e:  # noqa: BLE001 - only toolchain errors are turned into a skip below
        if type(e).__name__ in _TOOLCHAIN_ERRORS or isinstance(e, OSError):
            return (f"the CUDA compiler toolchain is missing: {type(e).__name__}: {e}".splitlines()[0] +
                    " (pip install 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-nvvm==13.0.*')")
        raise
    return None


def _cases() -> list[tuple[str, str]]:
    names = ["pack_tiles", "pack_scan", "pack_overflow", "unpack", "spmm_ell", "spmm_csr", "sddmm_ell", "sddmm_csr",
             "spmm_t_ell", "spmm_t_csr", "gated_ell", "gated_csr", "topk_scores_exact", "topk_scores_int8",
             "rescore_pool", "topk_scores_quest", "topk_scores_quest_bounds", "page_bounds", "decode_split",
             "decode_merge", "merge", "cast_out"]
    common = ("fill", "topk_select", "mass_of_every_key", "top_p_cut")
    return [("any", n) for n in common] + [(dt, n) for dt in DTYPES for n in names]


@functools.cache
def _ptx(dtype: str, name: str, cc: tuple[int, int]) -> str:
    from numba import cuda

    kernels, sigs = _kernel_modules()
    if dtype == "any":
        fn, sig = kernels.COMMON_PY_FUNCS[name], sigs.common_signatures()[name]
    else:
        fn, sig = kernels.build(dtype).py_funcs[name], sigs.signatures(dtype)[name]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
    return ptx


def _require_toolchain() -> None:
    _kernel_modules()
    problem = _toolchain_problem()
    if problem:
        pytest.skip(problem)


def test_every_kernel_has_a_signature_for_every_dtype():
    kernels, sigs = _kernel_modules()
    assert set(sigs.common_signatures()) == set(kernels.COMMON_PY_FUNCS)
    for dt in DTYPES:
        assert set(sigs.signatures(dt)) == set(kernels.build(dt).py_funcs), dt
    assert {n for d, n in _cases() if d != "any"} == set(sigs.signatures("float32"))


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype,name", _cases(), ids=lambda v: v)
def test_kernel_compiles_to_ptx(dtype, name, cc):
    _require_toolchain()
    ptx = _ptx(dtype, name, cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    f64 = [line.strip() for line in ptx.splitlines() if re.search(r"\.f64\b", line)]
    assert not f64, f"{dtype} {name}: float64 instructions in the PTX, e.g. {f64[:3]}"


def _ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "ptxas").exists():
            return str(Path(root) / "bin" / "ptxas")
    return None


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype,name", _cases(), ids=lambda v: v)
def test_kernel_has_no_spills(dtype, name, cc, tmp_path):
    _require_toolchain()
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found (PATH, CUDA_HOME, /usr/local/cuda/bin): register usage not checked")
    src = tmp_path / f"{name}.ptx"
    src.write_text(_ptx(dtype, name, cc))
    res = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(src), "-o", os.devnull],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0 and "Unsupported .version" in res.stderr:
        pytest.skip(f"{ptxas} is older than the NVVM that wrote the PTX: {res.stderr.strip().splitlines()[0]}")
    assert res.returncode == 0, res.stderr
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", res.stderr)]
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                       res.stderr)]
    assert regs and spills, res.stderr
    assert all(s == (0, 0) for s in spills), f"{dtype} {name} sm_{cc[0]}{cc[1]} spills: {res.stderr}"
    assert max(regs) <= REGISTER_LIMIT, f"{dtype} {name} uses {max(regs)} registers > {REGISTER_LIMIT}"
