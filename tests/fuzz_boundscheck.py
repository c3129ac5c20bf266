"""A small fuzz run of the numba_cpu kernels against the reference, meant to run with
``NUMBA_BOUNDSCHECK=1`` (an out-of-bounds read then raises IndexError instead of reading garbage).

    NUMBA_BOUNDSCHECK=1 python -m tests.fuzz_boundscheck --cases 40 --seed 0

Each case draws random valid inputs of every op (float32, float16 and bfloat16 values; a sparse
pattern of another dtype than sddmm's operands; NaN and infinities sprinkled in) and compares
numba_cpu with the reference (non-finite positions must agree). Then it breaks formats in the ways
that used to crash numba_cpu and runs them with ``SPARSECORE_VALIDATE=never``: each must raise a
ValueError from the always-on bounds checks. ``tests/test_reliability.py`` runs it in a subprocess;
CI can call it with a larger budget. Exit status 0 when every case passed.
"""

from __future__ import annotations

import argparse
import os
import sys

import ml_dtypes
import numpy as np

import sparsecore as sc

NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _same(a, b, what: str, tol: float) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not (fa == fb).all() or not (np.isnan(a) == np.isnan(b)).all():
        raise AssertionError(f"{what}: non-finite positions differ")
    if fa.any() and not np.allclose(a[fa], b[fa], rtol=tol, atol=tol * max(1.0, np.abs(b[fb]).max())):
        raise AssertionError(f"{what}: max diff {np.abs(a[fa] - b[fa]).max()}")


def _dense(rng, m: int, k: int, dtype: str, density: float) -> np.ndarray:
    x = rng.uniform(-1, 1, (m, k)) * (rng.random((m, k)) < density)
    if x.size and rng.random() < 0.3:
        x.flat[rng.integers(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return x.astype(NP[dtype])


def ffn_case(rng) -> None:
    dtype = str(rng.choice(list(NP)))
    tol = 1e-4 if dtype == "float32" else 3e-2
    m, k, n = int(rng.integers(0, 6)), int(rng.integers(0, 70)), int(rng.integers(1, 6))
    tile = int(rng.choice([2, 4, 8, 16, 64]))
    cap = int(rng.integers(1, tile + 1))
    x = _dense(rng, m, k, dtype, float(rng.random()))
    thr = float(rng.choice([0.0, 0.3, 1e39]))
    a = sc.pack(x, tile=tile, capacity=cap, threshold=thr, backend="numba_cpu")
    ra = sc.pack(x, tile=tile, capacity=cap, threshold=thr, backend="reference")
    _same(sc.unpack(a, backend="numba_cpu"), sc.unpack(ra, backend="reference"), "pack/unpack", 0)
    for sp in (a, sc.csr_from_dense(sc.unpack(ra, backend="reference"))):
        w = rng.uniform(-1, 1, (k, n)).astype(NP[dtype])
        _same(sc.spmm(sp, w, backend="numba_cpu"), sc.spmm(sp, w, backend="reference"), "spmm", tol * 10)
        dy = rng.uniform(-1, 1, (m, n)).astype(NP[dtype])
        _same(sc.spmm_t(sp, dy, backend="numba_cpu"), sc.spmm_t(sp, dy, backend="reference"), "spmm_t", tol * 10)
        # sddmm with operands of another dtype than the pattern (the pattern's values are unused)
        odt = str(rng.choice(list(NP)))
        xo = rng.uniform(-1, 1, (m, n)).astype(NP[odt])
        wo = rng.uniform(-1, 1, (k, n)).astype(NP[odt])
        got = sc.sddmm(xo, wo, sp, backend="numba_cpu")
        want = sc.sddmm(xo, wo, sp, backend="reference")
        dense = sc.unpack if isinstance(got, sc.TiledELL) else sc.csr_to_dense
        _same(dense(got), dense(want), "sddmm", 3e-2)
        wu = rng.uniform(-1, 1, (k, n)).astype(NP[dtype])
        _same(sc.gated_ffn(dy, sp, wu, w, backend="numba_cpu"), sc.gated_ffn(dy, sp, wu, w, backend="reference"),
              "gated_ffn", tol * 30)


def decode_case(rng) -> None:
    dtype = str(rng.choice(list(NP)))
    tol = 1e-4 if dtype == "float32" else 3e-2
    b, hkv, group = (int(v) for v in rng.integers(1, 3, 3))
    d = int(rng.integers(1, 9))
    ps = int(rng.choice([1, 3, 4]))
    max_pages = int(rng.integers(1, 8))
    lengths = rng.integers(0, max_pages * ps + 1, b).astype(np.int32)
    n_pages = b * max_pages + 1
    kp = rng.uniform(-1, 1, (n_pages, ps, hkv, d))
    vp = rng.uniform(-1, 1, (n_pages, ps, hkv, d))
    if rng.random() < 0.4:
        kp.flat[rng.integers(kp.size)] = rng.choice([np.nan, np.inf, -np.inf])
    table = rng.permutation(n_pages)[:b * max_pages].reshape(b, max_pages).astype(np.int32)
    kv = sc.PagedKV(kp.astype(NP[dtype]), vp.astype(NP[dtype]), table, lengths)
    q = rng.uniform(-1, 1, (b, hkv * group, d)).astype(NP[dtype])
    for shared in (True, False):
        for method, k in (("exact", int(rng.integers(0, max_pages * ps + 1))), ("quest", int(rng.integers(0, 2)))):
            sink, window = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            idx = sc.select_topk(q, kv, k, method=method, sink=sink, window=window, shared=shared, backend="numba_cpu")
            idx.validate(lengths=kv.lengths)
            _same(sc.sparse_decode(q, kv, idx, backend="numba_cpu")[1], sc.sparse_decode(q, kv, idx,
                  backend="reference")[1], "sparse_decode lse", tol)
    _same(sc.dense_decode(q, kv, backend="numba_cpu")[0], sc.dense_decode(q, kv, backend="reference")[0],
          "dense_decode", tol)
    bounds = sc.page_bounds(kv, ps, backend="numba_cpu")
    _same(bounds.kmax, sc.page_bounds(kv, ps, backend="reference").kmax, "page_bounds", 0)
    o = rng.uniform(-1, 1, (b, 3, d)).astype(NP[dtype])
    l1 = rng.choice([0.5, -np.inf, np.nan], (b, 3)).astype(np.float32)
    _same(sc.merge_attention(o, l1, o, l1 * 0 + 1, backend="numba_cpu")[0],
          sc.merge_attention(o, l1, o, l1 * 0 + 1, backend="reference")[0], "merge", tol)
    z = np.zeros((b, 2, 0), NP[dtype])
    sc.merge_attention(z, l1[:, :2], z, l1[:, :2], backend="numba_cpu")  # D = 0


def broken_case(rng) -> None:
    """Formats whose index data point outside the buffers: with validation off, a clear ValueError."""
    big = int(rng.choice([-1, 10**7, 2**31 - 1]))
    calls = [
        lambda: sc.spmm(sc.CSR(np.array([0, 1, 2], np.int32), np.array([0, big], np.int32),
                               np.ones(2, np.float32), (2, 5)), np.ones((5, 3), np.float32), backend="numba_cpu"),
        lambda: sc.spmm(sc.CSR(np.array([0, 1, big], np.int64), np.array([0, 1], np.int64),
                               np.ones(2, np.float32), (2, 5)), np.ones((5, 3), np.float32), backend="numba_cpu"),
        lambda: sc.unpack(sc.TiledELL(np.ones((1, 1, 2), np.float32), np.array([[[0, big % 32768]]], np.int16),
                                      np.array([[2]], np.int32), (1, 4), 4), backend="numba_cpu"),
        lambda: sc.dense_decode(np.ones((1, 1, 2), np.float32),
                                sc.PagedKV(np.ones((2, 2, 1, 2), np.float32), np.ones((2, 2, 1, 2), np.float32),
                                           np.array([[0, big]], np.int32), np.array([4], np.int32)),
                                backend="numba_cpu"),
        lambda: sc.sparse_decode(np.ones((1, 1, 2), np.float32),
                                 sc.DenseKV(np.ones((1, 4, 1, 2), np.float32), np.ones((1, 4, 1, 2), np.float32),
                                            np.array([4], np.int32)),
                                 sc.TopKIndex(np.array([[[0, big]]], np.int32), np.array([[2]], np.int32)),
                                 backend="numba_cpu"),
    ]
    for call in calls:
        try:
            call()
        except ValueError:
            continue
        if big % 32768 < 4 and call is calls[2]:
            continue  # the offset wrapped into the tile: a valid format
        raise AssertionError(f"broken format with index {big} was not refused")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ["SPARSECORE_VALIDATE"] = "never"  # the always-on checks must be enough
    rng = np.random.default_rng(args.seed)
    with np.errstate(all="ignore"):
        for i in range(args.cases):
            for fn in (ffn_case, decode_case, broken_case):
                try:
                    fn(rng)
                except Exception as e:
                    print(f"case {i} ({fn.__name__}, seed {args.seed}): {type(e).__name__}: {e}", file=sys.stderr)
                    raise
    print(f"fuzz: {args.cases} cases x 3 kinds passed (NUMBA_BOUNDSCHECK={os.environ.get('NUMBA_BOUNDSCHECK', '')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
