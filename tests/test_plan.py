"""Plans: the dispatcher's per-signature memo (validation and backend choice made once per shape),
and DecodePlan, the public plan-once/run-many decode API, against the public ops it stands for."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore.ops import dispatcher as D
from sparsecore.ops import inputs as I
from tests._util import assert_close, backend_takes, host_backend_params
from tests.strategies_decode import decode_cases
from tests.strategies_ffn import np_dtype, random_values, sparse_cases

# ---------------------------------------------------------------- the dispatcher's plan memo


def _spmm_args(m: int = 3) -> tuple[sc.TiledELL, np.ndarray]:
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 32)).astype(np.float32)
    return sc.pack(x, threshold=1.0, tile=16), rng.standard_normal((32, 5)).astype(np.float32)


def test_a_repeated_signature_is_validated_and_planned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = I.SpmmInputs.validate

    def spy(self: I.SpmmInputs) -> None:
        calls.append("validate")
        real(self)

    monkeypatch.setattr(I.SpmmInputs, "validate", spy)
    D._PLANS.clear()
    a, w = _spmm_args()
    first = sc.spmm(a, w)
    for _ in range(3):
        np.testing.assert_array_equal(sc.spmm(a, w), first)
    assert calls == ["validate"]
    a2, w2 = _spmm_args(4)  # another shape: planned again
    sc.spmm(a2, w2)
    assert calls == ["validate"] * 2
    sc.spmm(a, w, backend="reference")  # another forced backend: planned again
    assert calls == ["validate"] * 3


def test_a_planned_signature_still_rejects_bad_arguments() -> None:
    """The memo holds only what validation accepted: a call with the same arrays but a bad
    scalar, or a mismatched shape, is validated and rejected as before."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    sc.pack(x, threshold=0.5, tile=8)
    with pytest.raises(ValueError, match=r"^pack: threshold = -1"):
        sc.pack(x, threshold=-1.0, tile=8)
    a, w = _spmm_args()
    sc.spmm(a, w)
    with pytest.raises(ValueError, match=r"^spmm: w has shape \(31, 5\)"):
        sc.spmm(a, w[:31])


def test_planned_call_restores_normalised_arguments() -> None:
    """``capacity=None`` is normalised to ``tile // 8`` by validation; a planned call gets the same."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    first = sc.pack(x, tile=16)
    again = sc.pack(x, tile=16)
    assert first.capacity == again.capacity == 2


@pytest.mark.parametrize("op", ["spmm", "gated_ffn", "select_topk", "sparse_decode"])
def test_repeated_public_calls_run_the_backends_runner(op: str) -> None:
    """From a signature's second call on, numba_cpu's decode-size calls run its runner (every shape
    decision made once): the results equal the reference for new data each call, and the data is
    still checked (an index out of range, a count past capacity) with the public call's message."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(7)
    D._PLANS.clear()

    def args() -> tuple[Any, ...]:
        if op in ("spmm", "gated_ffn"):
            x = rng.standard_normal((2, 40)).astype(np.float32)
            a = sc.pack(x, threshold=1.0, tile=16, capacity=16)  # no overflow: one signature for all calls
            w = rng.standard_normal((40, 6)).astype(np.float32)
            if op == "spmm":
                return (a, w)
            return (rng.standard_normal((2, 5)).astype(np.float32), a,
                    rng.standard_normal((40, 5)).astype(np.float32), w)
        kk, vv = (rng.standard_normal((1, 64, 2, 8)).astype(np.float32) for _ in range(2))
        kv = sc.DenseKV(kk, vv, np.array([int(rng.integers(1, 65))], np.int32))
        q = rng.standard_normal((1, 4, 8)).astype(np.float32)
        if op == "select_topk":
            return (q, kv, 5)
        return (q, kv, sc.select_topk(q, kv, 5, backend="reference"))

    fn = getattr(sc, op)
    for _ in range(4):
        a = args()
        got, want = fn(*a, backend="numba_cpu"), fn(*a, backend="reference")
        if op == "select_topk":
            np.testing.assert_array_equal(got.counts, want.counts)
            for g, w_ in zip(got.indices.reshape(-1, 5), want.indices.reshape(-1, 5)):
                assert sorted(g) == sorted(w_)
        elif op == "sparse_decode":
            for g, w_ in zip(got, want):  # out and lse
                assert_close(g, w_, "float32")
        else:
            assert_close(got, want, "float32")
    plans = [p for (key, name), p in D._PLANS.items() if name == "numba_cpu" and key[0].OP == op]
    assert plans and all(callable(p.runner[0]) for p in plans)
    if op == "sparse_decode":
        q, kv, index = a
        index.indices[0, 0, 0] = 64  # past the cache
        with pytest.raises(ValueError, match="indices"):
            fn(q, kv, index, backend="numba_cpu")
    if op == "spmm":
        a_, w = a
        a_.counts[0, 0] = 99  # past the capacity
        with pytest.raises(ValueError, match="counts"):
            fn(a_, w, backend="numba_cpu")


@pytest.mark.parametrize("layout", ["tiled_ell", "csr"])
def test_spmm_row_parallel_kernel_has_the_serial_bits(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode-size spmm with much work runs its row kernel with the rows in parallel: each row the
    serial kernel's sums in its order (bit for bit), public and planned, and the same error for an
    index out of range."""
    pytest.importorskip("numba")
    import sparsecore.backends.numba_cpu as nc

    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    x[rng.random(x.shape) > 0.1] = 0
    a = sc.pack(x, tile=64, capacity=4) if layout == "tiled_ell" else sc.csr_from_dense(x)
    w = rng.standard_normal((300, 70)).astype(np.float32)
    D._PLANS.clear()
    serial = sc.spmm(a, w, backend="numba_cpu")
    monkeypatch.setattr(nc, "ROW_KERNEL_MAX_WORK", 0)  # every decode-size call takes the parallel kernel
    D._PLANS.clear()
    assert not nc.Spmm.serial(I.SpmmInputs(a, w))
    for _ in range(3):  # the first call, then the signature's runner
        assert sc.spmm(a, w, backend="numba_cpu").tobytes() == serial.tobytes()
    plan = sc.OpPlan("spmm", a, w, backend="numba_cpu")
    assert plan.run(a, w).tobytes() == serial.tobytes()
    assert_close(serial, sc.spmm(a, w, backend="reference"), "float32")
    if layout == "tiled_ell":
        a.cols[4, 4, 0] = 63  # tile 4 holds columns 256-299: offset 63 is past K
        a.counts[4, 4] = max(a.counts[4, 4], 1)
        with pytest.raises(ValueError, match=r"^spmm: a.cols of tile 4 holds offset 63"):
            plan.run(a, w)
    D._PLANS.clear()


def test_registering_a_backend_drops_the_plans() -> None:
    a, w = _spmm_args()
    sc.spmm(a, w)
    assert D._PLANS
    D.load_backends()

    class _Never(D.BackendOp):
        OP, NAME, BACKEND = "spmm", "reference_never_used", "reference"

        @classmethod
        def availability_reasons(cls) -> list[str]:
            return ["a stand-in that never runs"]

    try:
        D.register(_Never)
        assert not D._PLANS
    finally:
        D._REGISTRY["spmm"].remove(_Never)


# ---------------------------------------------------------------- DecodePlan


@pytest.fixture(scope="module", params=host_backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _public(q: Any, kv: Any, k: int, bounds: Any = None, scale: float | None = None, **opts: Any) -> tuple:
    index = sc.select_topk(q, kv, k, bounds=bounds, **opts)
    return sc.sparse_decode(q, kv, index, scale=scale, backend=opts.get("backend"))


@settings(max_examples=40, deadline=None)
@given(case=decode_cases(), data=st.data())
def test_run_equals_select_then_sparse_decode(backend: str, case: Any, data: st.DataObject) -> None:
    backend_takes(backend, case.dtype)
    method = data.draw(st.sampled_from(["exact", "quest"]))
    shared = data.draw(st.booleans())
    sink, window = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    ps = data.draw(st.sampled_from([2, 4])) if method == "quest" else None
    units = case.kv.max_len if ps is None else -(-case.kv.max_len // ps)
    k = data.draw(st.integers(0, units))
    bounds = sc.page_bounds(case.kv, ps, backend=backend) if method == "quest" and data.draw(st.booleans()) else None
    opts = dict(method=method, sink=sink, window=window, shared=shared, backend=backend)
    if bounds is None and ps is not None:
        opts["page_size"] = ps
    plan = sc.DecodePlan(case.q, case.kv, k, bounds=bounds, **opts)
    assert plan.backends == {"select_topk": backend, "sparse_decode": backend}
    for _ in range(2):  # a plan runs many times
        out, lse = plan.run(case.q, case.kv, bounds=bounds)
        want_out, want_lse = _public(case.q, case.kv, k, bounds, **opts)
        assert_close(out, want_out, case.dtype, what="out")
        assert_close(lse, want_lse, "float32", what="lse")
    idx = plan.last_index
    np.testing.assert_array_equal(idx.counts, sc.select_topk(case.q, case.kv, k, bounds=bounds, **opts).counts)


def test_run_on_torch_tensors_and_into_out() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    k, v = (torch.from_numpy(rng.standard_normal((2, 40, 2, 8)).astype(np.float32)) for _ in range(2))
    kv = sc.DenseKV(k, v, torch.tensor([40, 23], dtype=torch.int32))
    q = torch.from_numpy(rng.standard_normal((2, 4, 8)).astype(np.float32))
    plan = sc.DecodePlan(q, kv, 5, sink=1, window=2)
    out, lse = torch.empty(2, 4, 8), torch.empty(2, 4)
    got = plan.run(q, kv, out=(out, lse))
    assert got[0] is out and got[1] is lse
    want = _public(q, kv, 5, sink=1, window=2)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(lse, want[1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_runs_return_half_precision_tensors(dtype: str) -> None:
    """A 16-bit torch plan's launcher path returns tensors of q's dtype (bfloat16 has no NumPy dtype:
    its bits come back as a bfloat16 tensor), equal to the public calls."""
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    rng = np.random.default_rng(12)
    k, v = (torch.from_numpy(rng.standard_normal((2, 40, 2, 8)).astype(np.float32)).to(tdt) for _ in range(2))
    kv = sc.DenseKV(k, v, torch.tensor([40, 23], dtype=torch.int32))
    q = torch.from_numpy(rng.standard_normal((2, 4, 8)).astype(np.float32)).to(tdt)
    plan = sc.DecodePlan(q, kv, 5, sink=1, window=2)
    want = _public(q, kv, 5, sink=1, window=2)
    for _ in range(2):  # the second run takes the launchers
        out, lse = plan.run(q, kv)
        assert out.dtype is tdt and lse.dtype is torch.float32
        torch.testing.assert_close(out, want[0], rtol=0, atol=0)
        torch.testing.assert_close(lse, want[1], rtol=0, atol=0)


def test_run_rejects_another_shape_and_mismatched_bounds() -> None:
    rng = np.random.default_rng(4)
    k, v = (rng.standard_normal((1, 32, 1, 4)).astype(np.float32) for _ in range(2))
    kv = sc.DenseKV(k, v, np.array([32], np.int32))
    q = rng.standard_normal((1, 2, 4)).astype(np.float32)
    plan = sc.DecodePlan(q, kv, 3)
    with pytest.raises(ValueError, match=r"^DecodePlan.run: q \(1, 4, 4\) float32 .* does not match the plan"):
        plan.run(rng.standard_normal((1, 4, 4)).astype(np.float32), kv)
    wider = sc.DenseKV(np.concatenate([k, k], 2), np.concatenate([v, v], 2), np.array([32], np.int32))
    with pytest.raises(ValueError, match=r"with cache rows \(2, 4\) does not match the plan's .* cache rows \(1, 4\)"):
        plan.run(q, wider)
    shorter = sc.DenseKV(k[:, :2], v[:, :2], np.array([2], np.int32))
    with pytest.raises(ValueError, match=r"^DecodePlan.run: k = 3 exceeds the cache's capacity of 2 tokens"):
        plan.run(q, shorter)
    with pytest.raises(ValueError, match=r"^DecodePlan.run: bounds is given; a plan made without bounds"):
        plan.run(q, kv, bounds=sc.page_bounds(kv, 4))
    quest = sc.DecodePlan(q, kv, 1, method="quest", bounds=sc.page_bounds(kv, 4))
    with pytest.raises(ValueError, match=r"^DecodePlan.run: bounds is missing; a plan made with bounds"):
        quest.run(q, kv)
    with pytest.raises(ValueError, match=r"^DecodePlan.run: out's lse has shape \(1,\) float32; expected \(1, 2\)"):
        plan.run(q, kv, out=(np.empty((1, 2, 4), np.float32), np.empty(1, np.float32)))
    with pytest.raises(ValueError, match=r"^select_topk: k = 33 exceeds"):  # the plan validates what it plans
        sc.DecodePlan(q, kv, 33)


def test_run_follows_a_growing_cache() -> None:
    """A decode loop's cache grows by a token a step (transformers' DynamicCache): one plan serves
    every step, each step equal to the public ops on that step's cache."""
    rng = np.random.default_rng(6)
    k, v = (rng.standard_normal((2, 50, 2, 8)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    plan = None
    for s in range(20, 50, 7):
        kv = sc.DenseKV(np.ascontiguousarray(k[:, :s]), np.ascontiguousarray(v[:, :s]), np.array([s, s - 3], np.int32))
        plan = plan or sc.DecodePlan(q, kv, 4, sink=1, window=2, shared=False)
        out, lse = plan.run(q, kv)
        want = _public(q, kv, 4, sink=1, window=2, shared=False)
        np.testing.assert_allclose(out, want[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lse, want[1], rtol=1e-6, atol=1e-6)
        assert plan.last_index.indices.shape[-1] == min(4 + 3, s)


def test_validate_always_checks_every_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs skip data validation unless SPARSECORE_VALIDATE=always asks for it (for debugging)."""
    rng = np.random.default_rng(5)
    k, v = (rng.standard_normal((1, 16, 1, 4)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((1, 1, 4)).astype(np.float32)
    monkeypatch.setenv("SPARSECORE_VALIDATE", "always")  # read when the plan is made
    plan = sc.DecodePlan(q, sc.DenseKV(k, v, np.array([16], np.int32)), 2)
    broken = sc.DenseKV(k, v, np.array([17], np.int32))  # a length past the cache's capacity
    with pytest.raises(ValueError, match=r"lengths\[0\] = 17"):
        plan.run(q, broken)


def test_the_planning_call_checks_its_data() -> None:
    """The constructor runs one real selection: its data is checked as a public call's would be."""
    rng = np.random.default_rng(7)
    k, v = (rng.standard_normal((1, 16, 1, 4)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((1, 1, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 17"):
        sc.DecodePlan(q, sc.DenseKV(k, v, np.array([17], np.int32)), 2)


# ---------------------------------------------------------------- OpPlan


@settings(max_examples=30, deadline=None)
@given(case=sparse_cases(), n=st.integers(0, 9), fmt=st.sampled_from(["ell", "csr"]), data=st.data())
def test_op_plan_runs_equal_the_public_ffn_ops(backend: str, case: Any, n: int, fmt: str,
                                                data: st.DataObject) -> None:
    """An OpPlan of spmm / gated_ffn / spmm_t / sddmm gives what the public op gives, run after run,
    on new data of the plan's shapes (a decode loop's new activations each step)."""
    backend_takes(backend, case.dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    a = case.tiled_ell() if fmt == "ell" else case.csr()
    m, k = case.shape
    dt = np_dtype(case.dtype)
    w = random_values(rng, (k, n), case.dtype)
    x, w_up = random_values(rng, (m, 5), case.dtype), random_values(rng, (k, 5), case.dtype)
    dy = random_values(rng, (m, n), case.dtype)
    plans = {"spmm": ((a, w), sc.spmm), "gated_ffn": ((x, a, w_up, w), sc.gated_ffn),
             "spmm_t": ((a, dy), sc.spmm_t), "sddmm": ((x, w_up, a), sc.sddmm)}
    for op, (args, public) in plans.items():
        plan = sc.OpPlan(op, *args, backend=backend)
        assert plan.backend == backend
        for step in range(2):
            if step:  # new data, same shapes: the launcher path
                args = tuple(np.ascontiguousarray(rng.permutation(v.ravel()).reshape(v.shape)).astype(dt)
                             if type(v) is np.ndarray else v for v in args)
            got = plan.run(*args)
            want = public(*args, backend=backend)
            if op == "sddmm":
                dense = (lambda s: sc.unpack(s, backend="reference")) if fmt == "ell" else sc.csr_to_dense
                got, want = dense(got), dense(want)
            assert_close(got, want, case.dtype, what=op)


def test_op_plan_checks_bounds_and_new_shapes() -> None:
    """A run with the plan's metadata still checks a format's bounds (one compiled pass); a run of
    other shapes is checked in full, as a public call, and refused as one would be."""
    a, w = _spmm_args(2)
    plan = sc.OpPlan("spmm", a, w)
    np.testing.assert_allclose(plan.run(a, w), sc.spmm(a, w), rtol=1e-6)
    bad = sc.TiledELL(a.values, a.cols.copy(), a.counts, a.shape, a.tile, a.overflow, a.sorted)
    bad.cols[0, 0, 0] = 40  # past the tile
    with pytest.raises(ValueError, match=r"cols of tile 0 holds offset 40, out of range"):
        plan.run(bad, w)
    with pytest.raises(ValueError, match=r"^spmm: .*w"):
        plan.run(a, np.zeros((31, 5), np.float32))
    wide = np.ones((32, 7), np.float32)
    np.testing.assert_allclose(plan.run(a, wide), sc.spmm(a, wide), rtol=1e-6)  # a new shape, planned anew
    with pytest.raises(TypeError, match=r"takes 2 arguments \(a, w\), got 1"):
        plan.run(a)
    with pytest.raises(TypeError, match=r"spmm has no argument 'bias'"):
        sc.OpPlan("spmm", a, w, bias=1)
    with pytest.raises(ValueError, match=r"op = 'spmv' is unknown"):
        sc.OpPlan("spmv", a, w)
    p = sc.OpPlan("pack", np.ones((2, 8), np.float32), threshold=0.5, tile=4)
    np.testing.assert_array_equal(sc.unpack(p.run(np.full((2, 8), 0.25, np.float32))), 0)
    assert "pack(x, threshold=0.5, tile=4)" in repr(p)


def test_fast_runs_check_lengths_bounds_and_growth() -> None:
    """Runs with the plan's metadata skip validation but still check what keeps the kernels in
    bounds: each run's lengths, the bounds' page count against a grown cache, k against it."""
    rng = np.random.default_rng(8)
    k, v = (rng.standard_normal((1, 64, 1, 4)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((1, 2, 4)).astype(np.float32)
    lengths = np.array([64], np.int32)
    kv = sc.DenseKV(k, v, lengths)
    bounds = sc.page_bounds(kv, 8)
    plan = sc.DecodePlan(q, kv, 2, method="quest", bounds=bounds)
    for _ in range(3):  # the first run is checked in full; the next ones take the launchers
        out, _ = plan.run(q, kv, bounds=bounds)
        want, _ = _public(q, kv, 2, bounds, method="quest")
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    lengths[0] = 65  # in place, past the capacity
    with pytest.raises(ValueError, match=r"lengths\[0\] = 65"):
        plan.run(q, kv, bounds=bounds)
    lengths[0] = 64
    k2, v2 = (np.concatenate([a, a], 1)[:, :120] for a in (k, v))  # the cache grew to 120 tokens
    grown = sc.DenseKV(k2, v2, np.array([120], np.int32))
    with pytest.raises(ValueError, match=r"bounds hold 8 pages; the cache's capacity of 120 tokens needs 15"):
        plan.run(q, grown, bounds=bounds)  # the launchers' path (same metadata, a capacity they still fit)
    wider = sc.DenseKV(*(np.concatenate([a, a], 1) for a in (k, v)), np.array([128], np.int32))
    with pytest.raises(ValueError, match=r"bounds has kmin/kmax of shape \(1, 8, 1, 4\)"):
        plan.run(q, wider, bounds=bounds)  # a capacity past the launchers' range: checked in full
    b2 = sc.page_bounds(grown, 8)
    out, _ = plan.run(q, grown, bounds=b2)
    np.testing.assert_allclose(out, _public(q, grown, 2, b2, method="quest")[0], rtol=1e-6, atol=1e-6)
    small = sc.DecodePlan(q, kv, 7)
    small.run(q, kv)
    small.run(q, kv)
    tiny = sc.DenseKV(k[:, :6].copy(), v[:, :6].copy(), np.array([6], np.int32))
    with pytest.raises(ValueError, match=r"k = 7 exceeds the cache's capacity of 6 tokens"):
        small.run(q, tiny)


def test_torch_runs_take_the_launchers_and_refuse_gradients() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    q = torch.from_numpy(rng.standard_normal((2, 4, 8)).astype(np.float32))
    plan = None
    for s in (24, 25, 26, 40):  # a growing cache, as transformers' DynamicCache
        k, v = (torch.from_numpy(rng.standard_normal((2, s, 2, 8)).astype(np.float32)) for _ in range(2))
        kv = sc.DenseKV(k, v, torch.tensor([s, s - 1], dtype=torch.int32))
        plan = plan or sc.DecodePlan(q, kv, 3, sink=1, window=2, shared=False)
        for _ in range(2):
            out, lse = plan.run(q, kv)
            want = _public(q, kv, 3, sink=1, window=2, shared=False)
            assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
            torch.testing.assert_close(out, want[0])
            torch.testing.assert_close(lse, want[1])
            assert isinstance(plan.last_index.counts, torch.Tensor)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match=r"q requires grad"):
        plan.run(q, kv)
    with torch.no_grad():
        torch.testing.assert_close(plan.run(q, kv)[0], want[0])


def test_torch_runs_keep_views_of_one_cache_until_a_tensor_moves() -> None:
    """A loop passing one cache of CPU tensors reuses its NumPy views; a tensor re-pointed or resized
    in place (``set_``, ``resize_``) between runs is seen: the run reads the new memory."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    q = torch.from_numpy(rng.standard_normal((1, 4, 8)).astype(np.float32))
    k, v = (torch.from_numpy(rng.standard_normal((1, 32, 2, 8)).astype(np.float32)) for _ in range(2))
    kv = sc.DenseKV(k, v, torch.tensor([30], dtype=torch.int32))
    plan = sc.DecodePlan(q, kv, 4)
    for _ in range(2):
        torch.testing.assert_close(plan.run(q, kv)[0], _public(q, kv, 4)[0])
    assert "_sc_torch_views" in kv.__dict__
    k.set_(torch.from_numpy(rng.standard_normal((1, 32, 2, 8)).astype(np.float32)))  # new memory, same shape
    torch.testing.assert_close(plan.run(q, kv)[0], _public(q, kv, 4)[0])
    v.resize_(1, 32, 2, 8).copy_(torch.from_numpy(rng.standard_normal((1, 32, 2, 8)).astype(np.float32)))
    torch.testing.assert_close(plan.run(q, kv)[0], _public(q, kv, 4)[0])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_run_updates_the_bounds_of_a_growing_cache(kind: str) -> None:
    """update_from: one call is a Quest decode step (bounds update, select, attend), equal to the
    three public calls, step after step on a cache that grows by a token."""
    rng = np.random.default_rng(10)
    cap, start_len = 96, 40
    k, v = (rng.standard_normal((2, cap, 2, 8)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        conv: Any = torch.from_numpy
    else:
        conv = np.asarray
    lengths = np.array([start_len, start_len - 5], np.int32)
    kv = sc.DenseKV(conv(k), conv(v), conv(lengths))
    bounds = sc.page_bounds(kv, 8)
    want_bounds = sc.page_bounds(kv, 8)
    plan = sc.DecodePlan(conv(q), kv, 2, method="quest", window=3, bounds=bounds)
    for _ in range(12):
        before = lengths.copy()
        lengths += 1  # one token appended (the cache's rows were already there)
        out, lse = plan.run(conv(q), kv, bounds=bounds, update_from=conv(before))
        sc.page_bounds(kv, out=want_bounds, start=conv(before))
        want = _public(conv(q), kv, 2, want_bounds, method="quest", window=3)
        np.testing.assert_array_equal(np.asarray(bounds.kmin), np.asarray(want_bounds.kmin))
        np.testing.assert_array_equal(np.asarray(bounds.kmax), np.asarray(want_bounds.kmax))
        np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"start\[1\] = 99; allowed 0 <= start\[b\] <= lengths\[1\]"):
        plan.run(conv(q), kv, bounds=bounds, update_from=conv(np.array([0, 99], np.int32)))
    with pytest.raises(ValueError, match=r"update_from is given without bounds"):
        sc.DecodePlan(conv(q), kv, 2).run(conv(q), kv, update_from=conv(before))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_adaptive_and_int8_plans_equal_the_public_calls(kind: str) -> None:
    """Top-p, int8 and int8 top-p plans run their launchers (after the first, checked run): each
    equals the public ops, run after run, also when the codes are rewritten between runs; codes too
    short for the cache are refused on the fast path too."""
    rng = np.random.default_rng(11)
    k, v = (rng.standard_normal((2, 80, 2, 8)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        conv: Any = torch.from_numpy
    else:
        conv = np.asarray
    kv = sc.DenseKV(conv(k), conv(v), conv(np.array([80, 61], np.int32)))
    adaptive = sc.DecodePlan(conv(q), kv, 20, top_p=0.8, k_min=2, sink=1, window=2)
    codes = sc.quantize_keys(kv)
    int8 = sc.DecodePlan(conv(q), kv, 6, method="int8", codes=codes, rescore=12)
    for _ in range(3):
        out, _ = adaptive.run(conv(q), kv)
        idx = sc.select_topk(conv(q), kv, 20, top_p=0.8, k_min=2, sink=1, window=2)
        np.testing.assert_array_equal(np.asarray(adaptive.last_index.counts), np.asarray(idx.counts))
        np.testing.assert_allclose(np.asarray(out), np.asarray(sc.sparse_decode(conv(q), kv, idx)[0]),
                                   rtol=1e-6, atol=1e-6)
        out, _ = int8.run(conv(q), kv, codes=codes)
        idx = sc.select_topk(conv(q), kv, 6, method="int8", codes=codes, rescore=12)
        np.testing.assert_allclose(np.asarray(out), np.asarray(sc.sparse_decode(conv(q), kv, idx)[0]),
                                   rtol=1e-6, atol=1e-6)
    int8_p = sc.DecodePlan(conv(q), kv, 20, method="int8", codes=codes, top_p=0.8, k_min=2, sink=1)
    assert int8._fast_select is not None and int8_p._fast_select is not None
    for step in range(3):
        if step == 2:  # other keys, the same buffers: the codes rewritten in place, as a decode step does
            np.asarray(kv.k)[...] = rng.standard_normal(k.shape).astype(np.float32)
            sc.quantize_keys(kv, out=codes)
        out, _ = int8_p.run(conv(q), kv, codes=codes)
        idx = sc.select_topk(conv(q), kv, 20, method="int8", codes=codes, top_p=0.8, k_min=2, sink=1)
        np.testing.assert_array_equal(np.asarray(int8_p.last_index.indices), np.asarray(idx.indices))
        np.testing.assert_allclose(np.asarray(out), np.asarray(sc.sparse_decode(conv(q), kv, idx)[0]),
                                   rtol=1e-6, atol=1e-6)
    for method, tail in (("exact", None), ("int8", 3)):  # mass ranking over candidates, on the fast path
        cd = {"codes": codes} if method == "int8" else {}
        opts = dict(method=method, top_p=0.3, k_min=2, sink=1, candidates=30, tail_sample=tail)
        pruned = sc.DecodePlan(conv(q), kv, 20, **opts, **cd)
        assert pruned._fast_select is not None
        for _ in range(2):
            out, _ = pruned.run(conv(q), kv, **cd)
            idx = sc.select_topk(conv(q), kv, 20, **opts, **cd)
            np.testing.assert_array_equal(np.asarray(pruned.last_index.indices), np.asarray(idx.indices))
            np.testing.assert_allclose(np.asarray(out), np.asarray(sc.sparse_decode(conv(q), kv, idx)[0]),
                                       rtol=1e-6, atol=1e-6)
        fixed = sc.select_topk(conv(q), kv, 20, method=method, sink=1, **cd)
        assert (np.asarray(pruned.last_index.counts) <= np.asarray(fixed.counts)).all()
        assert (np.asarray(pruned.last_index.counts) < np.asarray(fixed.counts)).any()  # it pruned
    short = sc.KeyCodes(conv(np.zeros((2, 40, 2, 8), np.int8)), conv(np.ones((2, 40, 2), np.float32)))
    with pytest.raises(ValueError, match="codes"):
        int8_p.run(conv(q), kv, codes=short)


@pytest.mark.parametrize("method", ["exact", "int8"])
def test_mass_ranking_of_every_key_in_a_longer_cache(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``candidates`` below the cache's capacity but at least every sequence's length (a static cache
    is longer than the tokens in it), or above the capacity (a model's context: valid as the cache
    grows), hold every key: the planned and the public call take numba_cpu's one pass over each
    key's mass (its ranking of candidates is never called) and equal the reference's mass ranking,
    fixed k and adaptive."""
    from sparsecore.backends import numba_cpu

    ranker = numba_cpu.SelectTopk._mass_ranker.__func__

    def no_ranking(cls: Any, inp: Any) -> Any:
        _, space = ranker(cls, inp)

        def rank(*args: Any) -> None:
            raise AssertionError("every key is a candidate: the one pass over each key's mass should run")
        return rank, space

    monkeypatch.setattr(numba_cpu.SelectTopk, "_mass_ranker", classmethod(no_ranking))
    rng = np.random.default_rng(5)
    k, v = (rng.standard_normal((2, 80, 2, 8)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((2, 6, 8)).astype(np.float32)
    kv = sc.DenseKV(k, v, np.array([61, 50], np.int32))
    cd = {"codes": sc.quantize_keys(kv)} if method == "int8" else {}
    for c, extra in ((61, {}), (61, dict(top_p=0.7, k_min=2)), (10**6, {}), (10**6, dict(top_p=0.7, k_min=2))):
        opts = dict(method=method, sink=1, window=2, candidates=c, **extra, **cd)
        want = sc.select_topk(q, kv, 9, backend="reference", **opts)
        plan = sc.DecodePlan(q, kv, 9, backend="numba_cpu", **opts)
        for _ in range(2):
            plan.run(q, kv, **cd)
            np.testing.assert_array_equal(plan.last_index.indices, want.indices)
        got = sc.select_topk(q, kv, 9, backend="numba_cpu", **opts)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.counts, want.counts)


@pytest.mark.parametrize("method", ["exact", "int8"])
def test_mass_ranking_plan_follows_a_cache_grown_past_its_candidates(method: str) -> None:
    """A plan of candidates = 50 made on a cache of 40 tokens (every key a candidate) runs on the
    cache grown to 80: the candidates no longer hold every key, the ranking's workspace grows with
    the cache, and each run equals the reference."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 6, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 80, 2, 8)).astype(np.float32) for _ in range(2))
    plan = None
    for n, lengths in ((40, [40, 33]), (80, [80, 71]), (60, [60, 60])):
        kv = sc.DenseKV(k[:, :n].copy(), v[:, :n].copy(), np.array(lengths, np.int32))
        cd = {"codes": sc.quantize_keys(kv)} if method == "int8" else {}
        opts = dict(method=method, sink=1, window=2, candidates=50, tail_sample=3)
        if plan is None:
            plan = sc.DecodePlan(q, kv, 9, backend="numba_cpu", **opts, **cd)
        plan.run(q, kv, **cd)
        want = sc.select_topk(q, kv, 9, backend="reference", **opts, **cd)
        np.testing.assert_array_equal(plan.last_index.indices, want.indices)
