"""``python -m sparsecore bench``: every available backend on a small default suite of shapes, beside
the strongest dense baseline the machine has, each result checked against the reference.

A case is a function of the array kind ("numpy" on the host) returning the op's inputs, the dense
baseline to time beside it, and what to compare. Backends added later are timed automatically: the
suite asks the dispatcher for every class of the op that supports the inputs.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import formats as F
from . import ops
from ._arrays import to_host
from ._env import git_commit, gpus, host, library_versions
from .ops import inputs as I


@dataclass
class Case:
    op: str
    shape: str
    inputs: I.OpInputs
    baseline_name: str
    baseline: Callable[[], Any]
    #: bytes a kernel must move at least and its flops, for GB/s and GFLOP/s
    bytes: float = 0.0
    flops: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _sparse(rng: np.random.Generator, m: int, k: int, density: float, dtype: Any) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(dtype)
    x[rng.random((m, k)) >= density] = 0
    return x


def _np_dense_decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Vectorised float32 dense decode in NumPy: the host baseline for the decode ops."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    out = np.empty((b, hq, d), np.float32)
    for i in range(b):
        n = int(lengths[i])
        qg = q[i].astype(np.float32).reshape(hkv, hq // hkv, d)
        s = np.einsum("hgd,thd->hgt", qg, k[i, :n].astype(np.float32)) / np.sqrt(d)
        p = np.exp(s - s.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        out[i] = np.einsum("hgt,thd->hgd", p, v[i, :n].astype(np.float32)).reshape(hq, d)
    return out


def default_suite(scale: str = "small", seed: int = 0) -> list[Case]:
    """Host cases (NumPy float32). ``scale="small"`` runs in seconds even on the reference."""
    rng = np.random.default_rng(seed)
    big = scale == "large"
    m, k, n = (512, 5632, 2048) if big else (256, 2048, 512)
    dens = 0.01
    f32 = np.float32
    cases: list[Case] = []

    x = _sparse(rng, m, k, dens, f32)
    a = F.tiled_ell_from_dense(x)
    w = rng.standard_normal((k, n)).astype(f32)
    nnz = int((x != 0).sum())
    cases.append(Case("pack", f"M={m} K={k} density={dens:.0%}", I.PackInputs(x), "numpy nonzero",
                      lambda: np.nonzero(x), bytes=x.nbytes + nnz * 6, flops=0))
    cases.append(Case("spmm", f"M={m} K={k} N={n} density={dens:.0%}", I.SpmmInputs(a, w), "numpy dense matmul",
                      lambda: x @ w, bytes=nnz * 6 + nnz * n * 4 + m * n * 4, flops=2.0 * nnz * n))
    try:
        import scipy.sparse as sp

        xs = sp.csr_matrix(x)
        cases.append(Case("spmm", f"M={m} K={k} N={n} density={dens:.0%} (vs scipy)", I.SpmmInputs(a, w),
                          "scipy csr @ dense", lambda: xs @ w, bytes=nnz * 6 + nnz * n * 4 + m * n * 4,
                          flops=2.0 * nnz * n))
    except ImportError:
        pass
    xd = rng.standard_normal((m, n)).astype(f32)
    cases.append(Case("sddmm", f"M={m} K={k} D={n} density={dens:.0%}", I.SddmmInputs(xd, w, a),
                      "numpy dense x @ w.T, masked", lambda: (xd @ w.T) * (x != 0),
                      bytes=nnz * (6 + n * 4), flops=2.0 * nnz * n))
    cases.append(Case("spmm_t", f"M={m} K={k} N={n} density={dens:.0%}", I.SpmmTInputs(a, xd),
                      "numpy dense A.T @ dy", lambda: x.T @ xd, bytes=nnz * 6 + nnz * n * 4 + k * n * 4,
                      flops=2.0 * nnz * n))
    d = n
    w_up = (rng.standard_normal((k, d)) / np.sqrt(d)).astype(f32)
    w_down = (rng.standard_normal((k, d)) / np.sqrt(k)).astype(f32)
    xg = rng.standard_normal((m, d)).astype(f32)
    cases.append(Case("gated_ffn", f"M={m} D={d} K={k} density={dens:.0%}", I.GatedFfnInputs(xg, a, w_up, w_down),
                      "numpy dense gated FFN", lambda: (x * (xg @ w_up.T)) @ w_down,
                      bytes=nnz * 2 * d * 4, flops=4.0 * nnz * d))

    b, hq, hkv, hd, s = (4, 32, 8, 128, 32768) if big else (2, 8, 2, 64, 4096)
    sparsity = 50
    kk = rng.standard_normal((b, s, hkv, hd)).astype(f32)
    vv = rng.standard_normal((b, s, hkv, hd)).astype(f32)
    lengths = np.full(b, s, np.int32)
    kv = F.DenseKV(kk, vv, lengths)
    q = rng.standard_normal((b, hq, hd)).astype(f32)
    topk = s // sparsity
    index = ops.select_topk(q, kv, topk, backend="reference")
    kv_bytes = 2.0 * b * s * hkv * hd * 4
    dd = lambda: _np_dense_decode(q, kk, vv, lengths)
    shape = f"B={b} Hq={hq} Hkv={hkv} D={hd} S={s}"
    cases.append(Case("select_topk", f"{shape} k={topk} exact", I.SelectTopkInputs(q, kv, topk),
                      "numpy dense decode", dd, bytes=kv_bytes / 2, flops=2.0 * b * hq * s * hd))
    cases.append(Case("select_topk", f"{shape} k={topk // 16} quest", I.SelectTopkInputs(q, kv, topk // 16,
                      method="quest", page_size=16), "numpy dense decode", dd, bytes=kv_bytes / 2))
    ps = 16
    bounds = ops.page_bounds(kv, ps, backend="reference")
    pages = -(-s // ps)
    kp = np.pad(kk, ((0, 0), (0, pages * ps - s), (0, 0), (0, 0)), mode="edge").reshape(b, pages, ps, hkv, hd)
    cases.append(Case("page_bounds", f"B={b} Hkv={hkv} D={hd} S={s} page={ps} build", I.PageBoundsInputs(kv, ps),
                      "numpy min/max", lambda: (kp.min(axis=2), kp.max(axis=2)), bytes=kv_bytes / 2))
    last = lengths - 1  # a decode step: the page of the newest token of each sequence

    def np_last_page() -> Any:
        return [(kk[i, t // ps * ps:t + 1].min(axis=0), kk[i, t // ps * ps:t + 1].max(axis=0))
                for i, t in enumerate(last)]

    cases.append(Case("page_bounds", f"B={b} Hkv={hkv} D={hd} S={s} page={ps} decode step",
                      I.PageBoundsInputs(kv, None, bounds, last.astype(np.int32)), "numpy min/max of that page",
                      np_last_page, bytes=b * ps * hkv * hd * 4.0))
    cases.append(Case("select_topk", f"{shape} k={topk // 16} quest stored bounds",
                      I.SelectTopkInputs(q, kv, topk // 16, method="quest", bounds=bounds), "numpy dense decode", dd,
                      bytes=2.0 * b * pages * hkv * hd * 4))
    sel_bytes = 2.0 * b * topk * hkv * hd * 4
    cases.append(Case("sparse_decode", f"{shape} {sparsity}x sparse, shared", I.SparseDecodeInputs(q, kv, index),
                      "numpy dense decode", dd, bytes=sel_bytes, flops=4.0 * b * hq * topk * hd))
    cases.append(Case("dense_decode", shape, I.DenseDecodeInputs(q, kv), "numpy dense decode", dd,
                      bytes=kv_bytes, flops=4.0 * b * hq * s * hd))
    o1 = rng.standard_normal((b, hq, hd)).astype(f32)
    o2 = rng.standard_normal((b, hq, hd)).astype(f32)
    l1 = rng.standard_normal((b, hq)).astype(f32)
    l2 = rng.standard_normal((b, hq)).astype(f32)

    def np_merge() -> Any:
        lse = np.logaddexp(l1, l2)
        return o1 * np.exp(l1 - lse)[..., None] + o2 * np.exp(l2 - lse)[..., None], lse

    cases.append(Case("merge_attention", f"B={b} H={hq} D={hd}", I.MergeAttentionInputs(o1, l1, o2, l2),
                      "numpy formula", np_merge, bytes=3.0 * o1.nbytes + 3 * l1.nbytes))
    return cases


def timeit(fn: Callable[[], Any], *, min_time: float = 0.2, max_repeat: int = 50) -> tuple[float, Any]:
    """Median seconds of ``fn`` after one warm-up call (which also returns the result)."""
    out = fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _flat(out: Any) -> list[np.ndarray]:
    """Every array of a result, as float64 host arrays (formats: their values in stored order)."""
    if isinstance(out, tuple):
        return [a for o in out for a in _flat(o)]
    if isinstance(out, F.TiledELL | F.CSR):
        return [F.tiled_ell_to_dense(out).astype(np.float64) if isinstance(out, F.TiledELL)
                else F.csr_to_dense(out).astype(np.float64)]
    if isinstance(out, F.TopKIndex):
        return [to_host(out.counts).astype(np.float64)]
    if isinstance(out, F.PageBounds):
        return [to_host(out.kmin).astype(np.float64), to_host(out.kmax).astype(np.float64)]
    return [to_host(out).astype(np.float64)]


def max_error(out: Any, ref: Any) -> float:
    errs = []
    for a, b in zip(_flat(out), _flat(ref)):
        fin = np.isfinite(b)
        errs.append(float(np.max(np.abs(a[fin] - b[fin]), initial=0.0)) if a.shape == b.shape else float("inf"))
    return max(errs, default=0.0)


def run(cases: list[Case], *, backends: list[str] | None = None, min_time: float = 0.2) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for case in cases:
        base_t, _ = timeit(case.baseline, min_time=min_time)
        ref_out = ops.select(case.inputs, "reference").apply(case.inputs)
        default = ops.select(case.inputs).NAME
        for cls in ops.implementations(case.op):
            if backends and cls.NAME not in backends and cls.BACKEND not in backends:
                continue
            if cls.DEVICE != case.inputs.device:
                continue  # a device backend on host inputs (or the reverse) is not a comparison
            reasons = cls.not_supported_reasons(case.inputs)
            row = {"op": case.op, "shape": case.shape, "backend": cls.NAME, "baseline": case.baseline_name,
                   "baseline_ms": base_t * 1e3, "default": cls.NAME == default}
            if reasons:
                rows.append({**row, "skipped": "; ".join(reasons)})
                continue
            # the whole public call: validation, dispatch, conversion and the kernel
            t, out = timeit(lambda c=case, n=cls.NAME: ops.dispatch(c.inputs, n), min_time=min_time)
            err = max_error(out, ref_out) if cls.NAME != "reference" else 0.0
            rows.append({**row, "ms": t * 1e3, "speedup": base_t / t, "max_err": err,
                         "GB/s": case.bytes / t / 1e9 if case.bytes else None,
                         "GFLOP/s": case.flops / t / 1e9 if case.flops else None})
    return rows


def check_reference(cases: list[Case]) -> list[str]:
    """The reference against the dense baselines where they compute the same thing."""
    problems = []
    for case in cases:
        if case.op in ("spmm", "spmm_t", "gated_ffn", "dense_decode", "merge_attention", "sddmm"):
            ref_out = ops.select(case.inputs, "reference").apply(case.inputs)
            base = case.baseline()
            ref_first = ref_out[0] if isinstance(ref_out, tuple) else ref_out
            base_first = base[0] if isinstance(base, tuple) else base
            if isinstance(base_first, tuple):
                continue
            err = max_error(ref_first, base_first)
            if not err <= 1e-3 * max(1.0, float(np.max(np.abs(base_first)))):
                problems.append(f"{case.op} {case.shape}: reference differs from {case.baseline_name} by {err:.3g}")
    return problems


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'op':<16}{'shape':<44}{'backend':<14}{'ms':>10}{'baseline ms':>13}{'speedup':>9}{'GB/s':>8}" \
           f"{'max err':>10}  baseline"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "*" if r.get("default") else " "
        if "skipped" in r:
            lines.append(f"{r['op']:<16}{r['shape'][:43]:<44}{r['backend'] + mark:<14}  skipped: {r['skipped']}")
            continue
        gbs = f"{r['GB/s']:.2f}" if r.get("GB/s") else "-"
        lines.append(f"{r['op']:<16}{r['shape'][:43]:<44}{r['backend'] + mark:<14}{r['ms']:>10.3f}"
                     f"{r['baseline_ms']:>13.3f}{r['speedup']:>8.2f}x{gbs:>8}{r['max_err']:>10.2g}  {r['baseline']}")
    lines.append("* = the backend the dispatcher picks by default for these inputs")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return {"host": host(), "gpus": gpus(), "versions": library_versions(), "commit": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(scale: str = "small", json_path: str | None = None, backends: list[str] | None = None,
         min_time: float = 0.2) -> int:
    cases = default_suite(scale)
    problems = check_reference(cases)
    rows = run(cases, backends=backends, min_time=min_time)
    env = environment()
    print(f"sparsecore bench ({scale}) on {env['host']['cpu']}, {env['host']['cores']} cores; "
          f"GPUs: {', '.join(env['gpus']) or 'none'}")
    print(format_table(rows))
    bad = [r for r in rows if "max_err" in r and not r["max_err"] <= 1e-3]
    for r in bad:
        problems.append(f"{r['op']} {r['shape']} on {r['backend']}: max error {r['max_err']:.3g} vs the reference")
    for p in problems:
        print("MISMATCH:", p)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, "scale": scale, "rows": rows, "problems": problems}, f, indent=1,
                      default=float)
        print(f"wrote {json_path}")
    return 1 if problems else 0


__all__ = ["Case", "default_suite", "run", "main", "timeit"]
