"""Autograd of the sparse ops: gradcheck in float64 on the reference backend, agreement with dense
torch autograd in float32 on the default backend, torch.compile with backward, and a check that the
backward of ``relu_gated_ffn`` never forms a dense ``[M, K]`` hidden tensor."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the torch adapters need torch")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.autograd import gradcheck  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import sparsecore as sc  # noqa: E402
import sparsecore.torch as sct  # noqa: E402
from sparsecore.torch import TorchCSR, TorchTiledELL  # noqa: E402
from sparsecore.torch.functional import l1_penalty, relu_gated_ffn  # noqa: E402

F64 = torch.float64
REF = "reference"  # float64 runs on the reference backend


def _rand(*shape, seed, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale)


def _structure(m=4, k=24, tile=8, capacity=2, seed=0) -> TorchTiledELL:
    """A packed pattern with an overflow (capacity 2 of tile 8, about half the entries kept)."""
    a = sct.pack(_rand(m, k, seed=seed), activation="relu", tile=tile, capacity=capacity)
    assert a.overflow_indices.shape[0] > 0
    return a


def _scatter(a: TorchTiledELL, filled_values: torch.Tensor) -> TorchTiledELL:
    """``a`` with its filled slots set to ``filled_values`` (padding stays 0, as validate() wants):
    gradcheck perturbs only real entries."""
    mask = a.filled()
    values = torch.zeros(a.values.shape, dtype=filled_values.dtype).masked_scatter(mask, filled_values)
    return a._replace(values=values)


def _leaves(a: TorchTiledELL):
    mask = a.filled()
    return (a.values[mask].clone().requires_grad_(), a.overflow_data.clone().requires_grad_())


# ------------------------------------------------------------------------------------------------
# gradcheck, float64, reference backend


def test_gradcheck_spmm():
    a = _structure()
    w = _rand(24, 3, seed=1).requires_grad_()
    fv, ov = _leaves(a)
    assert gradcheck(lambda fv, ov, w: sct.spmm(_scatter(a, fv)._replace(overflow_data=ov), w, backend=REF),
                     (fv, ov, w))


def test_gradcheck_spmm_csr():
    a = TorchCSR.from_format(sc.csr_from_dense(torch.relu(_rand(4, 10, seed=2))))
    data = a.data.clone().requires_grad_()
    w = _rand(10, 3, seed=3).requires_grad_()
    assert gradcheck(lambda d, w: sct.spmm(a._replace(data=d), w, backend=REF), (data, w))
    dy = _rand(4, 3, seed=4).requires_grad_()
    assert gradcheck(lambda d, dy: sct.spmm_t(a._replace(data=d), dy, backend=REF), (data, dy))
    x, wk = _rand(4, 5, seed=5).requires_grad_(), _rand(10, 5, seed=6).requires_grad_()
    assert gradcheck(lambda x, wk: sct.sddmm(x, wk, a, backend=REF).data, (x, wk))


def test_gradcheck_spmm_t():
    a = _structure(seed=7)
    dy = _rand(4, 3, seed=8).requires_grad_()
    fv, ov = _leaves(a)
    assert gradcheck(lambda fv, ov, dy: sct.spmm_t(_scatter(a, fv)._replace(overflow_data=ov), dy, backend=REF),
                     (fv, ov, dy))


def test_gradcheck_sddmm():
    a = _structure(seed=9)
    x, w = _rand(4, 5, seed=10).requires_grad_(), _rand(24, 5, seed=11).requires_grad_()

    def f(x, w):
        s = sct.sddmm(x, w, a, backend=REF)
        return s.values * 1.5, s.overflow_data  # both outputs carry gradient (padding slots get none)

    assert gradcheck(f, (x, w))


def test_gradcheck_gated_ffn():
    a = _structure(seed=12)
    x, up, down = (_rand(4, 5, seed=13).requires_grad_(), _rand(24, 5, seed=14).requires_grad_(),
                   _rand(24, 3, seed=15).requires_grad_())
    fv, ov = _leaves(a)

    def f(x, fv, ov, up, down):
        return sct.gated_ffn(x, _scatter(a, fv)._replace(overflow_data=ov), up, down, backend=REF)

    assert gradcheck(f, (x, fv, ov, up, down))


@pytest.mark.parametrize("activation,threshold", [("relu", 0.0), ("relu", 0.3), (None, 0.3)])
def test_gradcheck_pack(activation, threshold):
    x = _rand(4, 24, seed=16)
    x = torch.where(((x.abs() - threshold).abs() < 0.05) | (x.abs() < 0.05), x + 0.2, x)  # away from the kinks
    x.requires_grad_()

    def f(x):
        a = sct.pack(x, activation=activation, threshold=threshold, tile=8, capacity=2, backend=REF)
        return a.values, a.overflow_data

    assert gradcheck(f, (x,))


def test_pack_gradient_reaches_kept_entries_only():
    x = _rand(4, 24, seed=17).requires_grad_()
    a = sct.pack(x, activation="relu", threshold=0.2, tile=8, capacity=2)
    (a.values.sum() * 2 + a.overflow_data.sum() * 2).backward()
    torch.testing.assert_close(x.grad, torch.where(x.detach() > 0.2, 2.0, 0.0).to(F64))


def test_gradcheck_unpack():
    a = _structure(seed=18)
    fv, ov = _leaves(a)
    assert gradcheck(lambda fv, ov: sct.unpack(_scatter(a, fv)._replace(overflow_data=ov), backend=REF) * 3,
                     (fv, ov))


def test_gradcheck_relu_gate_and_relu_gated_ffn():
    m, d, k, n = 5, 4, 24, 3
    x, wg, wu, wd = (_rand(m, d, seed=19), _rand(k, d, seed=20), _rand(k, d, seed=21), _rand(k, n, seed=22))
    for t in (x, wg, wu, wd):
        t.requires_grad_()
    assert gradcheck(lambda x, wg: sct.relu_gate(x, wg, tile=8, capacity=2, backend=REF).values, (x, wg))

    def f(x, wg, wu, wd):
        out, h = relu_gated_ffn(x, wg, wu, wd, tile=8, capacity=2, backend=REF)
        assert h.overflow_indices.shape[0] > 0
        return out, l1_penalty(h)

    assert gradcheck(f, (x, wg, wu, wd))


# ------------------------------------------------------------------------------------------------
# agreement with dense torch autograd, float32, default backend


def _dense_ffn(x, wg, wu, wd, threshold=0.0):
    g = x @ wg.T
    h = torch.where(g > threshold, g, torch.zeros((), dtype=g.dtype))
    return (h * (x @ wu.T)) @ wd, h


@given(m=st.integers(1, 9), d=st.integers(1, 6), k=st.integers(1, 70), n=st.integers(1, 5),
       tile=st.sampled_from([2, 8, 32]), cap=st.integers(1, 4), thr=st.sampled_from([0.0, 0.5]),
       seed=st.integers(0, 2**31 - 1), coef=st.sampled_from([0.0, 0.1]))
def test_relu_gated_ffn_matches_dense_autograd(m, d, k, n, tile, cap, thr, seed, coef):
    g = torch.Generator().manual_seed(seed)
    x, wg, wu = (torch.randn(m, d, generator=g), torch.randn(k, d, generator=g), torch.randn(k, d, generator=g))
    wd_t = torch.randn(n, k, generator=g)  # a down_proj.weight: pass its transpose, a strided view
    leaves = [t.requires_grad_() for t in (x, wg, wu, wd_t)]

    out, h = relu_gated_ffn(x, wg, wu, wd_t.T, tile=tile, capacity=min(cap, tile), threshold=thr)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + coef * l1_penalty(h)
    got = torch.autograd.grad(loss, leaves)

    ref_out, ref_h = _dense_ffn(x, wg, wu, wd_t.T, thr)
    ref_loss = (ref_out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + coef * ref_h.abs().sum() / m
    want = torch.autograd.grad(ref_loss, leaves)

    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sct.unpack(h), ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1_penalty(h), ref_h.abs().sum() / m, atol=1e-4, rtol=1e-5)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda s, name=name: f"grad {name}: {s}")


def test_spmm_sddmm_gated_ffn_match_dense_autograd():
    torch.manual_seed(23)
    dense = torch.relu(torch.randn(6, 40))
    a = sct.pack(dense, tile=8, capacity=2)
    w, x, wk, dy = torch.randn(40, 3), torch.randn(6, 4), torch.randn(40, 4), torch.randn(6, 3)
    leaves_s = [a.values.clone().requires_grad_(), a.overflow_data.clone().requires_grad_()]
    leaves_d = [t.clone().requires_grad_() for t in (w, x, wk, dy)]
    s = a._replace(values=leaves_s[0], overflow_data=leaves_s[1])
    w_, x_, wk_, dy_ = leaves_d
    loss = (sct.spmm(s, w_).sin().sum() + sct.gated_ffn(x_, s, wk_, w_).cos().sum()
            + sct.spmm_t(s, dy_).square().sum() + sct.unpack(sct.sddmm(x_, wk_, s)).tanh().sum())
    loss.backward()

    dd = dense.clone().requires_grad_()
    w2, x2, wk2, dy2 = (t.clone().requires_grad_() for t in (w, x, wk, dy))
    mask = dense != 0
    ref = ((dd @ w2).sin().sum() + ((dd * (x2 @ wk2.T)) @ w2).cos().sum() + (dd.T @ dy2).square().sum()
           + torch.where(mask, x2 @ wk2.T, 0.0).tanh().sum())
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(leaves_d, (w2, x2, wk2, dy2)):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
    # the gradient w.r.t. the packed values is the dense gradient at the stored positions
    dense_grad_packed = sct.sddmm(torch.eye(6), dd.grad.T.contiguous(), a)  # picks dd.grad[m, k]
    torch.testing.assert_close(leaves_s[0].grad, dense_grad_packed.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(leaves_s[1].grad, dense_grad_packed.overflow_data, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# the backward stays sparse


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), tuple(t.shape)))
        return out


def test_relu_gated_ffn_backward_never_densifies_the_hidden_state():
    m, d, k, n = 6, 5, 96, 4  # K appears in no other dimension
    g = torch.Generator().manual_seed(24)
    leaves = [torch.randn(*s, generator=g).requires_grad_() for s in ((m, d), (k, d), (k, d), (k, n))]
    out, h = relu_gated_ffn(*leaves, tile=32, capacity=4)
    loss = out.square().sum() + 0.1 * l1_penalty(h)
    with _Shapes() as rec:
        torch.autograd.grad(loss, leaves)
    dense_hidden = [(op, s) for op, s in rec.ops if s in ((m, k), (k, m))]
    assert not dense_hidden, dense_hidden
    used = {op.split(".")[1] for op, _ in rec.ops if op.startswith("sparsecore.")}
    assert {"sddmm", "spmm", "spmm_t"} <= used, used


# ------------------------------------------------------------------------------------------------
# torch.compile with backward


def test_compile_fullgraph_relu_gated_ffn_backward():
    m, d, k, n = 6, 5, 48, 4
    g = torch.Generator().manual_seed(25)
    params = [torch.randn(*s, generator=g) for s in ((m, d), (k, d), (k, d), (k, n))]

    def step(x, wg, wu, wd):
        out, h = relu_gated_ffn(x, wg, wu, wd, tile=16, capacity=2)
        return out.square().mean() + 0.01 * l1_penalty(h), h.density()

    cstep = torch.compile(step, fullgraph=True, backend="aot_eager")
    for backend_fn in (step, cstep):
        leaves = [p.clone().requires_grad_() for p in params]
        loss, dens = backend_fn(*leaves)
        loss.backward()
        if backend_fn is step:
            want = (loss.detach(), dens, [t.grad for t in leaves])
        else:
            torch.testing.assert_close(loss.detach(), want[0])
            torch.testing.assert_close(dens, want[1])
            for a, b in zip([t.grad for t in leaves], want[2]):
                torch.testing.assert_close(a, b)


def test_compile_dynamic_token_count_relu_gated_ffn():
    """Training sees varying token counts: with dynamic shapes one graph serves them all."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(x, wg, wu, wd):
        out, h = relu_gated_ffn(x, wg, wu, wd, tile=16, capacity=2)
        return out.square().mean() + 0.01 * l1_penalty(h)

    counter = CompileCounterWithBackend("aot_eager")
    cstep = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    g = torch.Generator().manual_seed(26)
    for m in (5, 9):
        params = [torch.randn(*s, generator=g) for s in ((m, 4), (48, 4), (48, 4), (48, 3))]
        leaves = [p.clone().requires_grad_() for p in params]
        cstep(*leaves).backward()
        ref = [p.clone().requires_grad_() for p in params]
        step(*ref).backward()
        for a, b in zip(leaves, ref):
            torch.testing.assert_close(a.grad, b.grad)
    real = [gm for gm in counter.graphs if any(n.op == "placeholder" for n in gm.graph.nodes)]
    assert len(real) == 1, "a new token count must not recompile"


@pytest.mark.parametrize("activation", ["relu", None])
def test_gradcheck_gated_pack(activation):
    """gated_pack's gradient w.r.t. gate and up, through the kept entries (with an overflow)."""
    gate, up = _rand(4, 24, seed=11).requires_grad_(), _rand(4, 24, seed=12).requires_grad_()

    def f(g, u):
        a = sct.gated_pack(g, u, activation=activation, threshold=0.1, tile=8, capacity=2, backend=REF)
        return a.values, a.overflow_data

    assert sct.gated_pack(gate, up, activation=activation, threshold=0.1, tile=8, capacity=2,
                          backend=REF).overflow_indices.shape[0] > 0
    assert gradcheck(f, (gate, up))
    # the same gradient as pack over the dense product
    g2, u2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    h = (torch.relu(g2) if activation == "relu" else g2) * u2
    want = sct.unpack(sct.pack(h, threshold=0.1, tile=8, capacity=2, backend=REF), backend=REF)
    got = sct.unpack(sct.gated_pack(gate, up, activation=activation, threshold=0.1, tile=8, capacity=2, backend=REF),
                     backend=REF)
    w = _rand(4, 24, seed=13)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(gate.grad, g2.grad)
    torch.testing.assert_close(up.grad, u2.grad)
