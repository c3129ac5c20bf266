"""NVRTC through ``cuda.bindings.nvrtc``: compile one (source, dtype) program for one arch to a cubin,
with the lowered (mangled) name of every kernel template instantiation, and ``ptxas -v``'s
register and spill report. Used by the launcher and by the compile tier (no GPU needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from .. import cuda as C


class NvrtcMissing(RuntimeError):
    """cuda-python's NVRTC binding or the NVRTC library itself is not installed."""


@cache
def _nvrtc() -> Any:
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise NvrtcMissing(f"cuda-python (cuda.bindings.nvrtc) is not installed: {e}") from e
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # noqa: BLE001 - a missing libnvrtc surfaces as a loader error here
        raise NvrtcMissing(f"the NVRTC library does not load: {type(e).__name__}: {e}") from e
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcMissing(f"nvrtcVersion failed: {err}")
    return nvrtc


def version() -> str:
    nv = _nvrtc()
    _, major, minor = nv.nvrtcVersion()
    return f"nvrtc {major}.{minor}"


def _check(res: tuple[Any, ...], what: str, log: str = "") -> tuple[Any, ...]:
    nv = _nvrtc()
    if res[0] != nv.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"cuda_python: {what} failed: {res[0]}" + (f"\n{log}" if log else ""))
    return res[1:]


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    lowered: dict[str, str]  # name expression -> mangled kernel name
    log: str


def compile_program(src: str, dtype: str, cc: tuple[int, int], extra: tuple[str, ...] = (),
                    use_cache: bool = True) -> Compiled:
    """The cubin of ``names_for(src, dtype)`` for ``sm_<cc>``; from the disk cache when it has it."""
    nv = _nvrtc()
    code = C.source(src)
    names = C.names_for(src, dtype)
    opts = C.options(cc, extra) + C.include_options()
    key = C.cache_key(code, opts, names, cc, version())  # the -I folder too: its headers shape the binary
    if use_cache:
        blob = C.cache_read(key)
        if blob is not None and b"\n" in blob:
            head, cubin = blob.split(b"\n", 1)
            try:
                return Compiled(cubin, json.loads(head), "")
            except ValueError:
                pass  # a damaged entry: compile again
    (prog,) = _check(nv.nvrtcCreateProgram(code.encode(), src.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for n in names:
            _check(nv.nvrtcAddNameExpression(prog, n.encode()), f"nvrtcAddNameExpression({n})")
        bopts = [o.encode() for o in opts]
        res = nv.nvrtcCompileProgram(prog, len(bopts), bopts)
        (size,) = _check(nv.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check(nv.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        _check(res, f"compiling {src} for {dtype}, sm_{cc[0]}{cc[1]}", log)
        (size,) = _check(nv.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nv.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        lowered = {}
        for n in names:
            (low,) = _check(nv.nvrtcGetLoweredName(prog, n.encode()), f"nvrtcGetLoweredName({n})")
            lowered[n] = low.decode() if isinstance(low, bytes) else str(low)
    finally:
        nv.nvrtcDestroyProgram(prog)
    if use_cache:
        C.cache_write(key, json.dumps(lowered).encode() + b"\n" + cubin)
    return Compiled(cubin, lowered, log)
