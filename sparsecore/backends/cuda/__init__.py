"""CUDA C sources shared by the ``cupy`` and ``cuda_python`` backends, and everything about them that
needs no GPU library: reading the sources, the template instantiations (name expressions) of every
kernel, the compile options, the on-disk cache key and folder, and launch planning (vector widths,
head-dim and group variants, split-K counts).

This module imports no GPU library (no CuPy, no cuda-python, no torch): both launchers import it,
and the compile tier tests it on a machine without a GPU. See ``docs/kernels.md``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the two translation units; each is compiled as one NVRTC program per (arch, options).
SOURCES: tuple[str, ...] = ("ffn.cu", "attention.cu")
#: C++ type of each value dtype.
CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
#: C++ type of each CSR index dtype.
ITYPE = {"int32": "int", "int64": "long long"}
VALUE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: threads per block of each kernel family (template argument NT).
NT_PACK = 256
NT_SCAN = 1024
NT_FFN = 128
NT_ATTN = 128
NT_SELECT = 256
#: the size of the shared-memory sort of a row of the adaptive budget (top_p; template argument CAP
#: of top_p_cut): rows of more units (k + sink + window, or k rounded up to a power of two) sort in a
#: global-memory workspace instead
CUT_CAP = 2048
#: head_dim variants: values per lane; a block serves D <= 32 * VPL.
VPLS: tuple[int, ...] = (1, 2, 4, 8)
#: query heads one decode block handles at once: 1 (per head) or up to 8 (a shared GQA group).
GMAXS: tuple[int, ...] = (1, 8)
MAX_HEAD_DIM = 32 * max(VPLS)
MAX_GROUP = max(GMAXS)
#: compile options common to every arch (the arch option is added per device).
BASE_OPTIONS: tuple[str, ...] = ("-std=c++17", "-default-device", "-DNDEBUG")
_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"\s*$', re.M)


@cache
def source(name: str) -> str:
    """The text of ``name`` with the package's own ``#include "x.cuh"`` lines inlined, so the program
    is one self-contained string (NVRTC needs no include path, and the cache key covers the headers)."""
    if name not in SOURCES:
        raise ValueError(f"cuda.source: {name!r} is not one of {', '.join(SOURCES)}")
    seen: set[str] = set()

    def expand(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            inc = m.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            return expand((HERE / inc).read_text())

        return _INCLUDE.sub(sub, text)

    return expand((HERE / name).read_text())


def value_ctype(dtype: str) -> str:
    if dtype not in CTYPE:
        raise ValueError(f"cuda: dtype {dtype!r} has no kernel; supported: {', '.join(CTYPE)}")
    return CTYPE[dtype]


def vec(dtype: str) -> int:
    """Values per 16-byte vector load."""
    return 16 // VALUE_BYTES[dtype]


def vpl_for(head_dim: int) -> int:
    """The smallest values-per-lane variant whose warp covers ``head_dim``."""
    for v in VPLS:
        if head_dim <= 32 * v:
            return v
    raise ValueError(f"cuda: head_dim = {head_dim} is above the supported {MAX_HEAD_DIM}")


def gmax_for(heads: int) -> int:
    """The smallest heads-per-block variant that holds ``heads`` query heads."""
    for g in GMAXS:
        if heads <= g:
            return g
    raise ValueError(f"cuda: {heads} heads per block is above the supported {MAX_GROUP}")


# ---- name expressions -----------------------------------------------------------------------------

_IDX_PAIRS = (("int32", "int32"), ("int64", "int64"))


def ffn_names(dtype: str) -> list[str]:
    """Every template instantiation of ``ffn.cu`` for one value dtype (the dtype-free ones too)."""
    t, v = value_ctype(dtype), vec(dtype)
    names = [f"pack_tiles<{t}, {NT_PACK}>", f"sddmm_ell<{t}, {NT_FFN}, {v}>", f"cast_from_f32<{t}>"]
    for p, i in _IDX_PAIRS:
        pc, ic = ITYPE[p], ITYPE[i]
        names += [f"pack_overflow<{t}, {ic}, {NT_PACK}>", f"unpack<{t}, {pc}, {ic}, {NT_PACK}>",
                  f"spmm_ell<{t}, {pc}, {ic}, {NT_FFN}, {v}>", f"spmm_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>",
                  f"sddmm_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>", f"spmm_t_ell<{t}, {pc}, {ic}, {NT_FFN}, {v}>",
                  f"spmm_t_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>", f"gated_ell<{t}, {pc}, {ic}, {NT_FFN}, {v}>",
                  f"gated_csr<{t}, {pc}, {ic}, {NT_FFN}, {v}>"]
    return names


def ffn_common_names() -> list[str]:
    return [f"pack_scan<{ITYPE[p]}, {NT_SCAN}>" for p, _ in _IDX_PAIRS] + ["fill_zero_f32"]


def attention_names(dtype: str) -> list[str]:
    t = value_ctype(dtype)
    names = [f"decode_merge<{t}, {NT_ATTN}>", f"merge_attention<{t}, float>", f"merge_attention<{t}, double>",
             f"page_bounds<{t}, {NT_ATTN}>", f"rescore_pool<{t}, {NT_SELECT}>"]
    for vpl in VPLS:
        for g in GMAXS:
            names.append(f"decode_split<{t}, {NT_ATTN}, {vpl}, {g}>")
        names.append(f"topk_scores<{t}, {NT_ATTN}, {vpl}>")
        names.append(f"topk_scores_int8<{t}, {NT_ATTN}, {vpl}>")
    return names


def attention_common_names() -> list[str]:
    return [f"topk_select<{NT_SELECT}>", f"mass_of_every_key<{NT_SELECT}>", f"top_p_cut<{NT_SELECT}, {CUT_CAP}>"]


def names_for(src: str, dtype: str) -> list[str]:
    """Instantiations compiled together in one program: one source, one value dtype."""
    if src == "ffn.cu":
        return ffn_names(dtype) + ffn_common_names()
    if src == "attention.cu":
        return attention_names(dtype) + attention_common_names()
    raise ValueError(f"cuda.names_for: unknown source {src!r}")


def all_programs() -> list[tuple[str, str]]:
    """Every (source, dtype) program the backends compile."""
    return [(s, d) for s in SOURCES for d in CTYPE]


def arch_option(cc: tuple[int, int]) -> str:
    return f"-arch=sm_{cc[0]}{cc[1]}"


def options(cc: tuple[int, int], extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return BASE_OPTIONS + (arch_option(cc),) + tuple(extra)


# ---- disk cache -----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$SPARSECORE_CACHE_DIR`` or ``$XDG_CACHE_HOME/sparsecore/cubin`` (``~/.cache`` by default):
    a user folder, never inside the installed package."""
    env = os.environ.get("SPARSECORE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsecore" / "cubin"


def cache_key(code: str, opts: tuple[str, ...], names: list[str], cc: tuple[int, int], compiler: str) -> str:
    """sha256 of everything that decides the binary: source, options, kernels, arch, compiler version."""
    h = hashlib.sha256()
    for part in (code, "\0".join(opts), "\0".join(names), f"sm_{cc[0]}{cc[1]}", compiler):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def cache_read(key: str) -> bytes | None:
    try:
        return (cache_dir() / f"{key}.bin").read_bytes()
    except OSError:
        return None


def cache_write(key: str, blob: bytes) -> None:
    """Atomic write (rename of a temp file); a read-only or missing cache folder is not an error."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, d / f"{key}.bin")
    except OSError:
        pass


# ---- launch planning ------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class DecodePlan:
    """Grid of a split-K decode: ``(splits, rows, B)`` blocks, ``chunk`` keys per split."""

    rows: int
    per_head: bool
    gmax: int
    vpl: int
    splits: int
    chunk: int


def plan_decode(batch: int, hq: int, hkv: int, head_dim: int, max_keys: int, per_head_index: bool,
                sm_count: int = 132) -> DecodePlan:
    """Choose the block layout from shapes only (never from ``lengths`` or counts, which live on the
    device): the same grid every call, so the op is CUDA-graph safe and never synchronises.

    A block serves a whole GQA group (each KV row read once for the group) unless the selection is
    per head or the group is larger than ``MAX_GROUP``. Splits: enough blocks for four per SM, at
    least 64 keys per split (so the merge stays cheap), at most 64 splits."""
    group = hq // hkv
    per_head = per_head_index or group > MAX_GROUP
    rows = hq if per_head else hkv
    gmax = 1 if per_head else gmax_for(group)
    vpl = vpl_for(head_dim)
    blocks = max(batch * rows, 1)
    want = cdiv(4 * sm_count, blocks)  # 4 blocks per SM: what the register use of the GQA variants allows
    splits = max(1, min(want, cdiv(max(max_keys, 1), 64), 64))
    chunk = cdiv(max(max_keys, 1), splits)
    splits = cdiv(max(max_keys, 1), chunk)  # no split that is empty for every row
    return DecodePlan(rows, per_head, gmax, vpl, splits, chunk)


def page_bounds_blocks(batch: int, num_pages: int, sm_count: int = 132) -> int:
    """Blocks per sequence of ``page_bounds`` (grid ``(X, B)``), from shapes only: about eight blocks
    per SM in all, at most one per page. Each block walks its sequence's pages ``first + x, + X, ...``,
    so an update that recomputes one page per sequence launches ``B * X`` blocks, not ``B * P``."""
    return max(1, min(num_pages, max(8, cdiv(8 * sm_count, max(batch, 1)))))


def grid_1d(n: int, threads: int, cap: int = 65535) -> int:
    """Blocks of a grid-stride loop over ``n`` items (at least 1)."""
    return max(1, min(cdiv(n, threads), cap))


def aligned(ptrs: list[int], pitch_bytes: list[int]) -> bool:
    """True when every pointer is 16-byte aligned and every row pitch a multiple of 16 bytes: then a
    V-wide vector load at a multiple of V is aligned (the kernels fall back to scalar loads otherwise)."""
    return all(p % 16 == 0 for p in ptrs) and all(b % 16 == 0 for b in pitch_bytes)


def thr32(threshold: float) -> float:
    """The largest float32 <= threshold: for every float32 a, ``a <= threshold`` iff ``a <= thr32``,
    so the kernel's float32 compare decides exactly as the reference's float64 one (defined once,
    in the ops layer, for every backend)."""
    from ...ops.inputs import threshold_f32

    return threshold_f32(threshold)


# ---- toolkit headers ------------------------------------------------------------------------------

def include_dirs() -> list[str]:
    """Folders holding ``cuda_fp16.h`` and ``cuda_bf16.h`` for NVRTC: ``$CUDA_HOME``/``$CUDA_PATH``,
    ``/usr/local/cuda*``, then the pip wheels (nvidia-cuda-runtime, nvidia/cu13), then the copies that
    numba-cuda ships. Empty if none."""
    cands: list[Path] = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "include")
    cands.append(Path("/usr/local/cuda/include"))
    cands += sorted(Path("/usr/local").glob("cuda-*/include"), reverse=True)
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            cands += [Path(root) / "cu13" / "include", Path(root) / "cuda_runtime" / "include"]
        # numba-cuda ships the fp16/bf16 headers for NVRTC: a last resort without a toolkit
        spec = importlib.util.find_spec("numba_cuda")
        for root in (spec.submodule_search_locations or []) if spec else []:
            cands += sorted((Path(root) / "numba" / "cuda" / "include").glob("[0-9]*"), reverse=True)
    except (ImportError, ValueError):
        pass
    for c in cands:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file():
            return [str(c)]
    return []


def include_options() -> tuple[str, ...]:
    return tuple(f"-I{d}" for d in include_dirs())
