"""The dispatcher, the array-kind rules and the CLI."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch

import sparsecore as sc
from sparsecore import _arrays
from sparsecore.ops import dispatcher as D
from sparsecore.ops import inputs as I


def _spmm_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 20)).astype(dtype)
    x[np.abs(x) < 1] = 0
    return sc.tiled_ell_from_dense(x, tile=8, capacity=2), rng.standard_normal((20, 4)).astype(dtype), x


class _FakeCpu(D.BackendOp):
    """A stand-in host backend that only takes float32 and says so."""

    OP = "spmm"
    NAME = "numba_cpu"
    BACKEND = "numba_cpu"
    DTYPES: ClassVar[tuple[str, ...]] = ("float32",)
    calls: ClassVar[list[str]] = []

    @classmethod
    def run(cls, inp):
        cls.calls.append(cls.NAME)
        return np.full((inp.a.shape[0], inp.w.shape[1]), 7.0, dtype=inp.w.dtype)


class _FakeCpuVariant(_FakeCpu):
    NAME = "numba_cpu_wide"

    @classmethod
    def input_reasons(cls, inp):
        return [] if inp.w.shape[1] >= 4 else [f"needs N >= 4, got N = {inp.w.shape[1]}"]


class _Missing(D.BackendOp):
    OP = "spmm"
    NAME = "cupy"
    BACKEND = "cupy"
    DEVICE = "cuda"

    @classmethod
    def availability_reasons(cls):
        return ["cupy is not installed"]


@pytest.fixture
def fake_backends(monkeypatch):
    D.load_backends()
    # the real registry minus the real accelerated backends, whose names the stand-ins take
    monkeypatch.setitem(D._REGISTRY, "spmm", [c for c in D._REGISTRY["spmm"] if c.BACKEND == "reference"])
    for cls in (_FakeCpu, _FakeCpuVariant, _Missing):
        D.register(cls)
    _FakeCpu.calls.clear()
    monkeypatch.delenv("SPARSECORE_BACKEND", raising=False)
    return _FakeCpu.calls


def test_every_op_has_a_reference_implementation():
    for op in D.OPS:
        names = [c.NAME for c in D.implementations(op)]
        assert "reference" in names, op
        assert D.implementations(op)[-1].NAME == "reference", "the reference is the last resort"


def test_every_op_has_a_public_function_and_a_torch_face():
    import sparsecore.torch as sct

    for op in D.OPS:
        assert op in sc.__all__ and callable(getattr(sc, op)), op
        assert callable(getattr(sct, op)), op


@pytest.mark.parametrize("row", [r for r in D.TABLE if r.example is not None], ids=lambda r: r.name)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_declared_examples_run_on_every_host_backend(row, dtype):
    """An op declared with an example call (its @op row) gets it compiled by warmup and timed by the
    bench; here every host backend that takes the dtype gives the reference's result on it."""
    from tests._util import assert_close

    inp = row.example(np.random.default_rng(0), dtype)
    want = row.reference(inp)
    for cls in D.implementations(row.name):
        if cls.DEVICE == "host" and cls.supports(inp):
            got = D.dispatch(row.inputs(*(getattr(inp, n) for n in inp.__dataclass_fields__ if n != "OP")), cls.NAME)
            assert_close(got, want, dtype, what=f"{row.name} on {cls.NAME}")
    name, call = row.baseline(inp)
    assert name and call() is not None


def test_priority_first_supporting_class_wins(fake_backends):
    a, w, _ = _spmm_args()
    assert (sc.spmm(a, w) == 7).all()
    assert fake_backends == ["numba_cpu"]
    assert D.select(I.SpmmInputs(a, w)).NAME == "numba_cpu"
    a64, w64, x64 = _spmm_args(np.float64)
    assert D.select(I.SpmmInputs(a64, w64)).NAME == "reference"
    np.testing.assert_allclose(sc.spmm(a64, w64), x64 @ w64)


def test_forcing_a_backend_or_a_variant(fake_backends):
    a, w, x = _spmm_args()
    np.testing.assert_allclose(sc.spmm(a, w, backend="reference"), x @ w, rtol=1e-5, atol=1e-5)
    assert D.select(I.SpmmInputs(a, w), "numba_cpu_wide").NAME == "numba_cpu_wide"
    assert D.select(I.SpmmInputs(a, w[:, :2]), "numba_cpu").NAME == "numba_cpu"  # the variant that fits
    with pytest.raises(ValueError, match=r"spmm: backend = 'numba_cpu_wide' cannot run this call:\n"
                                         r"  numba_cpu_wide: needs N >= 4, got N = 2"):
        sc.spmm(a, w[:, :2], backend="numba_cpu_wide")
    a64, w64, _ = _spmm_args(np.float64)
    with pytest.raises(ValueError, match=r"numba_cpu: dtype float64 is not supported \(supported: float32\)"):
        sc.spmm(a64, w64, backend="numba_cpu")
    with pytest.raises(ValueError, match=r"cupy: cupy is not installed"):
        sc.spmm(a, w, backend="cupy")


def test_environment_variable_forces_a_backend(fake_backends, monkeypatch):
    a, w, x = _spmm_args()
    monkeypatch.setenv("SPARSECORE_BACKEND", "reference")
    np.testing.assert_allclose(sc.spmm(a, w), x @ w, rtol=1e-5, atol=1e-5)
    assert fake_backends == []
    assert (sc.spmm(a, w, backend="numba_cpu") == 7).all(), "an explicit backend= beats the variable"


def test_no_backend_lists_every_reason(fake_backends):
    a, w, _ = _spmm_args()
    meta = torch.empty((20, 4), device="meta")
    a_meta = a.map_arrays(lambda t: torch.empty(t.shape, dtype=torch.float32 if t.dtype == np.float32 else
                                                {np.int16: torch.int16, np.int32: torch.int32}[t.dtype.type],
                                                device="meta"))
    with pytest.raises(NotImplementedError) as e:
        sc.spmm(a_meta, meta)
    msg = str(e.value)
    assert msg.startswith("spmm: no backend can run this call (device meta, dtype float32):")
    assert "  cupy: cupy is not installed" in msg
    assert "  numba_cpu: runs on host arrays, the inputs are on meta" in msg
    assert "  reference: runs on host arrays, the inputs are on meta" in msg


def test_register_rejects_bad_classes(fake_backends):
    class Dup(_FakeCpu):
        pass

    with pytest.raises(ValueError, match="spmm already has an implementation named 'numba_cpu'"):
        D.register(Dup)

    class NoOp(_FakeCpu):
        OP = "conv"
        NAME = "x"

    with pytest.raises(ValueError, match=r"NoOp.OP = 'conv' is not an op"):
        D.register(NoOp)


def test_data_validation_runs_on_host_and_can_be_turned_off(monkeypatch):
    a, w, _ = _spmm_args()
    seen = []
    monkeypatch.setattr(I.SpmmInputs, "validate_data", lambda self: seen.append(1))
    sc.spmm(a, w)
    assert seen == [1]
    monkeypatch.setenv("SPARSECORE_VALIDATE", "never")
    sc.spmm(a, w)
    assert seen == [1]
    monkeypatch.setenv("SPARSECORE_VALIDATE", "always")
    sc.spmm(a, w)
    assert seen == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_in_torch_out_zero_copy(dtype):
    t = torch.randn(3, 40).to(dtype)
    view = _arrays.to_numpy(t)
    assert view.__array_interface__["data"][0] == t.data_ptr(), "the host view must not copy"
    back = _arrays.from_numpy(view, "torch")
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr()
    a = sc.pack(t, threshold=0.5)
    assert isinstance(a.values, torch.Tensor) and a.values.dtype == dtype
    assert isinstance(a.cols, torch.Tensor) and a.cols.dtype == torch.int16
    dense = sc.unpack(a)
    assert isinstance(dense, torch.Tensor) and dense.dtype == dtype
    assert torch.equal(dense, torch.where(t.abs() > 0.5, t, torch.zeros((), dtype=dtype)))


def test_tensor_requiring_grad_is_refused_under_grad_mode_and_read_under_no_grad():
    """The public ops record no gradient: a tensor that requires grad would silently lose it, so
    under grad mode it is refused (naming sparsecore.torch's differentiable op); under no_grad it is
    read as a plain tensor."""
    t = torch.randn(2, 16, requires_grad=True)
    w = torch.randn(16, 3)
    with pytest.raises(ValueError, match="pack: x requires grad.*use sparsecore.torch.pack"):
        sc.pack(t)
    with torch.no_grad():
        out = sc.spmm(sc.pack(t), w)
    torch.testing.assert_close(out, t.detach() @ w, rtol=1e-5, atol=1e-5)


def test_info_lists_every_op_and_backend(capsys):
    from sparsecore.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in D.OPS:
        assert f"\n  {op}\n" in out
    for b in D.BACKEND_PRIORITY:
        assert b in out
    assert "numpy" in out and "GPU:" in out


def test_bench_runs_checks_and_writes_json(tmp_path, capsys):
    from sparsecore.cli import main

    path = tmp_path / "bench.json"
    assert main(["bench", "--suite", "ops", "--quick", "--min-time", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out
    data = json.loads(path.read_text())
    ops = {r["op"] for r in data["rows"]}
    assert ops == set(D.OPS) - {"unpack"}
    timed = [r for r in data["rows"] if "median_ms" in r]
    assert all(r["median_ms"] > 0 and r["ok"] for r in timed)
    assert {r["op"] for r in timed if not r["ours"]} == ops  # a dense baseline beside every op
    assert all(r["speedup"] > 0 for r in timed if not r["main"])
    assert data["environment"]["versions"]["numpy"] == np.__version__
