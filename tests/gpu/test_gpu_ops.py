"""GPU tier (``-m gpu``): every op x GPU backend (``numba_cuda``, ``cupy``, ``cuda_python``) x value
dtype against the reference on a real GPU, with torch CUDA tensors and CuPy arrays (when CuPy is
installed), dense and paged caches, shared and per-head selections; outputs come back as the library
that went in; the ops run under CUDA-graph capture; and the kernels run under compute-sanitizer
memcheck and racecheck. Every test forces its backend with ``SPARSECORE_BACKEND`` (the ``launcher``
fixture), so a faster backend never stands in for the one under test.

Run on a GPU machine: ``python3 -m pytest -m gpu tests/gpu`` (or ``bash scripts/gpu.sh``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import sparsecore as sc
from sparsecore import CSR, TiledELL
from sparsecore import reference as ref
from sparsecore.formats.convert import csr_from_dense, tiled_ell_from_dense

pytestmark = pytest.mark.gpu

from tests._util import (  # noqa: E402
    check_adaptive_against_reference,
    check_mass_ranking_against_reference,
    check_rescore_against_reference,
    check_topk_against_reference,
    dequantized_kv,
)
from tests.gpu._common import (  # noqa: E402
    DTYPES,
    LIBS,
    NP,
    REASON,
    abs_fmt,
    check_kind,
    close,
    exact,
    host,
    kv_cache,
    requires_gpu,
    sparse_dense,
    to_lib,
)


def _launcher_reason(name: str) -> str | None:
    from sparsecore.ops.dispatcher import implementations

    cls = next(c for c in implementations("pack") if c.NAME == name)
    reasons = cls.availability_reasons()
    return "; ".join(reasons) if reasons else None


LAUNCHERS = ["numba_cuda", "cupy", "cuda_python"]


@pytest.fixture(params=LAUNCHERS)
def launcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Forces one launcher for the whole test (every op call goes to it or raises with its reasons)."""
    if REASON is None:
        why = _launcher_reason(request.param)
        if why:
            pytest.skip(f"{request.param}: {why}")
    monkeypatch.setenv("SPARSECORE_BACKEND", request.param)
    return request.param


# ---- FFN ops ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack(launcher, dtype, lib):
    rng = np.random.default_rng(0)
    x = sparse_dense(rng, 37, 1000, 0.05, dtype)
    x[5, 7] = np.nan  # kept
    x[1] *= -1        # dropped by the relu
    for act in (None, "relu"):
        got = sc.pack(to_lib(x, lib), threshold=0.6, activation=act, tile=256, capacity=32)
        want = ref.pack(x, threshold=0.6, activation=act, tile=256, capacity=32)
        check_kind(got.values, lib)
        exact(got.counts, want.counts, "counts")
        exact(got.cols, want.cols, "cols")
        exact(got.values, want.values.astype(np.float32), "values")
        assert want.overflow is not None and got.overflow is not None
        exact(got.overflow.indptr, want.overflow.indptr, "overflow.indptr")
        exact(got.overflow.indices, want.overflow.indices, "overflow.indices")
        exact(got.overflow.data, want.overflow.data.astype(np.float32), "overflow.data")
        got.validate()
        dense = sc.unpack(got)
        check_kind(dense, lib)
        exact(dense, ref.unpack(want).astype(np.float32), "unpack")


def _ffn_inputs(dtype: str, fmt: str, seed: int = 1) -> tuple[np.random.Generator, TiledELL | CSR, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = sparse_dense(rng, 33, 700, 0.03, dtype)
    a = tiled_ell_from_dense(x, tile=256, capacity=16) if fmt == "ell" else csr_from_dense(x)
    return rng, a, x


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("fmt", ["ell", "csr"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_spmm_sddmm_spmm_t_gated(launcher, dtype, fmt, lib):
    rng, a, x = _ffn_inputs(dtype, fmt)
    n, d = 300, 96
    w = rng.standard_normal((700, n)).astype(NP[dtype])
    ad, wd = to_lib(a, lib), to_lib(w, lib)
    x64 = x.astype(np.float64)

    out = sc.spmm(ad, wd)
    check_kind(out, lib)
    close(out, ref.spmm(a, w) if fmt == "csr" else x64 @ w.astype(np.float64), dtype,
          np.abs(x64) @ np.abs(w.astype(np.float64)), "spmm")

    xx, ww = rng.standard_normal((33, d)).astype(NP[dtype]), rng.standard_normal((700, d)).astype(NP[dtype])
    got = sc.sddmm(to_lib(xx, lib), to_lib(ww, lib), ad)
    want = ref.sddmm(xx, ww, a)
    scale = ref.sddmm(np.abs(xx.astype(np.float64)), np.abs(ww.astype(np.float64)), abs_fmt(a))
    if fmt == "csr":
        close(got.data, want.data, dtype, scale.data, "sddmm")
    else:
        close(got.values, want.values, dtype, scale.values, "sddmm")
        close(got.overflow.data, want.overflow.data, dtype, scale.overflow.data, "sddmm overflow")

    dy = rng.standard_normal((33, n)).astype(NP[dtype])
    got = sc.spmm_t(ad, to_lib(dy, lib))
    check_kind(got, lib)
    close(got, ref.spmm_t(a, dy), dtype, ref.spmm_t(abs_fmt(a), np.abs(dy.astype(np.float64))), "spmm_t")

    w_down = rng.standard_normal((700, n)).astype(NP[dtype])
    got = sc.gated_ffn(to_lib(xx, lib), ad, to_lib(ww, lib), to_lib(w_down, lib))
    check_kind(got, lib)
    a64 = lambda v: np.abs(v.astype(np.float64))  # noqa: E731
    close(got, ref.gated_ffn(xx, a, ww, w_down), dtype,
          ref.gated_ffn(a64(xx), abs_fmt(a), a64(ww), a64(w_down)), "gated_ffn")


# ---- decode ops ---------------------------------------------------------------------------------

def _decode_inputs(dtype: str, paged: bool, seed: int = 2) -> tuple[np.random.Generator, np.ndarray, Any]:
    rng = np.random.default_rng(seed)
    lengths = [700, 1, 0, 333]
    kv = kv_cache(rng, dtype, lengths, 720, 2, 128, paged)
    q = rng.standard_normal((4, 8, 128)).astype(NP[dtype])
    return rng, q, kv


def _vmax(kv: Any) -> float:
    return 1.0 + max(float(np.nanmax(np.abs(ref.sequence_kv(kv, b)[1].astype(np.float64)), initial=0.0))
                     for b in range(kv.batch))


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_and_sparse_decode(launcher, dtype, shared, paged, lib):
    rng, q, kv = _decode_inputs(dtype, paged)
    qd, kvd = to_lib(q, lib), to_lib(kv, lib)
    for method, k in (("exact", 50), ("quest", 5)):
        got = sc.select_topk(qd, kvd, k, method=method, sink=4, window=16, shared=shared)
        check_kind(got.indices, lib)
        want = ref.select_topk(q, kv, k, method=method, sink=4, window=16, shared=shared,
                               page_size=None if method == "exact" else (16 if not paged else kv.page_size))
        check_topk_against_reference(got, want, q, kv, shared=shared, sink=4, window=16, rel_tol=1e-3)
        out, lse = sc.sparse_decode(qd, kvd, want.map_arrays(lambda a: to_lib(a, lib)))
        check_kind(out, lib)
        w_out, w_lse = ref.sparse_decode(q, kv, want)
        close(out, w_out, dtype, _vmax(kv), f"sparse_decode {method}")
        close(lse, w_lse, "float32", 10.0, f"sparse_decode {method} lse")
    assert np.isneginf(host(lse)[2]).all() and not host(out).astype(np.float64)[2].any()  # length 0


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_mass_ranking_of_every_key(launcher, dtype, shared, paged, lib):
    """candidates covering every key: the k of highest attention mass (numba_cuda's and the CUDA C
    mass_of_every_key), against the reference's float64 masses."""
    rng, q, kv = _decode_inputs(dtype, paged)
    qd, kvd = to_lib(q, lib), to_lib(kv, lib)
    for k, sink, window, scale in ((50, 4, 16, None), (8, 0, 0, 0.3)):
        got = sc.select_topk(qd, kvd, k, sink=sink, window=window, shared=shared, candidates=10**6, scale=scale)
        check_kind(got.indices, lib)
        check_mass_ranking_against_reference(got, q, kv, k, sink=sink, window=window, shared=shared, scale=scale,
                                             rel_tol=1e-5)


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_adaptive_budget(launcher, dtype, shared, paged, lib):
    """top_p on every launcher, against the meaning of the reference's top_p_count."""
    rng, q, kv = _decode_inputs(dtype, paged)
    qd, kvd = to_lib(q, lib), to_lib(kv, lib)
    for k, k_min, top_p, sink, window in ((50, 4, 0.9, 4, 16), (300, 0, 0.5, 0, 0), (20, 20, 0.99, 1, 1)):
        got = sc.select_topk(qd, kvd, k, top_p=top_p, k_min=k_min, sink=sink, window=window, shared=shared)
        check_kind(got.indices, lib)
        check_adaptive_against_reference(got, q, kv, k, top_p=top_p, k_min=k_min, sink=sink, window=window,
                                         shared=shared, scale=None)


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_int8(launcher, dtype, shared, paged, lib):
    """method="int8" on every launcher, codes built on the device: plain, re-scored, by mass over every
    key, adaptive; held to the reference (on the keys the codes stand for; re-scored: on the keys)."""
    rng, q, kv = _decode_inputs(dtype, paged)
    codes = sc.quantize_keys(kv)
    deq = dequantized_kv(kv, codes)
    qd, kvd = to_lib(q, lib), to_lib(kv, lib)
    cd = sc.quantize_keys(kvd)  # built on the device: the host's bits
    check_kind(cd.codes, lib)
    for b, n in enumerate(kv.lengths.tolist()):
        np.testing.assert_array_equal(host(cd.codes)[b, :n], codes.codes[b, :n])
        np.testing.assert_array_equal(host(cd.scales)[b, :n].view(np.int32), codes.scales[b, :n].view(np.int32))
    got = sc.select_topk(qd, kvd, 50, method="int8", codes=cd, sink=4, window=16, shared=shared)
    check_kind(got.indices, lib)
    want = ref.select_topk(q, kv, 50, method="int8", codes=codes, sink=4, window=16, shared=shared)
    check_topk_against_reference(got, want, q, deq, shared=shared, sink=4, window=16, rel_tol=1e-4)
    got = sc.select_topk(qd, kvd, 50, method="int8", codes=cd, sink=4, window=16, shared=shared, rescore=120)
    want = ref.select_topk(q, kv, 50, method="int8", codes=codes, sink=4, window=16, shared=shared, rescore=120)
    check_rescore_against_reference(got, want, q, kv, shared=shared, sink=4, window=16, rel_tol=1e-4)
    got = sc.select_topk(qd, kvd, 50, method="int8", codes=cd, shared=shared, candidates=10**6)
    check_mass_ranking_against_reference(got, q, deq, 50, sink=0, window=0, shared=shared, scale=None, rel_tol=1e-5)
    got = sc.select_topk(qd, kvd, 100, method="int8", codes=cd, shared=shared, top_p=0.9, k_min=4)
    check_adaptive_against_reference(got, q, deq, 100, top_p=0.9, k_min=4, sink=0, window=0, shared=shared,
                                     scale=None)


@requires_gpu
def test_topk_decode_int8_on_a_cuda_cache_matches_the_cpu():
    """TopKDecode(method="int8") keeps its codes on the cache's CUDA device (quantize_keys' device
    path, updated one key per step) and selects there: the same outputs as on the CPU cache."""
    import torch

    from sparsecore.torch.attention import TopKDecode

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 300, 64, generator=g)
    values = torch.randn(2, 3, 300, 64, generator=g)
    outs = {}
    for dev in ("cpu", "cuda"):
        state = TopKDecode(k=12, method="int8", candidates=4096)
        got = []
        for n in (290, 291, 292):  # a growing cache: the codes are updated, not rebuilt
            q = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(n))
            got.append(state.attend(q.to(dev), keys[:, :, :n].to(dev), values[:, :, :n].to(dev), n).cpu())
        outs[dev] = torch.stack(got)
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-4, atol=1e-4)


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_adaptive_budget_past_the_shared_sort(launcher, dtype, lib):
    """top_p rows of more than 2048 units (the shared-memory sort's size): top_p_cut sorts them in
    its global workspace."""
    rng = np.random.default_rng(12)
    kv = kv_cache(rng, dtype, [5000, 2200, 0], 5000, 2, 64, True)
    q = rng.standard_normal((3, 6, 64)).astype(NP[dtype])
    qd, kvd = to_lib(q, lib), to_lib(kv, lib)
    for shared, k, k_min, top_p, sink, window in ((True, 4000, 0, 0.99, 4, 64), (False, 2100, 2049, 0.5, 0, 0)):
        got = sc.select_topk(qd, kvd, k, top_p=top_p, k_min=k_min, sink=sink, window=window, shared=shared)
        check_kind(got.indices, lib)
        check_adaptive_against_reference(got, q, kv, k, top_p=top_p, k_min=k_min, sink=sink, window=window,
                                         shared=shared, scale=None)


def _bits(x: Any) -> np.ndarray:
    a = host(x)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_page_bounds(launcher, dtype, paged, lib):
    """Fresh bounds bit-identical to the reference (pages past a length 0); an in-place update with
    ``out`` and ``start`` after the lengths grew equals a fresh computation and leaves the pages before
    ``start // ps`` alone; logical pages of 16 (the paged cache's), 5 and 48 tokens."""
    import dataclasses

    rng, _, kv = _decode_inputs(dtype, paged)
    kvd = to_lib(kv, lib)
    short = dataclasses.replace(kv, lengths=np.array([650, 0, 0, 320], np.int32))
    shortd = to_lib(short, lib)
    for ps in (16, 5, 48):
        got = sc.page_bounds(kvd, ps)
        check_kind(got.kmin, lib)
        want = ref.page_bounds(kv, ps)
        assert got.page_size == ps and tuple(got.kmin.shape) == want.kmin.shape
        np.testing.assert_array_equal(_bits(got.kmin), _bits(want.kmin), err_msg=f"kmin ps={ps}")
        np.testing.assert_array_equal(_bits(got.kmax), _bits(want.kmax), err_msg=f"kmax ps={ps}")
        out = sc.page_bounds(shortd, ps)
        start = short.lengths.copy()
        first = start // ps
        poisoned = host(out.kmin).copy()
        for b in range(kv.batch):
            poisoned[b, :first[b]] = 7
        out = type(out)(to_lib(poisoned, lib), out.kmax, ps)
        res = sc.page_bounds(kvd, out=out, start=to_lib(start, lib))
        assert res is out
        kmin = host(out.kmin).astype(np.float64)
        for b in range(kv.batch):
            assert (kmin[b, :first[b]] == 7).all()
            np.testing.assert_array_equal(_bits(out.kmin)[b, first[b]:], _bits(want.kmin)[b, first[b]:])
        np.testing.assert_array_equal(_bits(out.kmax), _bits(want.kmax), err_msg=f"updated kmax ps={ps}")


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_with_bounds(launcher, dtype, shared, paged, lib):
    """Quest from stored bounds selects exactly what Quest from the keys does on the same backend, and
    agrees with the reference."""
    rng, q, kv = _decode_inputs(dtype, paged)
    qd, kvd = to_lib(q, lib), to_lib(kv, lib)
    for ps in (16, 7):
        bounds = sc.page_bounds(kvd, ps)
        base = sc.select_topk(qd, kvd, 5, method="quest", sink=4, window=16, shared=shared, page_size=ps)
        got = sc.select_topk(qd, kvd, 5, method="quest", sink=4, window=16, shared=shared, bounds=bounds)
        check_kind(got.indices, lib)
        exact(got.counts, host(base.counts), "counts")
        exact(got.indices, host(base.indices), "indices")
        want = ref.select_topk(q, kv, 5, method="quest", sink=4, window=16, shared=shared,
                               bounds=bounds.map_arrays(host))
        check_topk_against_reference(got, want, q, kv, shared=shared, sink=4, window=16, rel_tol=1e-3)


@requires_gpu
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_decode_and_merge(launcher, dtype, paged, lib):
    rng, q, kv = _decode_inputs(dtype, paged)
    out, lse = sc.dense_decode(to_lib(q, lib), to_lib(kv, lib), scale=0.1)
    check_kind(out, lib)
    w_out, w_lse = ref.dense_decode(q, kv, scale=0.1)
    close(out, w_out, dtype, _vmax(kv), "dense_decode")
    close(lse, w_lse, "float32", 10.0, "dense_decode lse")
    o2 = rng.standard_normal(w_out.shape).astype(NP[dtype])
    l2 = rng.standard_normal(w_lse.shape).astype(np.float32)
    mo, ml = sc.merge_attention(out, lse, to_lib(o2, lib), to_lib(l2, lib))
    check_kind(mo, lib)
    r_out, r_lse = ref.merge_attention(host(out), host(lse), o2, l2)
    close(mo, r_out, dtype, 4.0, "merge_attention")
    close(ml, r_lse, "float32", 1.0, "merge_attention lse")


@requires_gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 2, 256), (8, 8, 40), (6, 3, 64)], ids=["group16-d256", "mha-d40", "g2-d64"])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_decode_variants(launcher, hq, hkv, d, paged):
    """The per-head fallback for groups above 8, head_dim 256 (8 values per lane), odd head_dim (scalar
    loads), one split and many splits."""
    rng = np.random.default_rng(5)
    lengths = [1500, 3, 64]
    kv = kv_cache(rng, "bfloat16", lengths, 1504, hkv, d, paged)
    q = rng.standard_normal((3, hq, d)).astype(NP["bfloat16"])
    qd, kvd = to_lib(q, "torch"), to_lib(kv, "torch")
    out, lse = sc.dense_decode(qd, kvd)
    w_out, w_lse = ref.dense_decode(q, kv)
    close(out, w_out, "bfloat16", _vmax(kv), "dense_decode")
    close(lse, w_lse, "float32", 10.0, "dense_decode lse")
    for shared in (True, False):
        want = ref.select_topk(q, kv, 100, sink=4, window=16, shared=shared)
        got = sc.select_topk(qd, kvd, 100, sink=4, window=16, shared=shared)
        check_topk_against_reference(got, want, q, kv, shared=shared, sink=4, window=16, rel_tol=1e-3)
        out, lse = sc.sparse_decode(qd, kvd, want.map_arrays(lambda a: to_lib(a, "torch")))
        w_out, w_lse = ref.sparse_decode(q, kv, want)
        close(out, w_out, "bfloat16", _vmax(kv), "sparse_decode")
        close(lse, w_lse, "float32", 10.0, "sparse_decode lse")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_int64_csr_and_odd_widths(launcher, dtype):
    """int64 CSR indices, N and D that are not multiples of the vector width (scalar fallback)."""
    rng = np.random.default_rng(9)
    x = sparse_dense(rng, 17, 301, 0.05, dtype)
    a = csr_from_dense(x)
    import dataclasses

    a = dataclasses.replace(a, indptr=a.indptr.astype(np.int64), indices=a.indices.astype(np.int64))
    w = rng.standard_normal((301, 37)).astype(NP[dtype])
    out = sc.spmm(to_lib(a, "torch"), to_lib(w, "torch"))
    x64 = x.astype(np.float64)
    close(out, x64 @ w.astype(np.float64), dtype, np.abs(x64) @ np.abs(w.astype(np.float64)), "spmm int64")
    xx = rng.standard_normal((17, 13)).astype(NP[dtype])
    wu = rng.standard_normal((301, 13)).astype(NP[dtype])
    got = sc.gated_ffn(to_lib(xx, "torch"), to_lib(a, "torch"), to_lib(wu, "torch"), to_lib(w, "torch"))
    a64 = lambda v: np.abs(v.astype(np.float64))  # noqa: E731
    close(got, ref.gated_ffn(xx, a, wu, w), dtype, ref.gated_ffn(a64(xx), abs_fmt(a), a64(wu), a64(w)), "gated")


@requires_gpu
def test_torch_inputs_stay_on_their_stream_and_graph_capture_works(launcher):
    """No host synchronisation inside spmm or sparse_decode: both run under CUDA-graph capture on a
    side stream (torch raises if anything synchronises while capturing), and replays match."""
    import torch

    rng, a, x = _ffn_inputs("float16", "ell")
    w = torch.from_numpy(rng.standard_normal((700, 64)).astype(np.float16)).cuda()
    ad = to_lib(a, "torch")
    _, q, kv = _decode_inputs("float16", True)
    qd, kvd = to_lib(q, "torch"), to_lib(kv, "torch")
    index = sc.select_topk(qd, kvd, 40, shared=True)
    first = (sc.spmm(ad, w), *sc.sparse_decode(qd, kvd, index))  # compile and load outside the capture
    bounds = sc.page_bounds(kvd)  # fresh: allocated and zero-filled without a host read
    quest = sc.select_topk(qd, kvd, 5, method="quest", bounds=bounds)
    upd = type(bounds)(torch.zeros_like(bounds.kmin), torch.zeros_like(bounds.kmax), bounds.page_size)
    start = torch.zeros_like(kvd.lengths)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = (sc.spmm(ad, w), *sc.sparse_decode(qd, kvd, index))
        fresh = sc.page_bounds(kvd)
        sc.page_bounds(kvd, out=upd, start=start)
        q2 = sc.select_topk(qd, kvd, 5, method="quest", bounds=bounds)
    graph.replay()
    torch.cuda.synchronize()
    for c, f in zip((*captured, fresh.kmin, fresh.kmax, upd.kmin, upd.kmax, q2.indices, q2.counts),
                    (*first, bounds.kmin, bounds.kmax, bounds.kmin, bounds.kmax, quest.indices, quest.counts)):
        assert torch.equal(c, f)


_SANITIZE = textwrap.dedent("""
    import numpy as np, torch, sparsecore as sc
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 300)).astype(np.float32); x[np.abs(x) < 1.2] = 0; x[0] = 1.0
    xd = torch.from_numpy(x).cuda()
    a = sc.pack(xd, tile=64, capacity=4)
    w = torch.randn(300, 40, device="cuda")
    sc.unpack(a); sc.spmm(a, w); sc.spmm_t(a, torch.randn(9, 40, device="cuda"))
    xx = torch.randn(9, 32, device="cuda"); wu = torch.randn(300, 32, device="cuda")
    sc.sddmm(xx, wu, a); sc.gated_ffn(xx, a, wu, torch.randn(300, 40, device="cuda"))
    q = torch.randn(2, 4, 64, device="cuda")
    k = torch.randn(2, 300, 2, 64, device="cuda"); v = torch.randn(2, 300, 2, 64, device="cuda")
    kv = sc.DenseKV(k, v, torch.tensor([300, 17], dtype=torch.int32, device="cuda"))
    for shared in (True, False):
        for method in ("exact", "quest"):
            idx = sc.select_topk(q, kv, 20, method=method, sink=2, window=8, shared=shared)
            sc.sparse_decode(q, kv, idx)
    bounds = sc.page_bounds(kv, 16)
    sc.page_bounds(kv, out=bounds, start=torch.tensor([290, 3], dtype=torch.int32, device="cuda"))
    sc.select_topk(q, kv, 5, method="quest", sink=2, window=8, bounds=bounds)
    o, l = sc.dense_decode(q, kv)
    sc.merge_attention(o, l, o, l)
    torch.cuda.synchronize()
    print("ok")
""")


@requires_gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_kernels_under_compute_sanitizer(launcher, tool, tmp_path):
    exe = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if exe is None:
        pytest.skip("compute-sanitizer not found (PATH, /usr/local/cuda/bin)")
    script = tmp_path / f"sanitize_{launcher}.py"
    script.write_text(_SANITIZE)
    env = dict(os.environ, SPARSECORE_BACKEND=launcher)
    res = subprocess.run([exe, f"--tool={tool}", "--error-exitcode=1", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-4000:] + res.stderr[-4000:]
