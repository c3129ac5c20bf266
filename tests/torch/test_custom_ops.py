"""The torch custom ops (namespace ``sparsecore``): opcheck for every op, agreement with the public ops,
the format holders, torch.compile(fullgraph=True) and error messages passing through."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch adapters need torch")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sparsecore as sc  # noqa: E402
import sparsecore.torch as sct  # noqa: E402
from sparsecore.torch import TorchCSR, TorchTiledELL, TorchTopKIndex  # noqa: E402
from tests.strategies_ffn import sparse_cases  # noqa: E402

OPS = torch.ops.sparsecore


def _opcheck(op, args, kwargs=None):
    # test_aot_dispatch_dynamic traces with symbolic ints; every test must pass
    res = torch.library.opcheck(op, args, kwargs or {})
    assert all(v == "SUCCESS" for v in res.values()), res


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _dense_gate(m=5, k=40, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=dtype)


def _packed(x, tile=8, capacity=2, activation="relu"):
    return sct.pack(x, activation=activation, tile=tile, capacity=capacity)


def _grad_leaf(a: TorchTiledELL | TorchCSR):
    if isinstance(a, TorchCSR):
        return a._replace(data=a.data.clone().requires_grad_())
    return a._replace(values=a.values.clone().requires_grad_(),
                      overflow_data=None if a.overflow_data is None else a.overflow_data.clone().requires_grad_())


def _csr(x):
    return TorchCSR.from_format(sc.csr_from_dense(x))


def _sparse_operands(dtype=torch.float64):
    """A TiledELL with a non-empty overflow, one without an overflow buffer, and a CSR."""
    x = _dense_gate(dtype=dtype)
    with_ov = _packed(x)
    assert with_ov.overflow_indices.shape[0] > 0
    no_ov = TorchTiledELL.from_format(sc.tiled_ell_from_dense(torch.relu(x), tile=8, capacity=8))
    assert no_ov.overflow is None
    return {"ell_overflow": with_ov, "ell": no_ov, "csr": _csr(torch.relu(x))}


# ------------------------------------------------------------------------------------------------
# import hygiene and registration


def test_import_sparsecore_does_not_import_torch():
    code = "import sys, sparsecore; sparsecore.ops; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_op_is_a_custom_op():
    for name in sc.ops.OPS:
        assert hasattr(OPS, name), name
        assert name in sct.ops.OP_NAMES
        assert callable(getattr(sct, name))
    assert hasattr(OPS, "relu_gate")


# ------------------------------------------------------------------------------------------------
# opcheck, every op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation,threshold", [("relu", 0.0), (None, 0.5)])
def test_opcheck_pack(dtype, activation, threshold):
    x = _dense_gate(dtype=dtype).requires_grad_()
    _opcheck(OPS.pack.default, (x, threshold, activation, 8, 2, None))
    _opcheck(OPS.pack.default, (x, threshold, activation, 16, None, None))  # default capacity


@pytest.mark.parametrize("name", sorted(sct.ops.TABLE_OPS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_table_made_ops(name, dtype):
    """An op whose custom op is made from its row of the op table (``out_shape``): opcheck, the
    public op's result, one graph under torch.compile, and a clear error where a gradient is asked."""
    from sparsecore.ops import dispatcher as D

    row = D.TABLE[D.OPS.index(name)]
    inp = row.example(np.random.default_rng(0), dtype)
    # the custom op's arguments: the fields but the buffers the op would write (``Out``, e.g. kept)
    fields = [n for n, f in inp.__dataclass_fields__.items() if n != "OP" and f.type != "Out | None"]
    vals = [getattr(inp, n) for n in fields]
    tvals = [sc._arrays.from_numpy(v, "torch") if isinstance(v, np.ndarray) else v for v in vals]
    _opcheck(getattr(OPS, name).default, (*tvals, None))
    got = getattr(sct, name)(*tvals)
    want = sc._arrays.from_numpy(D.dispatch(row.inputs(**dict(zip(fields, vals)))), "torch")
    assert got.dtype == want.dtype and torch.equal(got, want)
    compiled = torch.compile(lambda *a: getattr(sct, name)(*a) * 2, fullgraph=True)
    assert torch.equal(compiled(*tvals), want * 2)
    leaf = tvals[0].float().to(tvals[0].dtype).requires_grad_()
    with pytest.raises(NotImplementedError, match=f"sparsecore.torch.{name} has no gradient"):
        getattr(sct, name)(leaf, *tvals[1:]).float().sum().backward()


def test_threshold_mlp_custom_op_takes_no_kept_buffer():
    """The custom op stays functional: kept (a buffer the public op writes) is refused by its face."""
    x, wgu, wd = torch.ones(2, 4), torch.ones(4, 6), torch.ones(3, 5)
    with pytest.raises(ValueError, match=r"^sparsecore.torch.threshold_mlp: kept is not taken by the custom op"):
        sct.threshold_mlp(x, wgu, wd, kept=torch.zeros(2, dtype=torch.int64))
    kept = np.zeros(2, np.int64)
    sc.threshold_mlp(x.numpy(), wgu.numpy(), wd.numpy(), kept=kept)
    assert kept.tolist() == [3, 3]


def test_opcheck_relu_gate():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 5, generator=g, dtype=torch.float64, requires_grad=True)
    _opcheck(OPS.relu_gate.default, (x, w, 0.0, 8, 2, None))


@pytest.mark.parametrize("kind", ["ell_overflow", "ell", "csr"])
def test_opcheck_sparse_ops(kind):
    a = _grad_leaf(_sparse_operands()[kind])
    m, k = a.shape
    g = torch.Generator().manual_seed(2)
    w = torch.randn(k, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(m, 4, generator=g, dtype=torch.float64, requires_grad=True)
    wk = torch.randn(k, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(m, 3, generator=g, dtype=torch.float64, requires_grad=True)
    _opcheck(OPS.spmm.default, (*a.op_args(), w, None))
    _opcheck(OPS.sddmm.default, (x, wk, *a.op_args(), None))
    _opcheck(OPS.spmm_t.default, (*a.op_args(), dy, None))
    _opcheck(OPS.gated_ffn.default, (x, *a.op_args(), wk, w, None))
    if kind != "csr":
        _opcheck(OPS.unpack.default, (*a.op_args(), None))


def _kv(paged: bool, dtype=torch.float32, b=2, s=12, hkv=2, d=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([s, s // 2 + 1], dtype=torch.int32)[:b]
    if not paged:
        return sc.DenseKV(torch.randn(b, s, hkv, d, generator=g, dtype=dtype),
                          torch.randn(b, s, hkv, d, generator=g, dtype=dtype), lengths)
    ps = 4
    pages = b * (s // ps)
    table = torch.randperm(pages, generator=g).to(torch.int32).view(b, s // ps)
    return sc.PagedKV(torch.randn(pages, ps, hkv, d, generator=g, dtype=dtype),
                      torch.randn(pages, ps, hkv, d, generator=g, dtype=dtype), table, lengths)


def _kv_args(kv):
    if isinstance(kv, sc.DenseKV):
        return kv.k, kv.v, kv.lengths, None
    return kv.k_pages, kv.v_pages, kv.lengths, kv.page_table


@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_decode_ops(paged):
    kv = _kv(paged)
    q = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(4))
    cases = [("exact", True, None), ("exact", False, None), ("quest", True, 2), ("quest", False, None)]
    for method, shared, ps in cases:
        k = 1 if method == "quest" and ps is None else 3
        _opcheck(OPS.select_topk.default, (q, *_kv_args(kv), k, method, 1, 2, shared, ps, None, None, None))
    for shared in (True, False):  # the adaptive budget, and over candidates
        for c in (0, 5):
            _opcheck(OPS.select_topk.default, (q, *_kv_args(kv), 3, "exact", 1, 2, shared, None, None, None, None,
                                               0.7, 1, 0.5, c))
    kmin, kmax = OPS.page_bounds(*_kv_args(kv), 2, None)
    _opcheck(OPS.page_bounds.default, (*_kv_args(kv), 2, None))
    _opcheck(OPS.page_bounds.default, (*_kv_args(kv), 3, None))
    _opcheck(OPS.page_bounds_update.default, (*_kv_args(kv), kmin.clone(), kmax.clone(), 2, None, None))
    _opcheck(OPS.page_bounds_update.default, (*_kv_args(kv), kmin.clone(), kmax.clone(), 2,
                                              kv.lengths // 2, None))
    for shared in (True, False):
        _opcheck(OPS.select_topk.default, (q, *_kv_args(kv), 2, "quest", 1, 2, shared, 2, kmin, kmax, None))
    idx = sct.select_topk(q, kv, 3, sink=1, window=2)
    _opcheck(OPS.sparse_decode.default, (q, *_kv_args(kv), idx.indices, idx.counts, None, None, None))
    pidx = sct.select_topk(q, kv, 2, method="quest", page_size=2)
    assert pidx.granularity == "page" and pidx.page_size == 2
    _opcheck(OPS.sparse_decode.default, (q, *_kv_args(kv), pidx.indices, pidx.counts, 2, 0.5, None))
    _opcheck(OPS.dense_decode.default, (q, *_kv_args(kv), None, None))
    o1, l1 = sct.dense_decode(q, kv)
    o2, l2 = sct.sparse_decode(q, kv, idx)
    _opcheck(OPS.merge_attention.default, (o1, l1, o2, l2, None))


# ------------------------------------------------------------------------------------------------
# agreement with the public ops


@given(case=sparse_cases(dtypes=("float32", "float64"), max_m=6, max_k=40))
def test_pack_unpack_roundtrip_matches_public_ops(case):
    x = _t(case.dense)
    a = sct.pack(x, tile=case.tile, capacity=case.capacity)
    ref = sc.pack(case.dense, tile=case.tile, capacity=case.capacity)
    np.testing.assert_array_equal(a.values.numpy(), ref.values)
    np.testing.assert_array_equal(a.counts.numpy(), ref.counts)
    assert a.overflow_indptr.dtype == torch.int64 and a.overflow_indptr.shape == (case.shape[0] + 1,)
    torch.testing.assert_close(sct.unpack(a), x, rtol=0, atol=0)
    a.to_format().validate()


def test_ops_match_public_ops():
    ops = _sparse_operands(torch.float32)
    g = torch.Generator().manual_seed(5)
    for name, a in ops.items():
        fmt = a.to_format()
        m, k = a.shape
        w = torch.randn(k, 3, generator=g)
        x = torch.randn(m, 4, generator=g)
        wk = torch.randn(k, 4, generator=g)
        dy = torch.randn(m, 3, generator=g)
        torch.testing.assert_close(sct.spmm(a, w), sc.spmm(fmt, w), msg=name)
        torch.testing.assert_close(sct.spmm(fmt, w), sc.spmm(fmt, w), msg=name)  # a sparsecore format is accepted
        torch.testing.assert_close(sct.spmm_t(a, dy), sc.spmm_t(fmt, dy), msg=name)
        torch.testing.assert_close(sct.gated_ffn(x, a, wk, w), sc.gated_ffn(x, fmt, wk, w), msg=name)
        s = sct.sddmm(x, wk, a)
        assert type(s) is type(a)
        ref = sc.sddmm(x, wk, fmt)
        torch.testing.assert_close(sct.unpack(s) if name != "csr" else s.to_format().data,
                                   sc.unpack(ref) if name != "csr" else ref.data, msg=name)


def test_relu_gate_is_pack_of_relu_gemm():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(7, 5, generator=g), torch.randn(40, 5, generator=g)
    h = sct.relu_gate(x, w, tile=8, capacity=2, threshold=0.1)
    ref = sct.pack(x @ w.T, activation="relu", threshold=0.1, tile=8, capacity=2)
    for f in ("values", "cols", "counts", "overflow_indptr", "overflow_indices", "overflow_data"):
        torch.testing.assert_close(getattr(h, f), getattr(ref, f), msg=f)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_ops_match_public_ops(paged):
    kv = _kv(paged)
    q = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(7))
    idx = sct.select_topk(q, kv, 3, sink=1, window=2)
    ref = sc.select_topk(q, kv, 3, sink=1, window=2)
    torch.testing.assert_close(idx.counts, ref.counts)
    for out, want in zip(sct.sparse_decode(q, kv, idx), sc.sparse_decode(q, kv, idx.to_format())):
        torch.testing.assert_close(out, want)
    for shared in (True, False):
        for c in (0, 5):
            tp = sct.select_topk(q, kv, 3, top_p=0.6, k_min=1, scale=0.5, shared=shared, candidates=c)
            want = sc.select_topk(q, kv, 3, top_p=0.6, k_min=1, scale=0.5, shared=shared, candidates=c)
            torch.testing.assert_close(tp.counts, want.counts)
            torch.testing.assert_close(tp.indices, want.indices)
    full = sct.select_topk(q, kv, 12)
    o_s, l_s = sct.sparse_decode(q, kv, full)
    o_d, l_d = sct.dense_decode(q, kv)
    torch.testing.assert_close(o_s, o_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_s, l_d, atol=1e-5, rtol=1e-5)
    o, lse = sct.merge_attention(o_s, l_s, o_d, l_d)
    torch.testing.assert_close(o, o_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, l_d + np.log(2.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_page_bounds_match_public_ops(paged):
    """New bounds, an in-place update from shorter lengths, and Quest selection reading them."""
    kv = _kv(paged)
    q = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(11))
    want = sc.page_bounds(kv, 2)
    got = sct.page_bounds(kv, 2)
    assert isinstance(got, sct.TorchPageBounds) and got.page_size == 2
    torch.testing.assert_close(got.kmin, want.kmin, rtol=0, atol=0)
    torch.testing.assert_close(got.kmax, want.kmax, rtol=0, atol=0)
    short = kv.lengths // 2
    earlier = sc.DenseKV(kv.k, kv.v, short) if not paged else sc.PagedKV(kv.k_pages, kv.v_pages, kv.page_table, short)
    upd = sct.page_bounds(earlier, 2)
    assert sct.page_bounds(kv, out=upd, start=short) is upd
    for b, n in enumerate(kv.lengths.tolist()):
        pages = -(-n // 2)
        torch.testing.assert_close(upd.kmin[b, :pages], want.kmin[b, :pages], rtol=0, atol=0)
        torch.testing.assert_close(upd.kmax[b, :pages], want.kmax[b, :pages], rtol=0, atol=0)
    sel = sct.select_topk(q, kv, 2, method="quest", sink=1, bounds=upd)
    ref = sc.select_topk(q, kv, 2, method="quest", sink=1, page_size=2)
    assert (sel.granularity, sel.page_size) == ("page", 2)
    torch.testing.assert_close(sel.indices, torch.as_tensor(ref.indices))
    with pytest.raises(ValueError, match="select_topk: page_size = 4 but bounds.page_size = 2"):
        sct.select_topk(q, kv, 2, method="quest", page_size=4, bounds=upd)
    with pytest.raises(ValueError, match="page_bounds: start is given without out"):
        sct.page_bounds(kv, 2, start=short)


def test_format_holders_roundtrip():
    for a in _sparse_operands().values():
        fmt = a.to_format()
        b = type(a).from_format(fmt)
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor):
                assert x is y
            else:
                assert x == y
    a = _sparse_operands()["ell_overflow"]
    assert int(a.nnz()) == int((sct.unpack(a) != 0).sum())
    torch.testing.assert_close(a.nnz_per_row(), (sct.unpack(a) != 0).sum(1))
    assert 0 < float(a.density()) < 1
    np_fmt = sc.pack(np.eye(4, dtype=np.float32), tile=2, capacity=1)  # NumPy buffers are wrapped zero-copy
    torch.testing.assert_close(sct.unpack(np_fmt), torch.eye(4))
    idx = TorchTopKIndex.from_format(sc.TopKIndex(torch.zeros(1, 1, 1, dtype=torch.int32),
                                                  torch.ones(1, 1, dtype=torch.int32)))
    assert idx.to_format().k_max == 1


# ------------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_spmm_gated_ffn():
    g = torch.Generator().manual_seed(8)
    x, wk, w = torch.randn(6, 4, generator=g), torch.randn(40, 4, generator=g), torch.randn(40, 3, generator=g)

    def f(x, h_in, wk, w):
        a = sct.pack(h_in, activation="relu", tile=8, capacity=2)  # overflow size: unbacked
        y = sct.spmm(a, w) + sct.gated_ffn(x, a, wk, w)
        s = sct.sddmm(x, wk, a)
        return y, sct.spmm_t(s, y), a

    h_in = torch.randn(6, 40, generator=g)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, fullgraph=True, backend=counter, dynamic=False)
    for _ in range(3):  # new data, new overflow size: the same graph
        got, want = cf(x, h_in, wk, w), f(x, h_in, wk, w)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        assert isinstance(got[2], TorchTiledELL)
        torch.testing.assert_close(got[2].overflow_data, want[2].overflow_data)
        h_in = torch.randn(6, 40, generator=g) * 3
    assert counter.frame_count == 1, "a new overflow size must not recompile"


def test_compile_fullgraph_decode():
    kv = _kv(True)
    q = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(9))

    def f(q, k_pages, v_pages, table, lengths):
        kv = sc.PagedKV(k_pages, v_pages, table, lengths)
        idx = sct.select_topk(q, kv, 2, sink=1, window=2)
        bounds = sct.page_bounds(kv, 2)
        bounds = sct.page_bounds(kv, out=bounds, start=lengths - 1)  # in place, as at a decode step
        pidx = sct.select_topk(q, kv, 1, method="quest", bounds=bounds)
        o0, l0 = sct.sparse_decode(q, kv, pidx)
        o1, l1 = sct.sparse_decode(q, kv, idx)
        o2, l2 = sct.dense_decode(q, kv)
        return (*sct.merge_attention(o1, l1, o2, l2), o0, l0)

    args = (q, kv.k_pages, kv.v_pages, kv.page_table, kv.lengths)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got, f(*args)):
        torch.testing.assert_close(a, b)


def test_compile_inductor_relu_gate_spmm():
    """The real compiler once (the other compile tests use aot_eager to stay fast)."""
    g = torch.Generator().manual_seed(10)
    x, wg, w = torch.randn(5, 4, generator=g), torch.randn(32, 4, generator=g), torch.randn(32, 3, generator=g)

    def f(x, wg, w):
        h = sct.relu_gate(x, wg, tile=8, capacity=2)
        return torch.tanh(sct.spmm(h, w)) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, wg, w), f(x, wg, w))


# ------------------------------------------------------------------------------------------------
# errors pass through


def test_errors_pass_through_eager():
    a = _sparse_operands(torch.float32)["ell_overflow"]
    with pytest.raises(ValueError, match=r"spmm: w has shape \(7, 3\); expected w.shape\[0\] == K = 40"):
        sct.spmm(a, torch.zeros(7, 3))
    with pytest.raises(TypeError, match="spmm: a has dtype float32 but w has float64"):
        sct.spmm(a, torch.zeros(40, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="pack: tile = 3; must be a power of two"):
        sct.pack(torch.zeros(2, 8), tile=3)
    with pytest.raises(ValueError, match="pack: activation"):
        sct.pack(torch.zeros(2, 8), activation="gelu")
    with pytest.raises(TypeError, match="spmm: a must be a TorchTiledELL"):
        sct.spmm(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="relu_gate: x has shape"):
        sct.relu_gate(torch.zeros(2, 3), torch.zeros(4, 5))
    bad = a._replace(counts=a.counts.clone().fill_(7))  # counts > capacity: validate_data in the op
    with pytest.raises(ValueError, match=r"TiledELL.validate: counts\[0, 0\] = 7"):
        sct.spmm(bad, torch.zeros(40, 3))
    kv = _kv(False)
    with pytest.raises(ValueError, match="select_topk: k = 99 exceeds the cache's capacity"):
        sct.select_topk(torch.zeros(2, 4, 4), kv, 99)


def test_errors_pass_through_compile():
    a = _sparse_operands(torch.float32)["ell_overflow"]

    def f(values, w):
        return sct.spmm(a._replace(values=values), w)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"spmm: w has shape \(7, 3\); expected w.shape\[0\] == K = 40"):
        cf(a.values, torch.zeros(7, 3))

    def g(x):
        return sct.pack(x, tile=6).values

    with pytest.raises(Exception, match="pack: tile = 6; must be a power of two"):
        torch.compile(g, fullgraph=True, backend="aot_eager")(torch.zeros(2, 8))


@given(tile=st.sampled_from([2, 4, 8]), m=st.integers(0, 4), k=st.integers(0, 20))
def test_pack_fake_shapes_match_real(tile, m, k):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    x = torch.randn(m, k)
    real = OPS.pack(x, 0.0, "relu", tile, 1, None)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = OPS.pack(mode.from_tensor(x), 0.0, "relu", tile, 1, None)
    for r, f in zip(real, fake):
        assert r.dtype == f.dtype
        assert r.dim() == f.dim()
    for r, f in zip(real[:4], fake[:4]):
        assert tuple(r.shape) == tuple(f.shape)
    assert isinstance(fake[4].shape[0], torch.SymInt)  # the overflow size is data-dependent


@pytest.mark.parametrize("activation", ["relu", None])
def test_opcheck_gated_pack(activation):
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    _opcheck(OPS.gated_pack.default, (gate, up, 0.2, activation, 8, 2, None))
