"""Compile tier for the CUDA C kernels (``sparsecore/backends/cuda/*.cu``): every template instantiation
that the ``cupy`` and ``cuda_python`` backends launch, compiled by NVRTC (cuda.bindings) to a cubin
for sm_80 and sm_90 with ``-Xptxas=-v``; no spill, no stack frame, and registers under a bound per
kernel family. Also the host-side planning that needs no GPU: sources, name expressions, cache keys
and folder, split-K plans, alignment, the dispatcher classes of both launchers.

No GPU is needed; the tier skips only when NVRTC itself is missing (with the reason)."""

from __future__ import annotations

import functools
import re
import time
from typing import Any

import numpy as np
import pytest

from sparsecore.backends import cuda as C
from tests._util import (
    check_adaptive_against_reference,
    check_mass_ranking_against_reference,
    check_rescore_against_reference,
    check_topk_against_reference,
    dequantized_kv,
)
from tests.cuda_emulate import CpuRuntime

pytestmark = pytest.mark.compile

CCS = ((8, 0), (9, 0))

#: Register bounds (ptxas -v "Used N registers"). 128-thread blocks: <= 128 registers keep 4 blocks
#: (16 warps) per SM, enough to hide latency for these memory-bound kernels. The decode kernel that
#: holds 8 query heads x 8 values per lane (head_dim 256, a GQA group of 8) keeps 2 x 8 x 8 float
#: accumulators and queries in registers by design: bound 232 (2 blocks per SM), below the 255 cap.
DEFAULT_BOUND = 96
BOUNDS: dict[str, int] = {
    "decode_split<*, 128, 4, 8>": 128,
    "decode_split<*, 128, 8, 8>": 232,
}


def bound_for(name: str) -> int:
    generic = re.sub(r"<(float|__half|__nv_bfloat16), ", "<*, ", name)
    return BOUNDS.get(generic, DEFAULT_BOUND)


def threads_of(name: str) -> int:
    """Block size the launcher uses for a kernel (the kernels carry no __launch_bounds__, see common.cuh)."""
    fam = name.split("<", 1)[0]
    return {"pack_tiles": C.NT_PACK, "pack_overflow": C.NT_PACK, "unpack": C.NT_PACK, "pack_scan": C.NT_SCAN,
            "topk_select": C.NT_SELECT, "mass_of_every_key": C.NT_SELECT, "top_p_cut": C.NT_SELECT,
            "fill_zero_f32": 256, "cast_from_f32": 256,
            "merge_attention": 256}.get(fam, C.NT_FFN)


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'.*?(\d+) bytes stack frame, (\d+) bytes spill "
                    r"stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


@functools.cache
def _nvrtc_problem() -> str | None:
    try:
        from sparsecore.backends.cuda_python import _nvrtc
    except ImportError as e:  # pragma: no cover - the package itself is broken: fail below, not skip
        raise AssertionError(f"sparsecore.backends.cuda_python does not import: {e}") from e
    try:
        _nvrtc.version()
    except _nvrtc.NvrtcMissing as e:
        return f"{e} (pip install 'cuda-bindings>=12.6' 'nvidia-cuda-nvrtc')"
    if not C.include_dirs():
        return "the CUDA headers cuda_fp16.h / cuda_bf16.h are not found (set CUDA_HOME or install the toolkit)"
    return None


def _needs_nvrtc() -> None:
    reason = _nvrtc_problem()
    if reason:
        pytest.skip(reason)


@functools.cache
def _compiled(src: str, dtype: str, cc: tuple[int, int]) -> tuple[dict[str, tuple[int, int, int]], float]:
    """{name expression: (registers, spill bytes, stack bytes)} and the compile seconds."""
    from sparsecore.backends.cuda_python import _nvrtc

    t0 = time.perf_counter()
    comp = _nvrtc.compile_program(src, dtype, cc, ("-Xptxas=-v",), use_cache=False)
    secs = time.perf_counter() - t0
    by_mangled = {v: k for k, v in comp.lowered.items()}
    out: dict[str, tuple[int, int, int]] = {}
    for m in _ENTRY.finditer(comp.log):
        if int(m.group(2)) != cc[0] * 10 + cc[1]:
            continue
        name = by_mangled.get(m.group(1), m.group(1))
        out[name] = (int(m.group(6)), int(m.group(4)) + int(m.group(5)), int(m.group(3)))
    missing = set(comp.lowered) - set(out)
    assert not missing, f"ptxas -v reported nothing for {sorted(missing)}"
    return out, secs


PROGRAMS = [(s, d, cc) for s, d in C.all_programs() for cc in CCS]


@pytest.mark.parametrize("src,dtype,cc", PROGRAMS, ids=[f"{s}-{d}-sm{c[0]}{c[1]}" for s, d, c in PROGRAMS])
def test_kernels_compile_without_spills(src: str, dtype: str, cc: tuple[int, int]) -> None:
    _needs_nvrtc()
    kernels, _ = _compiled(src, dtype, cc)
    assert set(C.names_for(src, dtype)) <= set(kernels)
    bad = []
    for name, (regs, spill, stack) in sorted(kernels.items()):
        if spill or stack:
            bad.append(f"{name}: {spill} bytes spilled, {stack} bytes stack frame")
        if regs > bound_for(name):
            bad.append(f"{name}: {regs} registers > bound {bound_for(name)}")
        if regs * threads_of(name) > 65536:
            bad.append(f"{name}: {regs} registers x {threads_of(name)} threads do not fit one SM's 65536")
    assert not bad, f"{src} {dtype} sm_{cc[0]}{cc[1]}:\n" + "\n".join(bad)


def test_register_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the table that docs/kernels.md quotes (run with -s to see it); also checks the set of
    programs is complete."""
    _needs_nvrtc()
    lines = []
    for src, dtype, cc in PROGRAMS:
        kernels, secs = _compiled(src, dtype, cc)
        for name, (regs, spill, _) in sorted(kernels.items()):
            lines.append(f"| `{name}` | sm_{cc[0]}{cc[1]} | {regs} | {spill} | {bound_for(name)} |")
    with capsys.disabled():
        print("\n" + "\n".join(sorted(set(lines))))
    assert len(lines) >= 2 * sum(len(C.names_for(s, d)) for s, d in C.all_programs())


def test_compile_cache_roundtrip(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_nvrtc()
    from sparsecore.backends.cuda_python import _nvrtc

    monkeypatch.setenv("SPARSECORE_CACHE_DIR", str(tmp_path))
    first = _nvrtc.compile_program("ffn.cu", "float32", (9, 0))
    files = list(tmp_path.glob("*.bin"))
    assert len(files) == 1 and len(files[0].stem) == 64
    second = _nvrtc.compile_program("ffn.cu", "float32", (9, 0))
    assert second.cubin == first.cubin and second.lowered == first.lowered and second.log == ""


# ---- host-side planning (no compiler needed) ---------------------------------------------------------

def test_sources_are_self_contained() -> None:
    for s in C.SOURCES:
        text = C.source(s)
        assert '#include "' not in text
        assert "namespace sc" in text  # common.cuh was inlined
    with pytest.raises(ValueError, match="not one of"):
        C.source("nope.cu")


def test_every_name_expression_names_a_template_in_its_source() -> None:
    for src, dtype in C.all_programs():
        text = C.source(src)
        for n in C.names_for(src, dtype):
            fn = n.split("<", 1)[0]
            assert re.search(rf"\b{fn}\(", text), f"{n} not defined in {src}"
    assert len(C.names_for("ffn.cu", "bfloat16")) == len(set(C.names_for("ffn.cu", "bfloat16")))


def test_cache_key_covers_source_options_arch_and_compiler() -> None:
    base = ("code", ("-a",), ["k<float>"], (9, 0), "nvrtc 13.0")
    k0 = C.cache_key(*base)
    assert len(k0) == 64 and k0 == C.cache_key(*base)
    variants = [("code2",) + base[1:], base[:1] + (("-b",),) + base[2:], base[:2] + (["k<__half>"],) + base[3:],
                base[:3] + ((8, 0),) + base[4:], base[:4] + ("nvrtc 13.1",)]
    assert len({C.cache_key(*v) for v in variants} | {k0}) == 6


def test_cache_dir_is_a_user_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("SPARSECORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert C.cache_dir() == tmp_path / "sparsecore" / "cubin"
    monkeypatch.setenv("SPARSECORE_CACHE_DIR", str(tmp_path / "x"))
    assert C.cache_dir() == tmp_path / "x"
    import sparsecore

    pkg = str(sparsecore.__file__).rsplit("/", 1)[0]
    monkeypatch.delenv("SPARSECORE_CACHE_DIR")
    assert not str(C.cache_dir()).startswith(pkg)


def test_cache_write_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSECORE_CACHE_DIR", str(tmp_path / "c"))
    assert C.cache_read("ab" * 32) is None
    C.cache_write("ab" * 32, b"blob")
    assert C.cache_read("ab" * 32) == b"blob"
    monkeypatch.setenv("SPARSECORE_CACHE_DIR", "/proc/not-writable")
    C.cache_write("cd" * 32, b"x")  # a cache that cannot be written is not an error


def test_variants() -> None:
    assert [C.vpl_for(d) for d in (1, 32, 33, 64, 128, 129, 256)] == [1, 1, 2, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="head_dim"):
        C.vpl_for(257)
    assert [C.gmax_for(g) for g in (1, 2, 4, 8)] == [1, 8, 8, 8]
    assert C.vec("float32") == 4 and C.vec("bfloat16") == 8 and C.vec("float16") == 8


@pytest.mark.parametrize("batch,hq,hkv,d,keys,per_head", [
    (1, 32, 8, 128, 131072, False), (16, 32, 8, 128, 32768, False), (16, 32, 8, 128, 655, True),
    (1, 32, 8, 128, 0, False), (3, 64, 4, 64, 1000, False), (2, 4, 4, 256, 17, False), (64, 32, 8, 128, 4096, False)])
def test_plan_decode(batch: int, hq: int, hkv: int, d: int, keys: int, per_head: bool) -> None:
    plan = C.plan_decode(batch, hq, hkv, d, keys, per_head, sm_count=132)
    group = hq // hkv
    assert plan.per_head == (per_head or group > C.MAX_GROUP)
    assert plan.rows == (hq if plan.per_head else hkv)
    assert plan.gmax >= (1 if plan.per_head else group)
    assert 32 * plan.vpl >= d
    assert 1 <= plan.splits <= 64
    assert plan.splits * plan.chunk >= max(keys, 1)  # every key is in a split
    assert (plan.splits - 1) * plan.chunk < max(keys, 1)  # and no split is empty for the longest row
    if keys >= 64 * 64 and batch * plan.rows < 132:
        assert plan.splits > 1  # long contexts are split to fill the GPU


def test_alignment_and_threshold() -> None:
    assert C.aligned([0, 256], [4096])
    assert not C.aligned([8], [4096]) and not C.aligned([16], [2 * 7])
    for thr in (0.0, 0.1, 1e-40, 3.0, 1e30):
        t = np.float32(C.thr32(thr))
        assert float(t) <= thr and float(np.nextafter(t, np.float32(np.inf))) > thr or float(t) == thr
    assert C.grid_1d(0, 256) == 1 and C.grid_1d(10**9, 256, 4096) == 4096


def test_launchers_register_and_explain() -> None:
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops.dispatcher import OPS, implementations

    for op in OPS:
        names = [c.NAME for c in implementations(op)]
        if not hasattr(_ops, op):  # no CUDA C kernels for this op (gated_pack): none registered
            assert "cupy" not in names and "cuda_python" not in names, op
            continue
        assert names[:2] == ["cupy", "cuda_python"]
        for c in implementations(op)[:2]:
            assert c.DEVICE == "cuda"
            assert isinstance(c.availability_reasons(), list)


def test_launchers_import_without_each_other() -> None:
    import ast
    from pathlib import Path

    root = Path(C.__file__).parent.parent
    for pkg, other in (("cupy", "cuda_python"), ("cuda_python", "cupy")):
        for f in (root / pkg).glob("*.py"):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert other not in node.module.split("."), f"{f} imports {node.module}"
    for f in (root / "cuda").glob("*.py"):
        text = f.read_text()
        assert not re.search(r"^(import|from) (cupy|cuda|torch|numba)\b", text, re.M), f"{f} imports a GPU library"


def test_host_inputs_are_refused_without_touching_the_gpu() -> None:
    import sparsecore as sc
    from sparsecore.ops.dispatcher import implementations
    from sparsecore.ops.inputs import PackInputs

    inp = PackInputs(np.zeros((2, 8), np.float32), tile=8)
    inp.validate()
    for c in implementations("pack")[:2]:
        reasons = c.not_supported_reasons(inp)
        assert reasons == ["runs on cuda arrays, the inputs are on host"]
    assert sc.pack(np.zeros((2, 8), np.float32), tile=8).shape == (2, 8)


def test_selections_without_cuda_kernels_are_refused_with_their_reason() -> None:
    """A pool of candidates (below the cache's capacity) has no CUDA C kernel yet: both launchers say
    so (on any inputs), instead of running the exact kernel, which ignores it; top_p over more than
    the shared-memory sort's 2048 units and int8 ranking (with or without rescore) are not refused."""
    import sparsecore as sc
    from sparsecore.ops.dispatcher import implementations
    from sparsecore.ops.inputs import SelectTopkInputs

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    kv = sc.DenseKV(rng.standard_normal((1, 12, 1, 8)).astype(np.float32),
                    rng.standard_normal((1, 12, 1, 8)).astype(np.float32), np.full(1, 12, np.int32))
    long_kv = sc.DenseKV(np.zeros((1, 2100, 1, 8), np.float32), np.zeros((1, 2100, 1, 8), np.float32),
                         np.full(1, 2100, np.int32))
    inp = SelectTopkInputs(q, long_kv, 2048, top_p=0.9, sink=1)
    inp.validate()
    for c in implementations("select_topk")[:2]:
        assert not any("top_p" in r for r in c.input_reasons(inp))
    cases = [
             (dict(candidates=6), "candidates = 6 below the cache's capacity 12 (a pool ranked by attention "
                                  "mass) is not implemented in {} yet; candidates >= the capacity ranks every key "
                                  "by its mass")]
    for opts, reason in cases:
        inp = SelectTopkInputs(q, kv, 3, **opts)
        inp.validate()
        for c in implementations("select_topk")[:2]:
            assert reason.format(c.NAME) in c.input_reasons(inp), (c.NAME, opts)
    codes = sc.quantize_keys(kv)
    for every in (SelectTopkInputs(q, kv, 3), SelectTopkInputs(q, kv, 3, candidates=12),
                  SelectTopkInputs(q, kv, 3, candidates=40), SelectTopkInputs(q, kv, 3, top_p=0.9),
                  SelectTopkInputs(q, kv, 3, method="int8", codes=codes),
                  SelectTopkInputs(q, kv, 3, method="int8", codes=codes, candidates=12),
                  SelectTopkInputs(q, kv, 3, method="int8", codes=codes, top_p=0.9),
                  SelectTopkInputs(q, kv, 3, method="int8", codes=codes, rescore=6)):  # kernels
        every.validate()
        for c in implementations("select_topk")[:2]:
            assert not any(w in r for w in ("candidates", "top_p", "int8", "rescore")
                           for r in c.input_reasons(every)), c.NAME
    plain = SelectTopkInputs(q, kv, 3)
    plain.validate()
    for c in implementations("select_topk")[:2]:  # host arrays: only that
        reasons = c.input_reasons(plain)
        assert len(reasons) == 1 and reasons[0].startswith("takes ") and "the inputs are numpy" in reasons[0], reasons


# ---- launch arguments against the kernels' C signatures (no GPU: a recording runtime) ---------------

_KV_PARAMS = ("const void *kv_k, const void *kv_v, const int *kv_page_table, const int *kv_lengths, int kv_paged, "
              "int kv_S, int kv_page_size, int kv_max_pages, int kv_Hkv, int kv_D")


@functools.cache
def _signatures() -> dict[str, list[str]]:
    """{kernel: ['ptr' | 'int' | 'i64' | 'float', ...]} parsed from the sources."""
    out: dict[str, list[str]] = {}
    for src in C.SOURCES:
        text = C.source(src)
        for m in re.finditer(r"__global__ void (?:SC_BOUNDS\(\w+\) )?(\w+)\(([^)]*)\)", text):
            params = m.group(2).replace("SC_KV_PARAMS", _KV_PARAMS)
            kinds = []
            for prm in (x.strip() for x in params.split(",")):
                if "*" in prm:
                    kinds.append("ptr")
                elif re.match(r"(const )?(i64|long long) ", prm):
                    kinds.append("i64")
                elif re.match(r"(const )?int ", prm):
                    kinds.append("int")
                elif re.match(r"(const )?float ", prm):
                    kinds.append("float")
                else:
                    raise AssertionError(f"unparsed parameter {prm!r} of {m.group(1)}")
            out[m.group(1)] = kinds
    return out


class RecordingRuntime(CpuRuntime):
    """The emulator's Runtime over host NumPy buffers, recording every launch instead of running it
    (so it needs no compiler)."""

    sm_count = 132

    def __init__(self) -> None:
        self.launches: list[tuple[str, str, str, tuple[int, int, int], int, list[Any]]] = []

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        a = super().empty(shape, dtype)
        a.fill(0)  # nothing runs, so nothing would overwrite the 0xA5 fill
        return a

    def launch(self, src: str, dtype: str, name: str, grid: tuple[int, int, int], block: int, args: list[Any]) -> None:
        self.launches.append((src, dtype, name, grid, block, list(args)))

    def read_int(self, x: Any, i: int) -> int:
        return 3  # pretend three entries overflowed: exercises the overflow launch


_KIND = {np.uint64: "ptr", np.int32: "int", np.int64: "i64", np.float32: "float"}


def _check_launches(rt: RecordingRuntime) -> list[str]:
    sigs = _signatures()
    seen = []
    for src, dtype, name, grid, block, args in rt.launches:
        assert name in C.names_for(src, dtype), f"{name} is not instantiated in {src} for {dtype}"
        fn = name.split("<", 1)[0]
        want = sigs[fn]
        got = [_KIND[type(a)] for a in args]
        assert got == want, f"{name}: launched with {got}, the kernel takes {want}"
        assert all(1 <= g for g in grid) and grid[1] <= 65535 and grid[2] <= 65535, (name, grid)
        assert block in (C.NT_PACK, C.NT_SCAN, C.NT_FFN, C.NT_ATTN, C.NT_SELECT, 256), (name, block)
        seen.append(fn)
    return seen



@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_launch_matches_its_kernel_signature(dtype: str) -> None:
    import dataclasses

    from sparsecore import reference as ref
    from sparsecore._arrays import BFLOAT16
    from sparsecore.backends.cuda import _ops
    from sparsecore.formats.codes import quantize_keys as ref_codes
    from sparsecore.formats.convert import csr_from_dense, tiled_ell_from_dense
    from sparsecore.formats.kv import DenseKV, PagedKV
    from sparsecore.ops import inputs as I

    npdt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 40)) * (rng.random((5, 40)) < 0.3)).astype(npdt)
    x[0] = 1.0
    rt = RecordingRuntime()
    ell = tiled_ell_from_dense(x, tile=16, capacity=2)
    csr = csr_from_dense(x)
    csr64 = dataclasses.replace(csr, indptr=csr.indptr.astype(np.int64), indices=csr.indices.astype(np.int64))
    w = rng.standard_normal((40, 24)).astype(npdt)
    xx = rng.standard_normal((5, 12)).astype(npdt)
    wu = rng.standard_normal((40, 12)).astype(npdt)
    _ops.pack(rt, I.PackInputs(x, 0.1, "relu", 16, 2))
    _ops.unpack(rt, I.UnpackInputs(ell))
    for a in (ell, csr, csr64):
        _ops.spmm(rt, I.SpmmInputs(a, w))
        _ops.sddmm(rt, I.SddmmInputs(xx, wu, a))
        _ops.spmm_t(rt, I.SpmmTInputs(a, rng.standard_normal((5, 24)).astype(npdt)))
        _ops.gated_ffn(rt, I.GatedFfnInputs(xx, a, wu, w))
    k = rng.standard_normal((2, 50, 2, 64)).astype(npdt)
    dense = DenseKV(k, k.copy(), np.array([50, 7], np.int32))
    table = np.arange(8, dtype=np.int32).reshape(2, 4)
    pages = rng.standard_normal((8, 16, 2, 64)).astype(npdt)
    paged = PagedKV(pages, pages.copy(), table, np.array([50, 7], np.int32))
    for kv in (dense, paged):
        fresh = _ops.page_bounds(rt, I.PageBoundsInputs(kv, 16))
        _ops.page_bounds(rt, I.PageBoundsInputs(kv, None, fresh, np.array([3, 0], np.int32)))
    bounds = ref.page_bounds(dense, 16)
    for hq in (4, 32):
        q = rng.standard_normal((2, hq, 64)).astype(npdt)
        for kv in (dense, paged):
            for shared in (True, False):
                for method in ("exact", "quest"):
                    _ops.select_topk(rt, I.SelectTopkInputs(q, kv, 5, method, 2, 4, shared))
                _ops.select_topk(rt, I.SelectTopkInputs(q, kv, 5, "quest", 2, 4, shared, None, bounds))
                _ops.select_topk(rt, I.SelectTopkInputs(q, kv, 5, "exact", 2, 4, shared, candidates=10**6))
                _ops.select_topk(rt, I.SelectTopkInputs(q, kv, 5, "exact", 2, 4, shared, top_p=0.9, k_min=1))
                codes = ref_codes(kv)
                for extra in ({}, dict(candidates=10**6), dict(top_p=0.9, k_min=1), dict(rescore=9)):
                    _ops.select_topk(rt, I.SelectTopkInputs(q, kv, 5, "int8", 2, 4, shared, codes=codes, **extra))
                index = ref.select_topk(q, kv, 5, sink=2, window=4, shared=shared)
                _ops.sparse_decode(rt, I.SparseDecodeInputs(q, kv, index))
            _ops.dense_decode(rt, I.DenseDecodeInputs(q, kv))
    long = DenseKV(np.zeros((1, 5000, 1, 32), npdt), np.zeros((1, 5000, 1, 32), npdt), np.array([4999], np.int32))
    _ops.dense_decode(rt, I.DenseDecodeInputs(np.zeros((1, 2, 32), npdt), long))  # split-K: the merge kernel
    o = rng.standard_normal((3, 4, 64)).astype(npdt)
    lse = rng.standard_normal((3, 4)).astype(np.float32)
    _ops.merge_attention(rt, I.MergeAttentionInputs(o, lse, o, lse))
    _ops.merge_attention(rt, I.MergeAttentionInputs(o, lse.astype(np.float64), o, lse.astype(np.float64)))
    seen = set(_check_launches(rt))
    every = {n.split("<", 1)[0] for s in C.SOURCES for n in C.names_for(s, dtype)}
    if dtype == "float32":
        every.discard("cast_from_f32")  # spmm_t accumulates straight into a float32 output
    assert every <= seen, f"kernels never launched: {sorted(every - seen)}"


# ---- the kernels themselves, run on the CPU (tests/cuda_emulate.py) --------------------
# One std::thread per CUDA thread, real barriers and warp exchanges: the kernels' logic against the
# reference on tiny shapes. Not a substitute for the GPU tier (no memory model, no alignment faults).

EMU_DTYPES = ("float32", "float16", "bfloat16")
EMU_TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


@functools.cache
def _emu() -> Any:
    from tests import cuda_emulate as _emulate

    if _emulate.compiler() is None:
        return None
    return _emulate


def _needs_emu() -> Any:
    emu = _emu()
    if emu is None:
        pytest.skip("no C++20 compiler (g++) to run the CUDA C kernels on the CPU")
    return emu


def _np(dtype: str) -> np.dtype:
    from sparsecore._arrays import BFLOAT16

    return BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)


def _close(a: Any, e: Any, tol: float, what: str) -> None:
    a = np.asarray(a).astype(np.float64)
    e = np.asarray(e).astype(np.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    with np.errstate(invalid="ignore"):
        same = (a == e) | (np.isnan(a) & np.isnan(e))
        bad = ~same & ~(np.abs(a - e) <= tol * (1 + np.abs(e)))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.size} off; first at {i}: {a[i]} vs {e[i]}")


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_pack_unpack(dtype: str) -> None:
    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(0)
    x = (rng.uniform(0.5, 2, (5, 130)) * rng.choice([-1, 1], (5, 130)) * (rng.random((5, 130)) < 0.15))
    x = x.astype(_np(dtype))
    x[0, :40] = 1.5  # full tiles: the overflow CSR
    x[2] = 0  # an empty row
    x[3, 5] = np.nan  # kept
    for act in (None, "relu"):
        inp = I.PackInputs(x, 0.6, act, 32, 3)
        inp.validate()
        got = _ops.pack(rt, inp)
        want = ref.pack(x, threshold=0.6, activation=act, tile=32, capacity=3)
        np.testing.assert_array_equal(got.counts, want.counts)
        np.testing.assert_array_equal(got.cols, want.cols)
        _close(got.values, want.values, 0.0, "values")
        assert want.overflow is not None and got.overflow is not None
        np.testing.assert_array_equal(got.overflow.indptr, want.overflow.indptr)
        np.testing.assert_array_equal(got.overflow.indices, want.overflow.indices)
        _close(got.overflow.data, want.overflow.data, 0.0, "overflow.data")
        got.validate()
        _close(_ops.unpack(rt, I.UnpackInputs(got)), ref.unpack(want), 0.0, "unpack")
    got = _ops.pack(rt, I.PackInputs(x[:, :20], 0.0, None, 32, 32))  # capacity == tile: no overflow, no read
    assert got.overflow is None
    if dtype == "float32":  # more tiles than the scan block's 1024 threads: the scan's carry across chunks
        big = np.where(rng.random((9, 1200)) < 0.3, 1.0, 0.0).astype(np.float32)
        got = _ops.pack(rt, I.PackInputs(big, 0.0, None, 8, 1))
        want = ref.pack(big, tile=8, capacity=1)
        np.testing.assert_array_equal(got.overflow.indptr, want.overflow.indptr)
        np.testing.assert_array_equal(got.overflow.indices, want.overflow.indices)
        np.testing.assert_array_equal(got.counts, want.counts)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_spmm_sddmm_spmm_t_gated(dtype: str) -> None:
    import dataclasses

    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.formats.convert import csr_from_dense, tiled_ell_from_dense
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    tol = EMU_TOL[dtype]
    npdt = _np(dtype)
    rng = np.random.default_rng(1)
    x = (rng.uniform(0.5, 2, (5, 70)) * rng.choice([-1, 1], (5, 70)) * (rng.random((5, 70)) < 0.2)).astype(npdt)
    x[0, :20] = 1.25
    x[2] = 0
    ell = tiled_ell_from_dense(x, tile=16, capacity=3)
    csr = csr_from_dense(x)
    csr64 = dataclasses.replace(csr, indptr=csr.indptr.astype(np.int64), indices=csr.indices.astype(np.int64))
    for name, a in (("ell", ell), ("csr", csr), ("csr64", csr64)):
        n = 37 if name != "csr" else 64  # a ragged width (scalar tail) and an aligned one (vector loads)
        w = rng.standard_normal((70, n)).astype(npdt)
        _close(_ops.spmm(rt, I.SpmmInputs(a, w)), ref.spmm(a, w), tol, f"spmm {name}")
        dy = rng.standard_normal((5, n)).astype(npdt)
        _close(_ops.spmm_t(rt, I.SpmmTInputs(a, dy)), ref.spmm_t(a, dy), tol, f"spmm_t {name}")
        d = 13 if name != "csr" else 32
        xx = rng.standard_normal((5, d)).astype(npdt)
        wu = rng.standard_normal((70, d)).astype(npdt)
        got, want = _ops.sddmm(rt, I.SddmmInputs(xx, wu, a)), ref.sddmm(xx, wu, a)
        if name == "ell":
            _close(got.values, want.values, tol, "sddmm ell")
            _close(got.overflow.data, want.overflow.data, tol, "sddmm overflow")
        else:
            _close(got.data, want.data, tol, f"sddmm {name}")
        wd = rng.standard_normal((70, 45)).astype(npdt)
        _close(_ops.gated_ffn(rt, I.GatedFfnInputs(xx, a, wu, wd)), ref.gated_ffn(xx, a, wu, wd), 3 * tol,
               f"gated_ffn {name}")


def _kv_cache(rng: np.random.Generator, npdt: np.dtype, lengths: list[int], s: int, hkv: int, d: int,
              paged: bool, ps: int = 16) -> Any:
    from sparsecore.formats.kv import DenseKV, PagedKV

    b = len(lengths)
    k = rng.standard_normal((b, s, hkv, d)).astype(npdt)
    v = rng.standard_normal((b, s, hkv, d)).astype(npdt)
    for i, n in enumerate(lengths):  # NaN past the length: an out-of-range read shows
        k[i, n:] = np.nan
        v[i, n:] = np.nan
    if not paged:
        return DenseKV(k, v, np.asarray(lengths, np.int32))
    mp = -(-s // ps)
    perm = rng.permutation(b * mp + 1)
    kp = np.full((b * mp + 1, ps, hkv, d), np.nan, npdt)
    vp = kp.copy()
    table = np.full((b, mp), -1, np.int32)
    for i, n in enumerate(lengths):
        for j in range(-(-n // ps)):
            p, rows = perm[i * mp + j], min(ps, n - j * ps)
            table[i, j] = p
            kp[p, :rows] = k[i, j * ps:j * ps + rows]
            vp[p, :rows] = v[i, j * ps:j * ps + rows]
    return PagedKV(kp, vp, table, np.asarray(lengths, np.int32))


@pytest.mark.parametrize("dtype,hq,hkv,d", [("float32", 8, 2, 64), ("bfloat16", 4, 4, 40), ("float16", 16, 1, 16)],
                         ids=["f32-gqa4-d64", "bf16-mha-d40", "f16-group16-d16"])
def test_emulated_topk_and_decode(dtype: str, hq: int, hkv: int, d: int) -> None:
    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    tol = EMU_TOL[dtype]
    rng = np.random.default_rng(2)
    paged = dtype != "float32"
    kv = _kv_cache(rng, _np(dtype), [150, 1, 0, 37], 160, hkv, d, paged)
    q = rng.standard_normal((4, hq, d)).astype(_np(dtype))
    o, lse = _ops.dense_decode(rt, I.DenseDecodeInputs(q, kv, 0.2))
    wo, wl = ref.dense_decode(q, kv, scale=0.2)
    _close(o, wo, tol, "dense_decode")
    _close(lse, wl, 1e-5, "dense_decode lse")
    for shared in (True, False):
        for method, k in (("exact", 12), ("quest", 2), ("exact", 0)):
            inp = I.SelectTopkInputs(q, kv, k, method, 3, 8, shared)
            inp.validate()
            got = _ops.select_topk(rt, inp)
            want = ref.select_topk(q, kv, k, method=method, sink=3, window=8, shared=shared)
            check_topk_against_reference(got, want, q, kv, shared=shared, sink=3, window=8, rel_tol=1e-2)
            o, lse = _ops.sparse_decode(rt, I.SparseDecodeInputs(q, kv, want))
            wo, wl = ref.sparse_decode(q, kv, want)
            _close(o, wo, tol, f"sparse_decode {method} shared={shared}")
            _close(lse, wl, 1e-5, f"sparse_decode lse {method} shared={shared}")
    assert np.isneginf(lse[2]).all() and not o.astype(np.float64)[2].any()  # length 0: out 0, lse -inf


@pytest.mark.parametrize("dtype,hq,hkv,d", [("float32", 9, 3, 64), ("bfloat16", 4, 4, 40), ("float16", 8, 1, 16)],
                         ids=["f32-gqa3-d64", "bf16-mha-d40", "f16-group8-d16"])
def test_emulated_mass_ranking_of_every_key(dtype: str, hq: int, hkv: int, d: int) -> None:
    """select_topk(candidates=c), c covering every key: each head's scores, each key's mass
    (mass_of_every_key), the k of highest mass (topk_select), against the reference's masses."""
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(5)
    kv = _kv_cache(rng, _np(dtype), [150, 1, 0, 37], 160, hkv, d, dtype != "float32")
    q = (3 * rng.standard_normal((4, hq, d))).astype(_np(dtype))  # peaked softmaxes: masses far apart
    for shared in (True, False):
        for k, sink, window, c, scale in ((12, 3, 8, 160, None), (5, 0, 0, 10**6, 0.4), (0, 2, 2, 200, None)):
            inp = I.SelectTopkInputs(q, kv, k, "exact", sink, window, shared, scale=scale, candidates=max(c, k))
            inp.validate()
            assert not any("candidates" in r for r in _reasons(inp))
            got = _ops.select_topk(rt, inp)
            check_mass_ranking_against_reference(got, q, kv, k, sink=sink, window=window, shared=shared,
                                                 scale=scale, rel_tol=1e-5)
    pool = I.SelectTopkInputs(q, kv, 5, candidates=40)
    pool.validate()
    assert any("candidates = 40 below the cache's capacity 160" in r for r in _reasons(pool))


@pytest.mark.parametrize("dtype,hq,hkv,d", [("float32", 9, 3, 64), ("bfloat16", 4, 4, 40), ("float16", 8, 1, 16)],
                         ids=["f32-gqa3-d64", "bf16-mha-d40", "f16-group8-d16"])
def test_emulated_adaptive_budget(dtype: str, hq: int, hkv: int, d: int) -> None:
    """select_topk(top_p=...): every key's mass, the k of highest mass, top_p_cut keeps as few as
    cover top_p (at least k_min), against the meaning of the reference's top_p_count."""
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(6)
    kv = _kv_cache(rng, _np(dtype), [150, 1, 0, 37], 160, hkv, d, dtype != "float32")
    q = (3 * rng.standard_normal((4, hq, d))).astype(_np(dtype))
    for shared in (True, False):
        for k, k_min, top_p, sink, window, scale in ((40, 2, 0.9, 3, 8, None), (160, 0, 0.5, 0, 0, 0.4),
                                                     (12, 12, 0.99, 1, 1, None), (30, 0, 1.0, 0, 4, None)):
            inp = I.SelectTopkInputs(q, kv, k, "exact", sink, window, shared, top_p=top_p, k_min=k_min, scale=scale)
            inp.validate()
            assert not any("top_p" in r for r in _reasons(inp))
            got = _ops.select_topk(rt, inp)
            check_adaptive_against_reference(got, q, kv, k, top_p=top_p, k_min=k_min, sink=sink, window=window,
                                             shared=shared, scale=scale)


@pytest.mark.parametrize("dtype,hq,hkv,d,paged", [("float32", 9, 3, 64, False), ("bfloat16", 4, 2, 40, True)],
                         ids=["f32-gqa3-d64", "bf16-gqa2-d40-paged"])
def test_emulated_int8_ranking(dtype: str, hq: int, hkv: int, d: int, paged: bool) -> None:
    """select_topk(method="int8") over KeyCodes (topk_scores_int8): the plain top-k, the mass ranking of
    every key and the adaptive budget, each held to the reference on the keys the codes stand for;
    a key with a NaN component (scale NaN) is never freely chosen."""
    import sparsecore as sc
    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(11)
    kv = _kv_cache(rng, _np(dtype), [60, 1, 0, 37], 64, hkv, d, paged)
    codes = sc.quantize_keys(kv)
    deq = dequantized_kv(kv, codes)
    q = (3 * rng.standard_normal((4, hq, d))).astype(_np(dtype))
    for shared in (True, False):
        inp = I.SelectTopkInputs(q, kv, 12, "int8", 3, 8, shared, codes=codes)
        inp.validate()
        got = _ops.select_topk(rt, inp)
        want = ref.select_topk(q, kv, 12, method="int8", codes=codes, sink=3, window=8, shared=shared)
        check_topk_against_reference(got, want, q, deq, shared=shared, sink=3, window=8, rel_tol=1e-2)
        inp = I.SelectTopkInputs(q, kv, 12, "int8", 3, 8, shared, codes=codes, rescore=30)
        inp.validate()
        want = ref.select_topk(q, kv, 12, method="int8", codes=codes, sink=3, window=8, shared=shared, rescore=30)
        check_rescore_against_reference(_ops.select_topk(rt, inp), want, q, kv, shared=shared, sink=3, window=8,
                                        rel_tol=1e-4)
        # every score negative: the units outside the pool must still lose to the pool's worst
        neg_q = -np.abs(q.astype(np.float32)).astype(q.dtype)
        pos = dequantized_kv(kv, codes)
        pos = type(pos)(np.abs(pos.k).astype(_np(dtype)), np.abs(pos.v).astype(_np(dtype)), pos.lengths)
        pc = sc.quantize_keys(pos)
        inp = I.SelectTopkInputs(neg_q, pos, 8, "int8", 0, 0, shared, codes=pc, rescore=20)
        inp.validate()
        want = ref.select_topk(neg_q, pos, 8, method="int8", codes=pc, shared=shared, rescore=20)
        check_rescore_against_reference(_ops.select_topk(rt, inp), want, neg_q, pos, shared=shared, sink=0, window=0,
                                        rel_tol=1e-4)
        inp = I.SelectTopkInputs(q, kv, 12, "int8", 0, 4, shared, codes=codes, candidates=10**6, scale=0.4)
        inp.validate()
        check_mass_ranking_against_reference(_ops.select_topk(rt, inp), q, deq, 12, sink=0, window=4, shared=shared,
                                             scale=0.4, rel_tol=1e-5)
        inp = I.SelectTopkInputs(q, kv, 20, "int8", 3, 8, shared, codes=codes, top_p=0.9, k_min=2)
        inp.validate()
        check_adaptive_against_reference(_ops.select_topk(rt, inp), q, deq, 20, top_p=0.9, k_min=2, sink=3,
                                         window=8, shared=shared, scale=None)
    # a key with a NaN component (its scale NaN) inside a sequence is never freely chosen, whatever
    # its codes (0): by the plain ranking nor by mass
    k = deq.k.astype(_np(dtype))
    k[0, 30, 0, 3] = np.nan
    poisoned = type(deq)(k, k, np.asarray(kv.lengths))
    pc = sc.quantize_keys(poisoned)
    assert np.isnan(pc.scales[0, 30, 0])
    for opts in (dict(), dict(candidates=10**6), dict(top_p=0.99)):
        inp = I.SelectTopkInputs(q, poisoned, 59, "int8", 0, 0, True, codes=pc, **opts)
        inp.validate()
        got = _ops.select_topk(rt, inp)
        want = ref.select_topk(q, poisoned, 59, method="int8", codes=pc, **opts)
        np.testing.assert_array_equal(np.asarray(got.counts), want.counts)
        assert 30 not in np.asarray(got.indices)[0, 0].tolist(), opts


@pytest.mark.parametrize("method", ["exact", "quest", "quest_stored", "int8", "quest_zero_query"])
def test_emulated_plain_selection_ranks_nan_below_minus_inf(method: str) -> None:
    """A key with a NaN component scores NaN and ranks below every other score, -inf included (the
    reference's argsort of -score puts NaN last): the same keys as the reference at every k. Quest's
    page bounds computed on the fly once dropped the NaN (fminf/fmaxf), unlike stored page_bounds."""
    import sparsecore as sc
    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.formats.kv import DenseKV
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 8, 1, 4)).astype(np.float32)
    k[0, 2, 0, 1] = np.nan
    k[0, 5, 0, :] = -np.inf
    kv = DenseKV(k, k, np.array([8], np.int32))
    q = (np.abs(rng.standard_normal((1, 2, 4))) + 0.1).astype(np.float32)  # the -inf key scores -inf
    if method == "quest_zero_query":  # 0 * -inf in a bound is NaN (np.maximum keeps it): page 3 ranks last
        q[:, :, 3] = 0.0
        k[0, 6, 0, 3] = -np.inf
    opts = {"int8": dict(method="int8", codes=sc.quantize_keys(kv)), "exact": dict(method="exact"),
            "quest": dict(method="quest", page_size=1), "quest_zero_query": dict(method="quest", page_size=2),
            "quest_stored": dict(method="quest", page_size=1, bounds=ref.page_bounds(kv, 1))}[method]
    for kk in range(1, 8 if method != "quest_zero_query" else 4):
        for shared in (True, False):
            inp = I.SelectTopkInputs(q, kv, kk, shared=shared, **opts)
            inp.validate()
            got = _ops.select_topk(rt, inp)
            want = ref.select_topk(q, kv, kk, shared=shared, **opts)
            np.testing.assert_array_equal(np.asarray(got.indices), want.indices, err_msg=f"k={kk} shared={shared}")


def test_emulated_adaptive_budget_past_the_shared_sort() -> None:
    """top_p rows past the 2048 units of top_p_cut's shared-memory sort (k = 2100, k + sink + window
    = 2120; k_min 2050): their sort runs in the global workspace, against the meaning of the
    reference's top_p_count."""
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(8)
    kv = _kv_cache(rng, np.float32, [2300, 2150], 2300, 1, 16, False)
    q = (2 * rng.standard_normal((2, 3, 16))).astype(np.float32)
    for k, k_min, top_p, sink, window in ((2100, 0, 0.999, 4, 16), (2100, 2050, 0.5, 0, 0)):
        inp = I.SelectTopkInputs(q, kv, k, "exact", sink, window, True, top_p=top_p, k_min=k_min)
        inp.validate()
        assert inp.k_max > _ops.CUT_SHARED and not any("top_p" in r for r in _reasons(inp))
        got = _ops.select_topk(rt, inp)
        check_adaptive_against_reference(got, q, kv, k, top_p=top_p, k_min=k_min, sink=sink, window=window,
                                         shared=True, scale=None)


@pytest.mark.parametrize("dtype,hq,hkv,d", [("float32", 6, 2, 16), ("bfloat16", 2, 2, 8)], ids=["f32-gqa3", "bf16-mha"])
def test_emulated_adaptive_budget_sorts_in_global_memory(dtype: str, hq: int, hkv: int, d: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """top_p_cut with its workspace in global memory on small rows (the shared sort's limit lowered
    to 8 units), against the meaning of the reference's top_p_count."""
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(9)
    monkeypatch.setattr(_ops, "CUT_SHARED", 8)
    kv = _kv_cache(rng, _np(dtype), [150, 1, 0, 37], 160, hkv, d, dtype != "float32")
    q = (3 * rng.standard_normal((4, hq, d))).astype(_np(dtype))
    for shared in (True, False):
        for k, k_min, top_p, sink, window in ((40, 2, 0.9, 3, 8), (160, 0, 0.5, 0, 0), (5, 5, 0.99, 1, 1),
                                              (30, 0, 1.0, 0, 4)):
            inp = I.SelectTopkInputs(q, kv, k, "exact", sink, window, shared, top_p=top_p, k_min=k_min)
            inp.validate()
            got = _ops.select_topk(rt, inp)
            check_adaptive_against_reference(got, q, kv, k, top_p=top_p, k_min=k_min, sink=sink, window=window,
                                             shared=shared, scale=None)


def _reasons(inp: Any) -> list[str]:
    from sparsecore.ops.dispatcher import implementations

    return [r for c in implementations("select_topk")[:2] for r in c.input_reasons(inp)]


def _same_bits(got: Any, want: Any, what: str) -> None:
    """Bit-for-bit equality (NaN payloads aside): page bounds are min/max of stored values."""
    g, w = np.asarray(got), np.asarray(want)
    assert g.dtype == w.dtype and g.shape == w.shape, (what, g.dtype, w.dtype, g.shape, w.shape)
    nan = np.isnan(g.astype(np.float64)) & np.isnan(w.astype(np.float64))
    n = g.dtype.itemsize
    bits = np.ascontiguousarray(g).view(np.uint8).reshape(g.shape + (n,)) == \
        np.ascontiguousarray(w).view(np.uint8).reshape(w.shape + (n,))
    bad = ~(bits.all(axis=-1) | nan)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {g.size} differ; first at {i}: {g[i]} vs {w[i]}")


@pytest.mark.parametrize("dtype,paged", [("float32", False), ("float16", True), ("bfloat16", False),
                                         ("bfloat16", True)])
def test_emulated_page_bounds(dtype: str, paged: bool) -> None:
    """Fresh bounds equal the reference bit for bit (pages past a length 0; the kernel zero-fills the
    0xA5-poisoned buffer itself); an update with ``out`` and ``start`` after the lengths grew equals
    a fresh computation and leaves the pages before ``start // ps`` alone. Logical page sizes that
    differ from the PagedKV's (16): 16, 5, 40."""
    import dataclasses

    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.formats.kv import PageBounds
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(4)
    final = [150, 1, 0, 37]
    kv = _kv_cache(rng, _np(dtype), final, 160, 2, 24, paged)
    if not paged and dtype == "float32":
        kv.k[0, 20, 1, 3] = np.nan  # a NaN key: that page's bounds are NaN, as in NumPy
    short = dataclasses.replace(kv, lengths=np.array([131, 0, 0, 32], np.int32))
    for ps in (16, 5, 40):
        inp = I.PageBoundsInputs(kv, ps)
        inp.validate()
        got = _ops.page_bounds(rt, inp)
        want = ref.page_bounds(kv, ps)
        assert got.page_size == ps and got.kmin.shape == want.kmin.shape == (4, -(-160 // ps), 2, 24)
        _same_bits(got.kmin, want.kmin, f"kmin ps={ps}")
        _same_bits(got.kmax, want.kmax, f"kmax ps={ps}")
        for b, n in enumerate(final):
            assert not got.kmin[b, -(-n // ps):].astype(np.float64).any()  # past the length: 0
        # the cache grew from `short` to `kv`: update in place from the old lengths
        out = _ops.page_bounds(rt, I.PageBoundsInputs(short, ps))
        _same_bits(out.kmin, ref.page_bounds(short, ps).kmin, f"short kmin ps={ps}")
        start = short.lengths.copy()
        first = start // ps
        for b in range(4):  # poison the pages that must not be touched
            out.kmin[b, :first[b]] = np.asarray(7, out.kmin.dtype)
        upd = I.PageBoundsInputs(kv, None, out, start)
        upd.validate()
        upd.validate_data()
        res = _ops.page_bounds(rt, upd)
        assert res is out
        for b in range(4):
            assert (out.kmin[b, :first[b]].astype(np.float64) == 7).all()
            _same_bits(out.kmin[b, first[b]:], want.kmin[b, first[b]:], f"updated kmin ps={ps} b={b}")
        _same_bits(out.kmax, want.kmax, f"updated kmax ps={ps}")
        # out with spare pages (its own pitch), no start: every valid page written, the rest untouched
        n = want.kmin.shape[1]
        wide = PageBounds(*(np.full((4, n + 2, 2, 24), 3, want.kmin.dtype) for _ in range(2)), ps)
        assert _ops.page_bounds(rt, I.PageBoundsInputs(kv, ps, wide)) is wide
        for b, ln in enumerate(final):
            m = -(-ln // ps)
            _same_bits(wide.kmin[b, :m], want.kmin[b, :m], f"wide kmin ps={ps} b={b}")
            _same_bits(wide.kmax[b, :m], want.kmax[b, :m], f"wide kmax ps={ps} b={b}")
            assert (wide.kmin[b, m:].astype(np.float64) == 3).all()


@pytest.mark.parametrize("dtype,hq,hkv,d,paged", [("float32", 8, 2, 64, False), ("bfloat16", 4, 4, 40, True),
                                                  ("float16", 6, 2, 16, True)])
def test_emulated_select_topk_with_bounds(dtype: str, hq: int, hkv: int, d: int, paged: bool) -> None:
    """Quest with stored bounds selects exactly what Quest from the keys does, and agrees with the
    reference; the bounds may hold more pages than the cache needs."""
    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.formats.kv import PageBounds
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(5)
    kv = _kv_cache(rng, _np(dtype), [150, 1, 0, 37], 160, hkv, d, paged)
    q = rng.standard_normal((4, hq, d)).astype(_np(dtype))
    for ps, shared in ((16, True), (7, False)):
        bounds = _ops.page_bounds(rt, I.PageBoundsInputs(kv, ps))
        pad = [(0, 0), (0, 3), (0, 0), (0, 0)]  # more pages than needed: the kernel uses bounds' pitch
        wide = PageBounds(np.pad(bounds.kmin, pad), np.pad(bounds.kmax, pad), ps)
        base = _ops.select_topk(rt, I.SelectTopkInputs(q, kv, 3, "quest", 3, 8, shared, ps))
        for bnd in (bounds, wide) if ps == 7 else (bounds,):
            inp = I.SelectTopkInputs(q, kv, 3, "quest", 3, 8, shared, None, bnd)
            inp.validate()
            got = _ops.select_topk(rt, inp)
            np.testing.assert_array_equal(got.indices, base.indices)
            np.testing.assert_array_equal(got.counts, base.counts)
            assert got.page_size == ps and got.granularity == "page"
        want = ref.select_topk(q, kv, 3, method="quest", sink=3, window=8, shared=shared, bounds=bounds)
        check_topk_against_reference(got, want, q, kv, shared=shared, sink=3, window=8, rel_tol=1e-2)
        # the scores really come from the bounds: a page with wide bounds wins every row of its sequence
        hot = PageBounds(bounds.kmin.copy(), bounds.kmax.copy(), ps)
        hot.kmin[0, 2], hot.kmax[0, 2] = -100, 100
        got = _ops.select_topk(rt, I.SelectTopkInputs(q, kv, 3, "quest", 3, 8, shared, None, hot))
        rows = [set(got.indices[0, g, :got.counts[0, g]].tolist()) for g in range(got.indices.shape[1])]
        base_rows = [set(base.indices[0, g, :base.counts[0, g]].tolist()) for g in range(got.indices.shape[1])]
        assert all(2 in r for r in rows) and not all(2 in r for r in base_rows)


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_merge_attention(dtype: str) -> None:
    from sparsecore import reference as ref
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    rng = np.random.default_rng(3)
    o1, o2 = (rng.standard_normal((3, 5, 8)).astype(_np(dtype)) for _ in range(2))
    l1, l2 = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2))
    l1[0, 0] = -np.inf
    l1[1, 1] = l2[1, 1] = -np.inf  # both empty: out 0, lse -inf
    for lse_dt in (np.float32, np.float64):
        mo, ml = _ops.merge_attention(rt, I.MergeAttentionInputs(o1, l1.astype(lse_dt), o2, l2.astype(lse_dt)))
        ro, rl = ref.merge_attention(o1, l1, o2, l2)
        _close(mo, ro, EMU_TOL[dtype], "merge_attention")
        _close(ml, rl, 1e-6, "merge_attention lse")


# ---- the non-finite contract (docs/ops.md) on the CUDA C kernels, emulated --------------------------

@pytest.mark.parametrize("poison", ["nan-key", "nan-query", "neg-inf-key", "all-neg-inf", "all-neg-inf-nan-value",
                                    "neg-inf-key-nan-value", "pos-inf-key", "inf-value", "mixed"])
def test_emulated_decode_follows_the_nonfinite_contract(poison: str) -> None:
    """NaN and infinities in q, K and V: dense and sparse decode (shared and per-head, token and page
    indices) equal tests/nonfinite.py's float64 oracle, NaN for NaN; the 200-token cases run in 4
    splits, so the split merge must keep a NaN split and an empty one's 0 * NaN."""
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I
    from tests._util import assert_close
    from tests.nonfinite import decode_case, indices_for, oracle_decode

    emu = _needs_emu()
    rt = emu.CpuRuntime()
    long = poison in ("nan-key", "neg-inf-key-nan-value", "pos-inf-key")
    dtype = "float16" if poison == "mixed" else "float32"
    q, kv = decode_case(poison, dtype, paged=poison in ("nan-query", "inf-value"), long=long, long_len=200)
    lse_dt = "float32" if dtype == "float32" else dtype
    o, lse = _ops.dense_decode(rt, I.DenseDecodeInputs(q, kv, None))
    wo, wl = oracle_decode(q, kv, None, None)
    assert_close(o, wo, dtype, what=f"{poison} dense_decode out")
    assert_close(lse, wl, lse_dt, what=f"{poison} dense_decode lse")
    for groups, ps in ((kv.num_kv_heads, None), (q.shape[1], 4)):
        index = indices_for(kv, groups=groups, page_size=ps, keep=0.7, seed=groups)
        o, lse = _ops.sparse_decode(rt, I.SparseDecodeInputs(q, kv, index, 0.7))
        wo, wl = oracle_decode(q, kv, index, 0.7)
        assert_close(o, wo, dtype, what=f"{poison} sparse_decode out G={groups}")
        assert_close(lse, wl, lse_dt, what=f"{poison} sparse_decode lse G={groups}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_merge_attention_follows_the_nonfinite_contract(dtype: str) -> None:
    from sparsecore.backends.cuda import _ops
    from sparsecore.ops import inputs as I
    from tests._util import assert_close
    from tests.nonfinite import merge_case, oracle_merge

    emu = _needs_emu()
    o1, l1, o2, l2 = merge_case(dtype)
    for lse_dt in (np.float32, np.float64):
        mo, ml = _ops.merge_attention(emu.CpuRuntime(), I.MergeAttentionInputs(o1, l1.astype(lse_dt), o2,
                                                                                l2.astype(lse_dt)))
        wo, wl = oracle_merge(o1, l1, o2, l2)
        assert_close(mo, wo, dtype, what="merge_attention out")
        assert_close(ml, wl, "float32", what="merge_attention lse")
