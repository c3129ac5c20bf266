"""Run the CUDA C kernels on the CPU, for tests on machines without a GPU (the compile tier).

The very same ``.cu`` sources are compiled by the host C++ compiler against a small emulation header:
one ``std::thread`` per CUDA thread, blocks run one after another (so ``__shared__`` becomes a
function-local ``static``), ``__syncthreads`` is a block-wide ``std::barrier``, warp shuffles and
ballots exchange through a per-warp buffer between two warp barriers, atomics are
``std::atomic_ref``. ``__half`` is ``_Float16``, ``__nv_bfloat16`` a 16-bit struct with
round-to-nearest-even conversion. Threads that return early drop out of their barriers, as exited
threads do on the GPU.

This checks the kernels' logic (indexing, tails, scans, the radix select, split-K merges) against the
reference; it does not check the GPU memory model, warp scheduling, vector-load alignment faults or
performance. :class:`CpuRuntime` implements the launchers' ``Runtime`` protocol over NumPy arrays.
Imports no GPU library; needs ``g++`` (C++20).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from sparsecore._arrays import BFLOAT16
from sparsecore.backends.cuda import names_for, source

HEADER = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
using std::max;
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
struct uint3_ { unsigned x, y, z; };
thread_local uint3_ threadIdx, blockIdx, gridDim, blockDim;
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct int2 { int x, y; };
inline int2 make_int2(int x, int y) { return int2{x, y}; }
template <typename T> inline T __ldg(const T* p) { return *p; }
typedef _Float16 __half;
inline float __half2float(__half v) { return (float)v; }
inline __half __float2half_rn(float v) { return (__half)v; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 v) {
    uint32_t u = (uint32_t)v.bits << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
struct EmuWarp { std::barrier<>* bar; float f[32]; unsigned u[32]; };
struct EmuBlock { std::barrier<>* bar; EmuWarp* warps; };
thread_local EmuBlock* emu_block;
inline void __syncthreads() { emu_block->bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    EmuWarp& w = emu_block->warps[threadIdx.x / 32];
    const int lane = threadIdx.x & 31;
    w.f[lane] = v; w.bar->arrive_and_wait();
    float r = w.f[lane ^ o]; w.bar->arrive_and_wait();
    return r;
}
inline unsigned __ballot_sync(unsigned, int p) {
    EmuWarp& w = emu_block->warps[threadIdx.x / 32];
    const int lane = threadIdx.x & 31;
    w.u[lane] = p != 0; w.bar->arrive_and_wait();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= w.u[i] << i;
    w.bar->arrive_and_wait();
    return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }

template <typename... A, size_t... I>
void emu_call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <typename... A>
void emu_launch(void (*f)(A...), int gx, int gy, int gz, int nt, void** args) {
    // nt threads per launch; they walk the blocks in order, with fresh block and warp barriers per
    // block (set up by thread 0 between two launch-wide barriers), so blocks never overlap.
    const int nw = (nt + 31) / 32;
    std::barrier<> lbar(nt);
    std::unique_ptr<std::barrier<>> bbar;
    std::vector<std::unique_ptr<std::barrier<>>> wbars(nw);
    std::vector<EmuWarp> warps(nw);
    EmuBlock blk{nullptr, warps.data()};
    const long long nblocks = (long long)gx * gy * gz;
    std::vector<std::thread> ts;
    for (int t = 0; t < nt; ++t) ts.emplace_back([&, t] {
        for (long long i = 0; i < nblocks; ++i) {
            if (t == 0) {
                bbar.reset(new std::barrier<>(nt));
                for (int w = 0; w < nw; ++w) {
                    wbars[w].reset(new std::barrier<>(std::min(32, nt - 32 * w)));
                    warps[w].bar = wbars[w].get();
                }
                blk.bar = bbar.get();
            }
            lbar.arrive_and_wait();
            threadIdx = uint3_{(unsigned)t, 0, 0};
            blockIdx = uint3_{(unsigned)(i % gx), (unsigned)((i / gx) % gy), (unsigned)(i / ((long long)gx * gy))};
            gridDim = uint3_{(unsigned)gx, (unsigned)gy, (unsigned)gz};
            blockDim = uint3_{(unsigned)nt, 1, 1};
            emu_block = &blk;
            emu_call(f, args, std::index_sequence_for<A...>{});
            warps[t / 32].bar->arrive_and_drop();  // an exited thread no longer holds its barriers
            bbar->arrive_and_drop();
            lbar.arrive_and_wait();
        }
    });
    for (auto& th : ts) th.join();
}
"""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _program(src: str, dtype: str) -> tuple[str, list[str]]:
    code = re.sub(r"^#include <cuda_(fp16|bf16)\.h>\s*$", "", source(src), flags=re.M)
    code = code.replace("#pragma once", "")
    names = names_for(src, dtype)
    stubs = [f'extern "C" void sc_launch_{i}(int gx, int gy, int gz, int nt, void** args) '
             f"{{ emu_launch(&{n}, gx, gy, gz, nt, args); }}" for i, n in enumerate(names)]
    return HEADER + code + "\n" + "\n".join(stubs) + "\n", names


@cache
def library(src: str, dtype: str) -> tuple[Any, dict[str, Any]]:
    """The shared library of (source, dtype), built once into a temp cache folder."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("cuda_emulate: no C++ compiler (g++) found")
    code, names = _program(src, dtype)
    key = hashlib.sha256(code.encode()).hexdigest()[:16]
    d = Path(tempfile.gettempdir()) / f"sparsecore-emu-{os.getuid() if hasattr(os, 'getuid') else 0}"
    d.mkdir(parents=True, exist_ok=True)
    so = d / f"{Path(src).stem}-{dtype}-{key}.so"
    if not so.exists():
        cpp = d / f"{Path(src).stem}-{dtype}-{key}.cpp"
        cpp.write_text(code)
        tmp = d / f".{so.name}.{os.getpid()}"
        res = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(tmp), str(cpp)],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"cuda_emulate: {cxx} failed on {src} ({dtype}):\n{res.stderr[-6000:]}")
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    funcs = {}
    for i, n in enumerate(names):
        f = getattr(lib, f"sc_launch_{i}")
        f.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p]
        f.restype = None
        funcs[n] = f
    return lib, funcs


class CpuRuntime:
    """The ``Runtime`` of :mod:`sparsecore.backends.cuda._ops` over host NumPy arrays, running the
    emulated kernels. New arrays are filled with a 0xA5 byte pattern so unwritten outputs show."""

    sm_count = 4

    def __enter__(self) -> CpuRuntime:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def empty(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
        a = np.empty(tuple(int(s) for s in shape), dtype=dt)
        a.view(np.uint8).fill(0xA5)
        return a

    def ptr(self, x: Any) -> int:
        return int(x.ctypes.data)

    def contig(self, x: Any) -> Any:
        return np.ascontiguousarray(x)

    def launch(self, src: str, dtype: str, name: str, grid: tuple[int, int, int], block: int, args: list[Any]) -> None:
        _, funcs = library(src, dtype)
        vals = [np.array([a], dtype=a.dtype) for a in args]
        addrs = np.array([v.ctypes.data for v in vals], dtype=np.uint64)
        funcs[name](grid[0], grid[1], grid[2], block, addrs.ctypes.data)

    def read_int(self, x: Any, i: int) -> int:
        return int(np.asarray(x).reshape(-1)[i])
