"""One-line reprs, nnz/density, sc.explain and the float64 slow-path warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import sparsecore as sc
from sparsecore.ops import explain as E
from sparsecore.ops import inputs as I
from sparsecore.ops.dispatcher import implementations


def _sparse(m: int, k: int, density: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[rng.random((m, k)) >= density] = 0
    return x


@pytest.mark.parametrize("density", [0.0, 0.01, 0.6])
def test_tiled_ell_nnz_density_and_repr(density):
    x = _sparse(5, 700, density)
    a = sc.tiled_ell_from_dense(x, tile=64)
    nnz = int(np.count_nonzero(x))
    assert a.nnz == nnz and a.density == pytest.approx(nnz / x.size)
    text = repr(a)
    assert "\n" not in text and len(text) < 200
    assert text.startswith("TiledELL(5x700 float32, numpy, tile 64, capacity 8")
    assert f"nnz {nnz} ({nnz / x.size:.2%})" in text
    over = 0 if a.overflow is None else a.overflow.nnz
    assert ("no overflow" in text) == (over == 0)
    if over:
        assert f"overflow {over} entries" in text


def test_csr_kv_bounds_topk_reprs():
    x = _sparse(4, 300, 0.05)
    c = sc.csr_from_dense(x)
    assert c.density == pytest.approx(np.count_nonzero(x) / x.size)
    assert repr(c).startswith(f"CSR(4x300 float32, numpy, nnz {c.nnz} (")
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 64, 2, 8)).astype(np.float32)
    lengths = np.array([64, 30], np.int32)
    kv = sc.DenseKV(k, k, lengths)
    assert kv.tokens == 94 and kv.density == pytest.approx(94 / 128)
    assert repr(kv) == "DenseKV(B 2, S 64, Hkv 2, D 8 float32, numpy, 94 tokens (73.44% filled))"
    pk = sc.PagedKV(k.reshape(8, 16, 2, 8), k.reshape(8, 16, 2, 8), np.arange(8, dtype=np.int32).reshape(2, 4),
                    lengths)
    assert repr(pk).startswith("PagedKV(P 8 pages of 16, Hkv 2, D 8 float32, numpy, B 2 x 4 pages, 94 tokens")
    b = sc.page_bounds(kv, 16, backend="reference")
    assert repr(b) == "PageBounds(B 2, P 4 pages of 16, Hkv 2, D 8 float32, numpy)"
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    idx = sc.select_topk(q, kv, 8, backend="reference")
    assert idx.nnz == int(idx.counts.sum())
    assert repr(idx).startswith(f"TopKIndex(B 2, G 2, k_max {idx.k_max} tokens, numpy, selected {idx.nnz} (")
    for obj in (c, kv, pk, b, idx):
        assert "\n" not in repr(obj) and "array(" not in repr(obj)


def test_repr_of_torch_formats_names_the_library():
    torch = pytest.importorskip("torch")
    a = sc.tiled_ell_from_dense(_sparse(2, 64, 0.3)).map_arrays(torch.from_numpy)
    assert ", torch cpu, " in repr(a) and a.nnz == int(a.counts.sum())


def test_explain_names_the_backend_and_every_other_reason():
    x = _sparse(4, 512, 0.05)
    a, w = sc.tiled_ell_from_dense(x), np.ones((512, 16), np.float32)
    ex = sc.explain("spmm", a, w)
    chosen = sc.ops.select(I.SpmmInputs(a, w)).NAME
    assert ex.backend == chosen
    text = str(ex)
    assert f"runs on: {chosen} (the first that can" in text
    for c in implementations("spmm"):
        assert c.NAME in text
        assert ex.reasons[c.NAME] == c.not_supported_reasons(I.SpmmInputs(a, w))
    forced = sc.explain("spmm", a, w, backend="reference")
    assert forced.backend == "reference" and "forced by backend='reference'" in str(forced)


def test_explain_float64_and_invalid_calls():
    x = _sparse(4, 512, 0.05).astype(np.float64)
    a, w = sc.tiled_ell_from_dense(x), np.ones((512, 16))
    ex = sc.explain("spmm", a, w)
    assert ex.backend == "reference"
    if any(c.BACKEND == "numba_cpu" and not c.availability_reasons() for c in implementations("spmm")):
        assert any("float64 inputs run on the NumPy reference" in n for n in ex.notes)
        assert "dtype float64 is not supported" in str(ex)
    bad = sc.explain("spmm", a, w[:3])
    assert bad.backend is None and "w has shape (3, 16)" in bad.error
    with pytest.raises(ValueError, match=r"explain: op = 'spm' is unknown; allowed: pack, gated_pack, unpack, spmm"):
        sc.explain("spm", a, w)
    with pytest.raises(TypeError, match="explain: the arguments do not fit spmm"):
        sc.explain("spmm", a)


def test_slow_path_warning_once_per_op_and_dtype(monkeypatch):
    monkeypatch.setattr(E, "_WARNED", set())
    x = _sparse(2, 64, 0.2).astype(np.float64)
    inp = I.SpmmInputs(sc.tiled_ell_from_dense(x), np.ones((64, 3)))
    inp.validate()
    ref = next(c for c in implementations("spmm") if c.BACKEND == "reference")
    if E.slow_path_note(inp, ref) is None:
        pytest.skip("no compiled host backend here: the reference is not the slow path")
    with pytest.warns(sc.SlowPathWarning, match="float64 inputs run on the NumPy reference"):
        E.warn_if_slow(inp, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E.warn_if_slow(inp, ref)  # once only
        E.warn_if_slow(inp, ref, forced=True)
    assert issubclass(sc.SlowPathWarning, sc.SparsecoreWarning) and issubclass(sc.SparsecoreWarning, UserWarning)
