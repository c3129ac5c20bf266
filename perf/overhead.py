"""Per-call Python overhead at decode sizes: a public call and a planned call, minus the kernel's own time.

    python3 perf/overhead.py [--json PATH] [--threads 1]

Each row times the same work three ways, in one process, interleaved rounds (the minimum of each is
reported with the median): the numba_cpu kernels called directly with prepared buffers (what the
call cannot go below), the planned call (``sc.DecodePlan.run``, on NumPy arrays and on CPU torch
tensors; for spmm ``sc.OpPlan``), and the public call with the default validation
(``SPARSECORE_VALIDATE=auto``: data checks on host inputs) and with ``never`` (bounds checks only),
beside the peers (SciPy CSR and torch dense for spmm; pack then spmm and torch dense for threshold_spmm;
torch SDPA over the whole cache for decode).
The overhead is the call minus the kernel. Targets of the plan/run work: planned <= 10 us, public <= 30 us.
"""

# ruff: noqa: B023  (each closure is timed inside the loop iteration that made it)
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _times(fns: dict[str, Callable[[], Any]], rounds: int = 15, per_round: int = 200) -> dict[str, dict[str, float]]:
    for f in fns.values():
        f()
        f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():  # interleaved: a busy moment slows every variant alike
            t0 = time.perf_counter()
            for _ in range(per_round):
                f()
            samples[name].append((time.perf_counter() - t0) / per_round * 1e6)
    return {k: {"min_us": min(v), "median_us": statistics.median(v)} for k, v in samples.items()}


def spmm_rows() -> list[dict[str, Any]]:
    import sparsecore as sc
    from sparsecore.backends import numba_cpu as nc

    out = []
    rng = np.random.default_rng(0)
    for k, n in ((1536, 576), (5632, 2048)):
        for m in (1, 4, 16):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[rng.random((m, k)) > 0.01] = 0
            w = rng.standard_normal((k, n)).astype(np.float32)
            a = sc.pack(x)
            args = nc._sparse_args(a)
            buf = np.empty((m, n), np.float32)
            kern = nc._k().spmm_rows
            lut = nc._lut_for("float32")

            def kernel(args: Any = args, w: Any = w, buf: Any = buf, kern: Any = kern, lut: Any = lut) -> None:
                kern(*args, w, lut, buf)

            def public(a: Any = a, w: Any = w) -> Any:
                return sc.spmm(a, w)

            plan = sc.OpPlan("spmm", a, w)
            import scipy.sparse as sp
            import torch

            csr = sp.csr_matrix(x)
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            t = _times({"kernel": kernel, "planned": lambda: plan.run(a, w), "public": public,
                        "scipy_csr": lambda: csr @ w, "torch_dense": lambda: xt @ wt})
            os.environ["SPARSECORE_VALIDATE"] = "never"
            t["public_never"] = _times({"public": public})["public"]
            del os.environ["SPARSECORE_VALIDATE"]
            out.append({"op": "spmm", "shape": f"M={m} K={k} N={n} 1%", "row_kernel": nc._row_kernels(a, n), **t})
    return out


def threshold_rows() -> list[dict[str, Any]]:
    """SmolLM2-135M's down projection (K 1536, N 576) with its input thresholded at run time, as a
    SiLU model's training-free sparsity does: ``threshold_spmm`` (one call) beside ``pack`` then
    ``spmm`` (two) and torch's dense ``F.linear``."""
    import torch

    import sparsecore as sc
    from sparsecore.backends import numba_cpu as nc
    from sparsecore.ops.inputs import threshold_f32

    out = []
    rng = np.random.default_rng(2)
    k, n = 1536, 576
    w = rng.standard_normal((k, n)).astype(np.float32)
    wt = torch.from_numpy(np.ascontiguousarray(w.T))
    kern, lut = nc._k().threshold_spmm_rows, nc._lut_for("float32")
    for m in (1, 4, 16):
        for sparsity in (0.5, 0.9):
            x = rng.standard_normal((m, k)).astype(np.float32)
            thr = float(np.quantile(np.abs(x), sparsity))
            t32 = np.float32(threshold_f32(thr))
            buf = np.empty((m, n), np.float32)
            xt = torch.from_numpy(x)
            t = _times({"kernel": lambda: kern(x, t32, w, lut, buf),
                        "public": lambda: sc.threshold_spmm(x, w, threshold=thr),
                        "pack_then_spmm": lambda: sc.spmm(sc.pack(x, threshold=thr), w),
                        "torch_dense": lambda: torch.nn.functional.linear(xt, wt)})
            out.append({"op": "threshold_spmm", "shape": f"M={m} K={k} N={n} {sparsity:.0%} dropped", **t})
    return out


def decode_rows() -> list[dict[str, Any]]:
    import sparsecore as sc
    from sparsecore.backends import numba_cpu as nc

    out = []
    rng = np.random.default_rng(1)
    b, hq, hkv, d = 1, 9, 3, 64  # SmolLM2-135M
    for s in (2048, 8192):
        kk = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
        vv = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
        kv = sc.DenseKV(kk, vv, np.array([s], np.int32))
        q = rng.standard_normal((b, hq, d)).astype(np.float32)
        bounds = sc.page_bounds(kv, 16)
        k_pages = max(1, s // 50 // 16)  # 50x fewer keys
        plan = sc.DecodePlan(q, kv, k_pages, method="quest", bounds=bounds)
        index = plan.last_index
        kern = nc._k()
        lut = nc._lut_for("float32")
        pt = np.arange(b, dtype=np.int32)[:, None]
        ind = np.empty(index.indices.shape, np.int32)
        cnt = np.empty(index.counts.shape, np.int32)
        n_split = nc._n_split(b * hkv, index.k_max * 16, b * hq * d * index.k_max * 16 * 2)
        o_part = np.empty((b, hq, n_split, d), np.float32)
        lse_part = np.empty((b, hq, n_split), np.float32)
        outb = np.empty((b, hq, d), np.float32)
        lseb = np.empty((b, hq), np.float32)
        fw = plan._options["window"]
        fw = max(fw, 1)

        def kernel() -> None:
            kern.select_quest_serial(q, kk, pt, kv.lengths, k_pages, 0, fw, True, 16, bounds.kmin, bounds.kmax, lut,
                                     ind, cnt)
            kern.decode_partial_serial(q, kk, vv, pt, kv.lengths, ind, cnt, 16, False, True, np.float32(d ** -0.5),
                                       n_split, lut, o_part, lse_part)
            if n_split > 1:
                kern.merge_splits_serial(o_part, lse_part, outb, lseb)

        def planned() -> Any:
            return plan.run(q, kv, bounds=bounds)

        import torch

        to_t = torch.from_numpy
        kv_t = sc.DenseKV(to_t(kk), to_t(vv), to_t(kv.lengths))
        q_t = to_t(q)
        bounds_t = sc.PageBounds(to_t(bounds.kmin), to_t(bounds.kmax), 16)
        plan_t = sc.DecodePlan(q_t, kv_t, k_pages, method="quest", bounds=bounds_t)

        def planned_torch() -> Any:
            return plan_t.run(q_t, kv_t, bounds=bounds_t)

        def public() -> Any:
            idx = sc.select_topk(q, kv, k_pages, method="quest", bounds=bounds)
            return sc.sparse_decode(q, kv, idx)

        t = _times({"kernel": kernel, "planned": planned, "planned_torch": planned_torch, "public": public})
        os.environ["SPARSECORE_VALIDATE"] = "never"
        t["public_never"] = _times({"public": public})["public"]
        del os.environ["SPARSECORE_VALIDATE"]
        import torch

        qt = torch.from_numpy(q)[:, :, None]
        kt = torch.from_numpy(kk).transpose(1, 2).contiguous()
        vt = torch.from_numpy(vv).transpose(1, 2).contiguous()
        t["torch_sdpa_dense"] = _times({"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, enable_gqa=True)})["sdpa"]
        out.append({"op": "select_topk(quest, bounds) + sparse_decode", "shape": f"B=1 Hq=9 Hkv=3 D=64 S={s} 50x",
                    **t})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--threads", type=int, default=1, help="numba and torch threads")
    args = p.parse_args()
    import numba
    import torch

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rows = spmm_rows() + threshold_rows() + decode_rows()
    for r in rows:
        k = r["kernel"]["min_us"]
        parts = [f"{r['op']:<44} {r['shape']:<28} kernel {k:7.1f} us"]
        for name in ("planned", "planned_torch", "public", "public_never", "pack_then_spmm", "scipy_csr",
                     "torch_dense", "torch_sdpa_dense"):
            if name in r:
                v = r[name]["min_us"]
                extra = f" (+{v - k:.1f})" if name in ("planned", "planned_torch", "public", "public_never") else ""
                parts.append(f"{name} {v:7.1f}{extra}")
        print("  ".join(parts))
    if args.json:
        from sparsecore._env import git_commit, host, library_versions

        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": args.threads, "host": host(), "versions": library_versions(),
                       "commit": git_commit(), "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
