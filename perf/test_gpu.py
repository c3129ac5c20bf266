"""GPU benchmarks of the CUDA backends beside cuBLAS (torch.matmul), cuSPARSE (cupyx CSR) and dense
decode (torch SDPA). Skipped without a GPU. Every case checks its result against the reference (or an
independent dense computation) before timing; each timed call ends with a device synchronise.

    python3 -m pytest perf/test_gpu.py --benchmark-only --benchmark-json=OUT.json
"""

from __future__ import annotations

import pytest

import sparsecore as sc

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

DEV = "cuda"
SYNC = torch.cuda.synchronize
GPU_BACKENDS = [b for b in ("numba_cuda", "cupy", "cuda_python")
                if any(c.BACKEND == b and not c.availability_reasons() for c in sc.ops.implementations("spmm"))]


def _sparse(m, k, density, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, device=DEV, generator=g)
    x[torch.rand(m, k, device=DEV, generator=g) >= density] = 0
    return x.to(dtype)


def _timed(benchmark, fn, rounds=30):
    def call():
        fn()
        SYNC()
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=3)


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1))


@pytest.mark.parametrize("impl", GPU_BACKENDS + ["torch_matmul_dense", "cusparse_csr"])
@pytest.mark.parametrize("shape", [(16384, 5632, 2048, 0.005), (16, 5632, 2048, 0.005)], ids=["prefill", "decode"])
def test_spmm(benchmark, impl, shape):
    m, k, n, density = shape
    x = _sparse(m, k, density, torch.bfloat16)
    w = torch.randn(k, n, device=DEV).to(torch.bfloat16)
    expected = x.float() @ w.float()
    benchmark.group = f"spmm bf16 M={m} K={k} N={n} density={density:.1%}"
    benchmark.extra_info.update(op="spmm", impl=impl)
    if impl == "torch_matmul_dense":
        fn = lambda: x @ w
    elif impl == "cusparse_csr":
        cp = pytest.importorskip("cupy")
        cpx = pytest.importorskip("cupyx.scipy.sparse")
        xs = cpx.csr_matrix(cp.asarray(x.float()))  # cuSPARSE has no bf16 SpMM; f32 is its best here
        wf = cp.asarray(w.float())
        fn = lambda: xs @ wf
        out = torch.as_tensor(fn(), device=DEV)
        assert _rel_err(out, expected) < 1e-2
        _timed(benchmark, lambda: (fn(), cp.cuda.get_current_stream().synchronize()))
        return
    else:
        a = sc.pack(x, backend=impl)
        fn = lambda: sc.spmm(a, w, backend=impl)
    assert _rel_err(fn(), expected) < 2e-2
    _timed(benchmark, fn)


B, HQ, HKV, D, PAGE = 16, 32, 8, 128, 16


@pytest.mark.parametrize("impl", [f"{b}_sparse" for b in GPU_BACKENDS] + ["torch_sdpa_dense"])
@pytest.mark.parametrize("sparsity", [50, 500])
@pytest.mark.parametrize("ctx", [32768])
def test_decode(benchmark, impl, sparsity, ctx):
    n_pages = B * ctx // PAGE
    k = torch.randn(n_pages, PAGE, HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(n_pages, PAGE, HKV, D, device=DEV, dtype=torch.bfloat16)
    table = torch.randperm(n_pages, device=DEV, dtype=torch.int32).reshape(B, ctx // PAGE)
    lengths = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
    kv = sc.PagedKV(k, v, table, lengths)
    q = torch.randn(B, HQ, D, device=DEV, dtype=torch.bfloat16)
    benchmark.group = f"decode bf16 B={B} Hq={HQ} Hkv={HKV} D={D} page={PAGE} ctx={ctx} {sparsity}x"
    benchmark.extra_info.update(op="decode", impl=impl, sparsity=sparsity)
    if impl == "torch_sdpa_dense":
        kd = k[table.long()].reshape(B, ctx, HKV, D).transpose(1, 2).contiguous()
        vd = v[table.long()].reshape(B, ctx, HKV, D).transpose(1, 2).contiguous()
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=True)
    else:
        backend = impl.removesuffix("_sparse")
        index = sc.select_topk(q, kv, ctx // sparsity, backend=backend)
        fn = lambda: sc.sparse_decode(q, kv, index, backend=backend)
        ref = sc.sparse_decode(q[:2].cpu(), sc.PagedKV(k.cpu(), v.cpu(), table[:2].cpu(), lengths[:2].cpu()),
                               index.map_arrays(lambda t: t[:2].cpu()), backend="reference")[0]
        assert _rel_err(fn()[0][:2].cpu(), ref) < 2e-2
    _timed(benchmark, fn)


def _paged_cache(ctx, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    n_pages = B * ctx // PAGE
    k = torch.randn(n_pages, PAGE, HKV, D, device=DEV, dtype=torch.bfloat16, generator=g)
    v = torch.randn(n_pages, PAGE, HKV, D, device=DEV, dtype=torch.bfloat16, generator=g)
    table = torch.randperm(n_pages, device=DEV, dtype=torch.int32, generator=g).reshape(B, ctx // PAGE)
    lengths = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
    q = torch.randn(B, HQ, D, device=DEV, dtype=torch.bfloat16, generator=g)
    return q, sc.PagedKV(k, v, table, lengths)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("method", ["exact", "mass", "top_p", "top_p_4x", "int8", "int8_mass", "quest", "quest_stored"])
@pytest.mark.parametrize("ctx", [32768])
def test_select_topk(benchmark, backend, method, ctx):
    """Selection itself (often the bottleneck): exact reads every key, mass ranking too (each query
    head's score and softmax mass per key: candidates = every key), Quest on the fly too (page
    min/max from the keys), Quest with stored PageBounds 2 / PAGE of them. k = ctx / 50 tokens; the
    adaptive budget at most 2 k (top_p) or 4 k (top_p_4x: 2621 units at 32K, past the 2048 of the
    shared-memory sort, so its sort runs in global memory); int8 and int8_mass rank from the int8 copy of
    the keys (built on the device by quantize_keys, not timed)."""
    q, kv = _paged_cache(ctx)
    benchmark.group = f"select_topk bf16 B={B} Hq={HQ} Hkv={HKV} D={D} page={PAGE} ctx={ctx} k=ctx/50"
    benchmark.extra_info.update(op="select_topk", impl=f"{backend}_{method}")
    if method == "exact":
        fn = lambda: sc.select_topk(q, kv, ctx // 50, backend=backend)
    elif method.startswith("int8"):
        codes = sc.quantize_keys(kv)  # on the device
        extra = dict(candidates=ctx) if method == "int8_mass" else {}
        fn = lambda: sc.select_topk(q, kv, ctx // 50, method="int8", codes=codes, backend=backend, **extra)
    elif method == "mass":
        fn = lambda: sc.select_topk(q, kv, ctx // 50, candidates=ctx, backend=backend)
    elif method.startswith("top_p"):  # docs/selection.md's adaptive budget: k <= 2 ctx / 50, top_p 0.9
        cap = 4 if method == "top_p_4x" else 2
        fn = lambda: sc.select_topk(q, kv, cap * ctx // 50, top_p=0.9, k_min=ctx // 400, backend=backend)
    else:
        bounds = sc.page_bounds(kv, PAGE, backend=backend) if method == "quest_stored" else None
        fn = lambda: sc.select_topk(q, kv, ctx // 50 // PAGE, method="quest", page_size=PAGE, bounds=bounds,
                                    backend=backend)
    if method.startswith("top_p"):
        assert ((fn().counts >= ctx // 400) & (fn().counts <= cap * ctx // 50)).all()
    else:
        assert (fn().counts == (ctx // 50 if method in ("exact", "mass", "int8", "int8_mass")
                                else ctx // 50 // PAGE)).all()
    if method == "quest_stored":  # the same selection as bounds computed on the fly
        on_the_fly = sc.select_topk(q, kv, ctx // 50 // PAGE, method="quest", page_size=PAGE, backend=backend)
        assert torch.equal(fn().indices, on_the_fly.indices)
    _timed(benchmark, fn)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("step", ["build", "decode_step"])
def test_page_bounds(benchmark, backend, step):
    """Building the bounds of a 32K context, and the per-decode-step update (one page per sequence)."""
    ctx = 32768
    q, kv = _paged_cache(ctx)
    benchmark.group = f"page_bounds bf16 B={B} Hkv={HKV} D={D} page={PAGE} ctx={ctx}"
    benchmark.extra_info.update(op="page_bounds", impl=f"{backend}_{step}")
    bounds = sc.page_bounds(kv, PAGE, backend=backend)
    ref = sc.page_bounds(sc.PagedKV(kv.k_pages.cpu(), kv.v_pages.cpu(), kv.page_table[:1].cpu(),
                                    kv.lengths[:1].cpu()), PAGE, backend="reference")
    assert torch.equal(bounds.kmin[:1].cpu(), torch.as_tensor(ref.kmin))
    if step == "build":
        fn = lambda: sc.page_bounds(kv, PAGE, backend=backend)
    else:
        start = kv.lengths - 1
        fn = lambda: sc.page_bounds(kv, out=bounds, start=start, backend=backend)
    _timed(benchmark, fn)
