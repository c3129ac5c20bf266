"""Host tier: the activation-sparse FFN ops (pack, unpack, spmm, sddmm, spmm_t, gated_ffn) against
plain dense NumPy, computed here in float64 from the values the low-precision inputs really hold.
``sparsecore.reference`` is what is under test, so nothing here calls it directly; sparse inputs
come from the loop builders in ``strategies_ffn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecore as sc
from sparsecore._arrays import dtype_name
from sparsecore.ops import dispatcher as D
from tests._util import TOLERANCES, assert_close, backend_takes, host_backend_params
from tests.strategies_ffn import (
    DTYPES,
    TORCH_DTYPES,
    SparseCase,
    build_tiled_ell,
    case_id,
    factory_cases,
    np_dtype,
    random_values,
    sparse_cases,
    tile_over_capacity,
)

FACTORY_CASES = factory_cases()

#: the host backend the properties hold to plain dense NumPy; every test runs once per backend of
#: HOST_BACKENDS (the reference, which defines every op, and numba_cpu). The torch and dispatch
#: tests use the default.
BACKEND = "reference"


@pytest.fixture(scope="module", autouse=True, params=host_backend_params(variants={"numba_cpu": ("grouped",)}))
def _host_backend(request: pytest.FixtureRequest) -> Any:
    """Each host backend; ``numba_cpu:grouped`` runs numba_cpu with its decode-size row kernels off,
    so the grouped parallel kernels meet the same properties on the same small shapes."""
    global BACKEND
    BACKEND, _, variant = request.param.partition(":")
    mp = pytest.MonkeyPatch()
    if variant == "grouped":
        import sparsecore.backends.numba_cpu as numba_cpu

        mp.setattr(numba_cpu, "ROW_KERNEL_MAX_ROWS", -1)
    D._PLANS.clear()  # a signature's plan keeps the runner made under the other setting
    yield request.param
    mp.undo()
    D._PLANS.clear()
    BACKEND = "reference"


def on(x: Any) -> str:
    """BACKEND, if it takes the value dtype of ``x`` (an array or a sparse format)."""
    return backend_takes(BACKEND, x.dtype if isinstance(x, (sc.TiledELL, sc.CSR)) else dtype_name(x))

# Each sparse input layout an op must accept, built from a case with the independent loop builders.
LAYOUTS: dict[str, Callable[[SparseCase], sc.TiledELL | sc.CSR]] = {
    "tiled_ell": lambda c: c.tiled_ell(),
    "tiled_ell_unsorted": lambda c: c.tiled_ell(sorted=False, rng=np.random.default_rng(c.seed + 1)),
    "csr": lambda c: c.csr(),
    "csr_unsorted": lambda c: c.csr(sorted=False, rng=np.random.default_rng(c.seed + 2)),
}


def f64(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.double().numpy()
    return np.asarray(a).astype(np.float64)


def to_dense(a: sc.TiledELL | sc.CSR) -> np.ndarray:
    return sc.tiled_ell_to_dense(a) if isinstance(a, sc.TiledELL) else sc.csr_to_dense(a)


def assert_result_close(out: Any, want: np.ndarray, dtype: str, scale: np.ndarray, what: str) -> None:
    """assert_close with ``scale`` the magnitude of the summed terms, floored so that a result that
    rounds into the dtype's subnormal range may still be off by half a subnormal step."""
    sub = float(ml_dtypes.finfo(np_dtype(dtype)).smallest_subnormal)
    assert_close(out, want, dtype, what=what, scale=scale + sub / TOLERANCES[dtype][0])


def check_dense_out(out: Any, shape: tuple[int, int], dtype: str, what: str) -> None:
    assert isinstance(out, np.ndarray), f"{what}: returned {type(out).__name__}, expected a NumPy array"
    assert out.shape == shape, f"{what}: shape {out.shape} != {shape}"
    assert out.dtype == np_dtype(dtype), f"{what}: dtype {out.dtype} != {dtype}"


# ---------------------------------------------------------------------------------------------
# pack / unpack


def expected_pack(x: np.ndarray, threshold: float, activation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, dense result in float64) of pack's definition, NaN kept."""
    a = x.astype(np.float64)
    if activation == "relu":
        a = np.maximum(a, 0.0)  # NaN stays NaN
    keep = ~(np.abs(a) <= threshold)
    return keep, np.where(keep, a, 0.0)


def check_pack(x: np.ndarray, threshold: float, activation: str | None, tile: int, capacity: int) -> None:
    what = f"pack(threshold={threshold}, activation={activation}, tile={tile}, capacity={capacity})"
    dtype = np.dtype(x.dtype).name
    keep, want = expected_pack(x, threshold, activation)
    te = sc.pack(x, threshold=threshold, activation=activation, tile=tile, capacity=capacity, backend=on(x))
    assert isinstance(te, sc.TiledELL) and isinstance(te.values, np.ndarray)
    assert te.validate() is te, what
    assert (te.shape, te.tile, te.capacity, te.dtype, te.sorted) == (x.shape, tile, capacity, dtype, True), what

    # counts never exceed capacity; the overflow holds exactly the excess of each tile
    m, k = x.shape
    nt = -(-k // tile)
    kept = np.zeros((m, nt * tile), bool)
    kept[:, :k] = keep
    per_tile = kept.reshape(m, nt, tile).sum(axis=2)
    assert (te.counts <= capacity).all(), f"{what}: a count exceeds capacity"
    np.testing.assert_array_equal(te.counts, np.minimum(per_tile, capacity), err_msg=f"{what}: counts")
    n_over = int(np.maximum(per_tile - capacity, 0).sum())
    assert (0 if te.overflow is None else te.overflow.nnz) == n_over, f"{what}: overflow size"

    # filled slots strictly ascending inside each tile
    for r, t in zip(*np.nonzero(te.counts > 1)):
        c = te.cols[r, t, :te.counts[r, t]].astype(int)
        assert (np.diff(c) > 0).all(), f"{what}: slots of tile [{r}, {t}] not ascending: {c.tolist()}"

    # the exact layout: first `capacity` kept columns of each tile in the slots, the rest overflow
    ref = build_tiled_ell(want.astype(x.dtype), tile, capacity, keep=keep)
    np.testing.assert_array_equal(te.cols, ref.cols, err_msg=f"{what}: cols")
    np.testing.assert_array_equal(f64(te.values), f64(ref.values), err_msg=f"{what}: values")

    # round trip exact, NaN kept
    for name, dense in (("unpack", sc.unpack(te, backend=on(te))), ("tiled_ell_to_dense", sc.tiled_ell_to_dense(te))):
        check_dense_out(dense, x.shape, dtype, f"{what} -> {name}")
        np.testing.assert_array_equal(f64(dense), want, err_msg=f"{what} -> {name}")
    assert int(np.isnan(f64(sc.unpack(te, backend=on(te)))).sum()) == int(np.isnan(x.astype(np.float64)).sum()), \
        f"{what}: NaN dropped"


def with_nans(x: np.ndarray, rng: np.random.Generator, frac: float) -> np.ndarray:
    x = x.copy()
    x[rng.random(x.shape) < frac] = np.nan
    return x


PACK_SETTINGS = [(0.0, None), (0.0, "relu"), (0.4, None), (0.4, "relu")]


@pytest.mark.parametrize("threshold,activation", PACK_SETTINGS)
@pytest.mark.parametrize("case", FACTORY_CASES, ids=case_id)
def test_pack_factories(case: SparseCase, threshold: float, activation: str | None) -> None:
    check_pack(case.dense, threshold, activation, case.tile, case.capacity)


@pytest.mark.parametrize("case", [c for c in FACTORY_CASES if c.mask.any()], ids=case_id)
def test_pack_keeps_nan_factories(case: SparseCase) -> None:
    x = case.dense.copy()
    r, c = np.argwhere(case.mask)[0]
    x[r, c] = np.nan  # the first stored entry
    for activation in (None, "relu"):
        check_pack(x, 0.0, activation, case.tile, case.capacity)
        check_pack(x, 10.0, activation, case.tile, case.capacity)  # NaN survives any threshold


@given(case=sparse_cases(), threshold=st.sampled_from([0.0, 0.1, 0.5, 1.5]),
       activation=st.sampled_from([None, "relu"]), nan_frac=st.sampled_from([0.0, 0.0, 0.1]))
def test_pack_property(case: SparseCase, threshold: float, activation: str | None, nan_frac: float) -> None:
    x = with_nans(case.dense, np.random.default_rng(case.seed), nan_frac) if nan_frac else case.dense
    check_pack(x, threshold, activation, case.tile, case.capacity)


@given(case=sparse_cases(), threshold=st.sampled_from([0.0, 0.3]), activation=st.sampled_from([None, "relu"]),
       nan_frac=st.sampled_from([0.0, 0.1]))
def test_gated_pack_property(case: SparseCase, threshold: float, activation: str | None, nan_frac: float) -> None:
    """gated_pack(gate, up) is pack(act(gate) * up) with the product rounded once from float32."""
    rng = np.random.default_rng(case.seed)
    gate = with_nans(case.dense, rng, nan_frac) if nan_frac else case.dense
    up = random_values(rng, case.shape, case.dtype)
    g = np.maximum(gate, np.zeros((), gate.dtype)) if activation == "relu" else gate
    acc = np.float64 if case.dtype == "float64" else np.float32
    h = (g.astype(acc) * up.astype(acc)).astype(gate.dtype)
    check_pack(h, threshold, None, case.tile, case.capacity)  # the meaning, through pack
    cls = next(c for c in D.implementations("gated_pack") if c.BACKEND == BACKEND)
    be = BACKEND if case.dtype in cls.DTYPES else "reference"  # numba_cpu: float32 only
    got = sc.gated_pack(gate, up, threshold=threshold, activation=activation, tile=case.tile,
                        capacity=case.capacity, backend=be)
    want = sc.pack(h, threshold=threshold, tile=case.tile, capacity=case.capacity, backend="reference")
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.cols, want.cols)
    np.testing.assert_array_equal(f64(got.values), f64(want.values))
    np.testing.assert_array_equal(f64(sc.unpack(got, backend="reference")), f64(sc.unpack(want, backend="reference")))


def test_gated_pack_rejects_mismatched_up() -> None:
    gate = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match=r"^gated_pack: up has shape \(2, 7\) float32; expected \(2, 8\) float32"):
        sc.gated_pack(gate, np.ones((2, 7), np.float32), backend=on(gate))
    with pytest.raises(ValueError, match=r"activation"):
        sc.gated_pack(gate, gate, activation="gelu", backend=on(gate))


@given(case=sparse_cases(), threshold=st.sampled_from([0.0, 0.3, 1.5]), nan_frac=st.sampled_from([0.0, 0.0, 0.1]),
       n=st.integers(1, 9))
def test_threshold_spmm_property(case: SparseCase, threshold: float, nan_frac: float, n: int) -> None:
    """threshold_spmm(x, w) is spmm(pack(x, threshold), w): the entries of x with abs > threshold
    (NaN kept, so its row is NaN) times the rows of W, never the dropped ones."""
    rng = np.random.default_rng(case.seed)
    x = with_nans(case.dense, rng, nan_frac) if nan_frac else case.dense
    w = random_values(rng, (case.shape[1], n), case.dtype)
    keep, xk = expected_pack(x, threshold, None)
    w64 = f64(w)
    with np.errstate(invalid="ignore"):
        want = xk @ w64
        scale = np.abs(xk) @ np.abs(w64)
    out = sc.threshold_spmm(x, w, threshold=threshold, backend=on(x))
    what = f"threshold_spmm(threshold={threshold}, {case.name})"
    check_dense_out(out, (case.shape[0], n), case.dtype, what)
    assert_result_close(out, want, case.dtype, scale, what)
    if not nan_frac:  # the same sums as the two calls it stands for
        a = sc.pack(x, threshold=threshold, backend="reference")
        assert_result_close(out, f64(sc.spmm(a, w, backend="reference")), case.dtype, scale, what)


def test_threshold_spmm_never_multiplies_a_dropped_entry() -> None:
    """A row of W holding inf or NaN only counts where its entry of x is kept (0 * inf is not summed)."""
    x = np.array([[0.1, 2.0, -0.05], [3.0, 0.0, 0.2]], np.float32)
    w = np.array([[np.inf, 1.0], [1.0, 2.0], [np.nan, 3.0]], np.float32)
    be = backend_takes(BACKEND, "float32")
    np.testing.assert_array_equal(sc.threshold_spmm(x, w, threshold=0.5, backend=be), [[2.0, 4.0], [np.inf, 3.0]])


def test_threshold_spmm_rejects_bad_arguments() -> None:
    x = np.ones((2, 8), np.float32)
    w = np.ones((8, 3), np.float32)
    be = backend_takes(BACKEND, "float32")
    with pytest.raises(ValueError, match=r"^threshold_spmm: w has shape \(7, 3\); expected w.shape\[0\] == K = 8"):
        sc.threshold_spmm(x, w[:7], backend=be)
    with pytest.raises(TypeError, match=r"^threshold_spmm: x has dtype float32 but w has float16; they must match"):
        sc.threshold_spmm(x, w.astype(np.float16), backend=be)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^threshold_spmm: threshold = "):
            sc.threshold_spmm(x, w, threshold=bad, backend=be)
    with pytest.raises(ValueError, match=r"^threshold_spmm: x has shape \(8,\); expected 2 dimensions \[M, K\]"):
        sc.threshold_spmm(x[0], w, backend=be)


def _mlp_expected(x: np.ndarray, wgu: np.ndarray, wd: np.ndarray, t_in: float, activation: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(keep_x-masked input, hidden state h) of threshold_mlp's definition in float64, NaN kept."""
    keep_x, xk = expected_pack(x, t_in, None)
    w64 = f64(wgu)
    with np.errstate(invalid="ignore", over="ignore"):
        gu = np.stack([xk[m, keep_x[m]] @ w64[keep_x[m]] for m in range(x.shape[0])])
        g, u = gu[:, :wd.shape[0]], gu[:, wd.shape[0]:]
        h = (g / (1.0 + np.exp(-g)) if activation == "silu" else np.where(g <= 0, 0.0, g)) * u
    return xk, h


@given(m=st.integers(1, 40), d=st.integers(1, 24), k=st.integers(1, 20), n=st.integers(1, 9),
       dtype=st.sampled_from(DTYPES), activation=st.sampled_from(["silu", "relu"]),
       t_in=st.sampled_from([0.0, 0.5, 1.2]), q=st.floats(0.0, 1.0), nan_row=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_threshold_mlp_property(m: int, d: int, k: int, n: int, dtype: str, activation: str, t_in: float, q: float,
                                nan_row: bool, seed: int) -> None:
    """threshold_mlp is the gated MLP of the inputs with abs > input_threshold, whose hidden entries
    with abs > threshold (NaN kept) meet the rows of w_down; kept counts them per row. The threshold
    is put in the middle of a gap between the |h| (the backend computes h in float32: an entry within
    rounding of the threshold may go either way, which the definition allows)."""
    rng = np.random.default_rng(seed)
    x = random_values(rng, (m, d), dtype)
    if nan_row:
        x[rng.integers(m), rng.integers(d)] = np.nan
    wgu = (random_values(rng, (d, 2 * k), "float64") / np.sqrt(d)).astype(np_dtype(dtype))
    wd = random_values(rng, (k, n), dtype)
    _, h = _mlp_expected(x, wgu, wd, t_in, activation)
    mags = np.unique(np.concatenate([[0.0], np.abs(h[np.isfinite(h)])]))
    i = min(int(q * len(mags)), len(mags) - 1)
    hi = mags[i + 1] if i + 1 < len(mags) else mags[i] * 2 + 1
    gap = hi - mags[i]
    if gap <= 1e-2 * (1 + mags[i]):  # too close to call in float32 (or float16 inputs): take the largest gap
        j = int(np.argmax(np.diff(np.append(mags, mags[-1] * 2 + 1))))
        i, hi = j, (mags[j + 1] if j + 1 < len(mags) else mags[j] * 2 + 1)
    threshold = float((mags[i] + hi) / 2)
    keep_h = ~(np.abs(h) <= threshold)
    hk = np.where(keep_h, h, 0.0)
    wd64 = f64(wd)
    with np.errstate(invalid="ignore"):
        want = np.stack([hk[r, keep_h[r]] @ wd64[keep_h[r]] for r in range(m)])
        scale = np.abs(hk) @ np.abs(wd64)
    kept = np.full(m, -1, np.int64)
    be = on(x)
    out = sc.threshold_mlp(x, wgu, wd, input_threshold=t_in, threshold=threshold, activation=activation, kept=kept,
                           backend=be)
    what = f"threshold_mlp({activation}, input_threshold={t_in}, threshold={threshold}, {dtype}, M {m})"
    check_dense_out(out, (m, n), dtype, what)
    # a backend's h carries float32 rounding (its sums over D terms): widen by that much of |h| @ |w_down|
    h_err = 1e-5 * np.nan_to_num(np.abs(h) @ np.abs(wd64), nan=0.0, posinf=0.0)
    assert_result_close(out, want, dtype, scale + h_err, what)
    np.testing.assert_array_equal(kept, keep_h.sum(axis=1), err_msg=what)


def test_threshold_mlp_never_multiplies_a_dropped_entry() -> None:
    """A dropped input never meets w_gate_up and a dropped hidden entry never meets w_down: the
    infinities there do not turn into NaN."""
    x = np.array([[0.1, 2.0]], np.float32)
    wgu = np.array([[np.inf, np.inf, np.nan, 1.0], [1.0, -30.0, 1.0, 1.0]], np.float32)  # D 2, K 2
    wd = np.array([[1.0, 2.0], [np.inf, 1.0]], np.float32)
    be = backend_takes(BACKEND, "float32")
    kept = np.zeros(1, np.int64)
    out = sc.threshold_mlp(x, wgu, wd, input_threshold=0.5, threshold=1e-3, kept=kept, backend=be)
    g = 2.0
    h0 = g / (1 + np.exp(-g)) * 2.0  # hidden 0: silu(2) * 2; hidden 1: silu(-60) * 2, about -1e-25: dropped
    np.testing.assert_allclose(out, [[h0, 2 * h0]], rtol=1e-6)
    assert kept.tolist() == [1]


def test_threshold_mlp_rejects_bad_arguments() -> None:
    x = np.ones((2, 8), np.float32)
    wgu, wd = np.ones((8, 6), np.float32), np.ones((3, 4), np.float32)
    be = backend_takes(BACKEND, "float32")
    with pytest.raises(ValueError, match=r"^threshold_mlp: w_gate_up has shape \(8, 5\); expected \(D, 2K\) = \(8, 6\)"
                       ):
        sc.threshold_mlp(x, wgu[:, :5], wd, backend=be)
    with pytest.raises(TypeError, match=r"^threshold_mlp: .*w_down.*float16"):
        sc.threshold_mlp(x, wgu, wd.astype(np.float16), backend=be)
    for name in ("input_threshold", "threshold"):
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=rf"^threshold_mlp: {name} = "):
                sc.threshold_mlp(x, wgu, wd, backend=be, **{name: bad})
    with pytest.raises(ValueError, match=r"^threshold_mlp: activation"):
        sc.threshold_mlp(x, wgu, wd, activation="gelu", backend=be)
    with pytest.raises(ValueError, match=r"^threshold_mlp: kept has shape \(3,\); expected \(M,\) = \(2,\)"):
        sc.threshold_mlp(x, wgu, wd, kept=np.zeros(3, np.int64), backend=be)
    with pytest.raises(TypeError, match=r"^threshold_mlp: kept has dtype int32; expected int64"):
        sc.threshold_mlp(x, wgu, wd, kept=np.zeros(2, np.int32), backend=be)
    with pytest.raises(ValueError, match=r"^threshold_mlp: x has shape \(8,\); expected 2 dimensions \[M, D\]"):
        sc.threshold_mlp(x[0], wgu, wd, backend=be)


def check_unpack(case: SparseCase, layout: str) -> None:
    te = LAYOUTS[layout](case)
    out = sc.unpack(te, backend=on(te))
    check_dense_out(out, case.shape, case.dtype, f"unpack({layout})")
    np.testing.assert_array_equal(f64(out), case.dense64, err_msg=f"unpack({layout})")


@pytest.mark.parametrize("layout", ["tiled_ell", "tiled_ell_unsorted"])
@pytest.mark.parametrize("case", FACTORY_CASES, ids=case_id)
def test_unpack_factories(case: SparseCase, layout: str) -> None:
    check_unpack(case, layout)


@pytest.mark.parametrize("layout", ["tiled_ell", "tiled_ell_unsorted"])
@given(case=sparse_cases())
def test_unpack_property(case: SparseCase, layout: str) -> None:
    check_unpack(case, layout)


def test_pack_default_capacity() -> None:
    """Default capacity is tile // 8: 5 entries in a tile of 16 keep 2 in slots and 3 in overflow."""
    x = np.zeros((1, 16), np.float32)
    x[0, [1, 3, 5, 7, 9]] = 1
    te = sc.pack(x, tile=16, backend=on(x))
    assert te.capacity == 2 and te.counts.tolist() == [[2]]
    assert te.overflow is not None and te.overflow.indices.tolist() == [5, 7, 9]


def test_pack_numpy_integer_geometry() -> None:
    """NumPy integers are integers: tile=np.int64(16) gets the default capacity 16 // 8 = 2."""
    ones = np.ones((1, 16), np.float32)
    te = sc.pack(ones, tile=np.int64(16), backend=on(ones))
    assert (te.tile, te.capacity) == (16, 2) and te.counts.tolist() == [[2]] and te.overflow.nnz == 14
    te = sc.pack(ones, tile=np.int32(8), capacity=np.int16(8), backend=on(ones))
    assert (te.tile, te.capacity) == (8, 8) and te.overflow is None


# ---------------------------------------------------------------------------------------------
# spmm, spmm_t, sddmm, gated_ffn on sparse inputs built from a case


def check_spmm(case: SparseCase, layout: str, n: int) -> None:
    rng = np.random.default_rng(case.seed + 100)
    m, k = case.shape
    w = random_values(rng, (k, n), case.dtype)
    a64, w64 = case.dense64, w.astype(np.float64)
    out = sc.spmm(LAYOUTS[layout](case), w, backend=on(w))
    what = f"spmm({layout}, {case})"
    check_dense_out(out, (m, n), case.dtype, what)
    assert_result_close(out, a64 @ w64, case.dtype, np.abs(a64) @ np.abs(w64), what)


def check_spmm_t(case: SparseCase, layout: str, n: int) -> None:
    rng = np.random.default_rng(case.seed + 200)
    m, k = case.shape
    dy = random_values(rng, (m, n), case.dtype)
    a64, dy64 = case.dense64, dy.astype(np.float64)
    out = sc.spmm_t(LAYOUTS[layout](case), dy, backend=on(dy))
    what = f"spmm_t({layout}, {case})"
    check_dense_out(out, (k, n), case.dtype, what)
    assert_result_close(out, a64.T @ dy64, case.dtype, np.abs(a64).T @ np.abs(dy64), what)


def check_sddmm(case: SparseCase, layout: str, d: int) -> None:
    rng = np.random.default_rng(case.seed + 300)
    m, k = case.shape
    x, w = random_values(rng, (m, d), case.dtype), random_values(rng, (k, d), case.dtype)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    pattern = LAYOUTS[layout](case)
    res = sc.sddmm(x, w, pattern, backend=on(x))
    what = f"sddmm({layout}, {case})"
    assert type(res) is type(pattern), what
    assert res.validate() is res, what
    assert (res.shape, res.dtype, res.sorted) == (pattern.shape, case.dtype, pattern.sorted), what
    if isinstance(pattern, sc.TiledELL):  # the pattern's structure, unchanged
        assert (res.tile, res.capacity) == (pattern.tile, pattern.capacity), what
        np.testing.assert_array_equal(res.cols, pattern.cols, err_msg=f"{what}: cols")
        np.testing.assert_array_equal(res.counts, pattern.counts, err_msg=f"{what}: counts")
        assert (res.overflow is None) == (pattern.overflow is None), f"{what}: overflow presence"
        ov = [(res.overflow, pattern.overflow)] if pattern.overflow is not None else []
    else:
        ov = [(res, pattern)]
    for r, p in ov:
        np.testing.assert_array_equal(r.indptr, p.indptr, err_msg=f"{what}: indptr")
        np.testing.assert_array_equal(r.indices, p.indices, err_msg=f"{what}: indices")
    mask = case.mask
    assert_result_close(to_dense(res), np.where(mask, x64 @ w64.T, 0.0), case.dtype, np.abs(x64) @ np.abs(w64).T,
                        what)


def check_gated_ffn_case(case: SparseCase, layout: str, d: int, n: int) -> None:
    """The gate is the case's matrix itself (any sign): out = (G * (x @ w_up.T)) @ w_down."""
    rng = np.random.default_rng(case.seed + 400)
    m, k = case.shape
    x = random_values(rng, (m, d), case.dtype)
    w_up, w_down = random_values(rng, (k, d), case.dtype), random_values(rng, (k, n), case.dtype)
    g64, x64, up64, down64 = case.dense64, x.astype(np.float64), w_up.astype(np.float64), w_down.astype(np.float64)
    out = sc.gated_ffn(x, LAYOUTS[layout](case), w_up, w_down, backend=on(x))
    what = f"gated_ffn({layout}, {case})"
    check_dense_out(out, (m, n), case.dtype, what)
    want = (g64 * (x64 @ up64.T)) @ down64
    scale = (np.abs(g64) * (np.abs(x64) @ np.abs(up64).T)) @ np.abs(down64)
    assert_result_close(out, want, case.dtype, scale, what)


OP_CHECKS: dict[str, Callable[[SparseCase, str, int], None]] = {
    "spmm": check_spmm,
    "spmm_t": check_spmm_t,
    "sddmm": check_sddmm,
    "gated_ffn": lambda case, layout, n: check_gated_ffn_case(case, layout, max(n - 1, 0), n),
}


@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", list(OP_CHECKS))
@pytest.mark.parametrize("case", FACTORY_CASES, ids=case_id)
def test_ops_factories(case: SparseCase, op: str, layout: str, n: int) -> None:
    OP_CHECKS[op](case, layout, n)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", list(OP_CHECKS))
@given(case=sparse_cases(), n=st.integers(0, 9))
def test_ops_property(case: SparseCase, op: str, layout: str, n: int) -> None:
    OP_CHECKS[op](case, layout, n)


# ---------------------------------------------------------------------------------------------
# gated_ffn as the dense ReLU-gated FFN it replaces


@st.composite
def ffn_problems(draw: st.DrawFn, dtypes: tuple[str, ...] = DTYPES) -> dict[str, Any]:
    dtype = draw(st.sampled_from(dtypes))
    tile = draw(st.sampled_from((2, 4, 8, 16)))
    return {
        "dtype": dtype, "m": draw(st.integers(0, 12)), "d": draw(st.integers(0, 9)), "k": draw(st.integers(0, 80)),
        "n": draw(st.integers(0, 9)), "tile": tile, "capacity": draw(st.integers(1, min(tile, 3))),
        "gate_layout": draw(st.sampled_from(("pack", "tiled_ell", "csr"))), "seed": draw(st.integers(0, 2**32 - 1)),
    }


def check_dense_ffn(p: dict[str, Any]) -> None:
    """h = relu(x @ w_gate.T) packed into the gate; out = (h * (x @ w_up.T)) @ w_down."""
    rng = np.random.default_rng(p["seed"])
    dtype, m, d, k, n = p["dtype"], p["m"], p["d"], p["k"], p["n"]
    x, w_gate = random_values(rng, (m, d), dtype), random_values(rng, (k, d), dtype)
    w_up, w_down = random_values(rng, (k, d), dtype), random_values(rng, (k, n), dtype)
    x64, up64, down64 = x.astype(np.float64), w_up.astype(np.float64), w_down.astype(np.float64)
    pre = (x64 @ w_gate.astype(np.float64).T).astype(np_dtype(dtype))  # the gate projection, stored in dtype
    h64 = np.maximum(pre.astype(np.float64), 0.0)
    if p["gate_layout"] == "pack":
        gate = sc.pack(pre, activation="relu", tile=p["tile"], capacity=p["capacity"], backend=on(pre))
    else:
        case = SparseCase("ffn", h64.astype(np_dtype(dtype)), p["tile"], p["capacity"])
        gate = LAYOUTS[p["gate_layout"]](case)
    out = sc.gated_ffn(x, gate, w_up, w_down, backend=on(x))
    what = f"gated_ffn vs dense FFN {p}"
    check_dense_out(out, (m, n), dtype, what)
    want = (h64 * (x64 @ up64.T)) @ down64
    scale = (h64 * (np.abs(x64) @ np.abs(up64).T)) @ np.abs(down64)
    assert_result_close(out, want, dtype, scale, what)


@given(p=ffn_problems())
def test_gated_ffn_is_dense_relu_ffn(p: dict[str, Any]) -> None:
    check_dense_ffn(p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate_layout", ["pack", "tiled_ell", "csr"])
def test_gated_ffn_is_dense_relu_ffn_overflowing(dtype: str, gate_layout: str) -> None:
    """tile 2, capacity 1 and about half the gate active: most tiles overflow."""
    check_dense_ffn({"dtype": dtype, "m": 5, "d": 6, "k": 13, "n": 4, "tile": 2, "capacity": 1,
                     "gate_layout": gate_layout, "seed": 7})


# ---------------------------------------------------------------------------------------------
# torch CPU tensors in, torch tensors out, the same values as the NumPy path; backend forcing


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np_dtype("bfloat16"):
        return torch.from_numpy(a.copy().view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def to_numpy(r: Any) -> Any:
    """A result (array, or format of arrays) with every torch tensor turned into NumPy."""
    if isinstance(r, torch.Tensor):
        return r.view(torch.int16).numpy().view(np_dtype("bfloat16")) if r.dtype == torch.bfloat16 else r.numpy()
    if isinstance(r, np.ndarray):
        return r
    return r.map_arrays(to_numpy)


def assert_same_result(got: Any, want: Any, what: str) -> None:
    """Two NumPy results (arrays, or formats of arrays) are identical: dtype, shape and bits."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{what}: {type(got).__name__} is not an array"
        assert (got.dtype, got.shape) == (want.dtype, want.shape), \
            f"{what}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
        g, w = np.ascontiguousarray(got), np.ascontiguousarray(want)
        if g.dtype.itemsize in (2, 4, 8) and g.dtype not in (np.int16, np.int32, np.int64):
            g, w = g.view(f"u{g.dtype.itemsize}"), w.view(f"u{w.dtype.itemsize}")  # bits, NaN included
        np.testing.assert_array_equal(g, w, err_msg=what)
        return
    assert type(got) is type(want), f"{what}: {type(got).__name__} != {type(want).__name__}"
    ga, wa = got.arrays(), want.arrays()
    assert ga.keys() == wa.keys(), f"{what}: buffers {sorted(ga)} != {sorted(wa)}"
    assert (got.shape, got.sorted) == (want.shape, want.sorted), what
    for name in wa:
        assert_same_result(ga[name], wa[name], f"{what}.{name}")


def all_tensors(r: Any) -> list[Any]:
    return [r] if not hasattr(r, "arrays") else list(r.arrays().values())


def assert_torch_twin(t: Any, a: Any, what: str) -> None:
    """``t`` (from torch inputs) holds only CPU torch tensors, bit for bit the NumPy result ``a``."""
    for x in all_tensors(t):
        assert isinstance(x, torch.Tensor) and x.device.type == "cpu", \
            f"{what}: returned {type(x).__name__}, expected a CPU torch.Tensor"
    assert_same_result(to_numpy(t), a, what)


def run_op(op: str, case: SparseCase, layout: str, conv: Callable[[np.ndarray], Any], backend: str | None) -> Any:
    """Run ``op`` on the case's operands, every array passed through ``conv`` (identity or to_torch)."""
    rng = np.random.default_rng(case.seed + 500)
    m, k = case.shape
    kw = {} if backend is None else {"backend": backend}
    if op == "pack":
        return sc.pack(conv(case.dense), threshold=0.1, activation="relu", tile=case.tile, capacity=case.capacity,
                       **kw)
    a = LAYOUTS[layout](case).map_arrays(conv)
    if op == "unpack":
        return sc.unpack(LAYOUTS["tiled_ell"](case).map_arrays(conv), **kw)
    if op == "spmm":
        return sc.spmm(a, conv(random_values(rng, (k, 3), case.dtype)), **kw)
    if op == "spmm_t":
        return sc.spmm_t(a, conv(random_values(rng, (m, 3), case.dtype)), **kw)
    x = conv(random_values(rng, (m, 4), case.dtype))
    if op == "sddmm":
        return sc.sddmm(x, conv(random_values(rng, (k, 4), case.dtype)), a, **kw)
    w_up, w_down = random_values(rng, (k, 4), case.dtype), random_values(rng, (k, 3), case.dtype)
    return sc.gated_ffn(x, a, conv(w_up), conv(w_down), **kw)


ALL_OPS = ("pack", "unpack", "spmm", "spmm_t", "sddmm", "gated_ffn")


def check_torch_path(op: str, case: SparseCase, layout: str) -> None:
    want = run_op(op, case, layout, lambda a: a, None)
    got = run_op(op, case, layout, to_torch, None)
    assert_torch_twin(got, want, f"{op}({layout}, {case}) through torch")


@pytest.mark.parametrize("layout", ["tiled_ell", "csr"])
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("case", factory_cases(TORCH_DTYPES), ids=case_id)
def test_torch_factories(case: SparseCase, op: str, layout: str) -> None:
    check_torch_path(op, case, layout)


@pytest.mark.parametrize("op", ALL_OPS)
@given(case=sparse_cases(TORCH_DTYPES), layout=st.sampled_from(["tiled_ell", "tiled_ell_unsorted", "csr"]))
def test_torch_property(case: SparseCase, op: str, layout: str) -> None:
    check_torch_path(op, case, layout)


def test_torch_gated_ffn_matches_dense_torch() -> None:
    """The FFN written in torch itself, float32 tensors end to end, overflow present."""
    g = torch.Generator().manual_seed(0)
    x, w_gate = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    w_up, w_down = torch.randn(40, 8, generator=g), torch.randn(40, 5, generator=g)
    pre = x @ w_gate.T
    gate = sc.pack(pre, activation="relu", tile=8, capacity=2, backend=on(pre))
    assert isinstance(gate.values, torch.Tensor) and gate.overflow is not None
    out = sc.gated_ffn(x, gate, w_up, w_down, backend=on(x))
    h = torch.relu(pre).double()
    want = (h * (x.double() @ w_up.double().T)) @ w_down.double()
    scale = (h * (x.double().abs() @ w_up.double().abs().T)) @ w_down.double().abs()
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert_close(out, want.numpy(), "float32", what="torch gated_ffn", scale=scale.numpy())


def spy_on_reference(op: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every call that reaches the reference backend's class for ``op``."""
    cls = next(c for c in sc.ops.implementations(op) if c.NAME == "reference")
    calls: list[Any] = []
    run = cls.run

    def spy(klass: Any, inp: Any) -> Any:
        calls.append(inp)
        return run(inp)

    monkeypatch.setattr(cls, "run", classmethod(spy))
    return calls


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_backend_reference_forced(op: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="reference" and SPARSECORE_BACKEND=reference both run the reference (whatever the
    default would pick), give the same bits, and return the kind of array that went in."""
    case = tile_over_capacity("bfloat16" if kind == "torch" else "float32")
    conv = to_torch if kind == "torch" else (lambda a: a)
    monkeypatch.delenv("SPARSECORE_BACKEND", raising=False)
    calls = spy_on_reference(op, monkeypatch)
    forced = run_op(op, case, "tiled_ell", conv, "reference")
    assert len(calls) == 1, f"{op}: backend='reference' did not run the reference backend"
    if kind == "torch":
        for x in all_tensors(forced):
            assert isinstance(x, torch.Tensor), f"{op}: torch in, {type(x).__name__} out"
    else:
        for x in all_tensors(forced):
            assert isinstance(x, np.ndarray), f"{op}: NumPy in, {type(x).__name__} out"
    monkeypatch.setenv("SPARSECORE_BACKEND", "reference")
    env = run_op(op, case, "tiled_ell", conv, None)
    assert len(calls) == 2, f"{op}: SPARSECORE_BACKEND=reference did not run the reference backend"
    assert_same_result(to_numpy(env), to_numpy(forced), f"{op}: SPARSECORE_BACKEND=reference vs backend=")
    monkeypatch.setenv("SPARSECORE_BACKEND", "no_such_backend")
    with pytest.raises(ValueError, match="SPARSECORE_BACKEND = 'no_such_backend' is unknown"):
        run_op(op, case, "tiled_ell", conv, None)
    monkeypatch.delenv("SPARSECORE_BACKEND")
    with pytest.raises(ValueError, match="backend = 'no_such_backend' is unknown"):
        run_op(op, case, "tiled_ell", conv, "no_such_backend")
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# ops read their sparse input's data: a broken format is refused on the host, never computed on


@pytest.mark.parametrize("op", ["unpack", "spmm", "spmm_t", "sddmm", "gated_ffn"])
def test_ops_refuse_invalid_tiled_ell(op: str) -> None:
    case = tile_over_capacity("float32")
    te = case.tiled_ell()
    counts = te.counts.copy()
    counts[1, 0] = te.capacity + 1
    bad = sc.TiledELL(te.values, te.cols, counts, te.shape, te.tile, te.overflow)
    rng = np.random.default_rng(0)
    m, k = case.shape
    calls = {
        "unpack": lambda: sc.unpack(bad),
        "spmm": lambda: sc.spmm(bad, random_values(rng, (k, 2), "float32")),
        "spmm_t": lambda: sc.spmm_t(bad, random_values(rng, (m, 2), "float32")),
        "sddmm": lambda: sc.sddmm(random_values(rng, (m, 2), "float32"), random_values(rng, (k, 2), "float32"), bad),
        "gated_ffn": lambda: sc.gated_ffn(random_values(rng, (m, 2), "float32"), bad,
                                          random_values(rng, (k, 2), "float32"), random_values(rng, (k, 2), "float32")),
    }
    with pytest.raises(ValueError, match="TiledELL.validate"):
        calls[op]()
