"""The selection methods' own costs per decode step, without the model: the numba_cpu kernels and the
planned decode step (``DecodePlan.run``: select + sparse attention) of each method, over 30 distinct
layers' caches so that the keys come from memory as in a decode step (docs/selection.md, "Time per
decode step"). A measurement, not a timed test.

Shape of SmolLM2-135M (B 1, Hq 9, Hkv 3, D 64, 30 layers), random keys (the time of exact scoring
does not depend on the values; the adaptive budget's count does, so its decode part is indicative):
exact top-k (k = S/50), int8 ranking, Quest with stored bounds (k = S/50/16 pages), the adaptive
budget top_p 0.9 with k <= 2 S/50 over the keys and over the int8 codes, and ranking by attention
mass at k = S/50 (int8): over every key (``candidates=S``) and among the 4 S/50 best by the summed
score (``candidates=4 S/50``), plus torch's dense SDPA over the same caches as the reference. Methods
take turns, round after round; medians and minima in ms per decode step (30 layers)::

    python perf/selection_kernels.py [--context 8192] [--rounds 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import numba
    import torch

    import sparsecore as sc
    from sparsecore.backends.numba_cpu import _lut_for
    from sparsecore.backends.numba_cpu import kernels as kern

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    s, n_layers, b, hq, hkv, d = args.context, args.layers, 1, 9, 3, 64
    rng = np.random.default_rng(0)
    ks = [rng.standard_normal((b, s, hkv, d)).astype(np.float32) for _ in range(n_layers)]
    vs = [rng.standard_normal((b, s, hkv, d)).astype(np.float32) for _ in range(n_layers)]
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    lengths = np.array([s], np.int32)
    kvs = [sc.DenseKV(k, v, lengths) for k, v in zip(ks, vs)]
    codes = [sc.quantize_keys(kv) for kv in kvs]
    bounds = [sc.page_bounds(kv, 16) for kv in kvs]
    k, k2 = s // 50, 2 * (s // 50)
    table, lut = np.arange(b, dtype=np.int32)[:, None], _lut_for("float32")
    ind, cnt = np.empty((b, hkv, k2 + 64), np.int32), np.empty((b, hkv), np.int32)
    none = np.zeros((0, 0, 0), np.float32)
    scale = np.float32(d ** -0.5)

    def kernels(name: str) -> Any:
        if name == "exact":
            return lambda: [kern.select_topk_serial(q, kk, table, lengths, k, 0, 0, True, lut, ind, cnt) for kk in ks]
        if name == "int8":
            return lambda: [kern.select_int8_serial(q, kk, table, lengths, c.codes, c.scales, k, 0, 0, 0, True, lut,
                                                    ind, cnt) for kk, c in zip(ks, codes)]
        if name == "top_p":
            return lambda: [kern.select_top_p_serial(q, kk, table, lengths, none, k2, k2 // 16, 0, 0, True, 0.9, scale,
                                                     lut, ind, cnt) for kk in ks]
        return lambda: [kern.select_top_p_serial(q, c.codes, table, lengths, c.scales, k2, k2 // 16, 0, 0, True, 0.9,
                                                 scale, lut, ind, cnt) for c in codes]

    opts = {"exact": dict(k=k), "int8": dict(k=k, method="int8"), "quest": dict(k=max(1, k // 16), method="quest"),
            "top_p": dict(k=k2, top_p=0.9, k_min=k2 // 16), "int8 top_p": dict(k=k2, top_p=0.9, k_min=k2 // 16,
                                                                              method="int8")}
    opts["int8 mass (every key)"] = dict(k=k, candidates=s, method="int8")
    opts["int8 mass pool4x"] = dict(k=k, candidates=4 * k, method="int8")
    opts["int8 top_p pool2x"] = dict(opts["int8 top_p"], candidates=k2)
    plans = {name: [sc.DecodePlan(q, kv, **o, bounds=bd if name == "quest" else None,
                                  codes=c if "int8" in name else None) for kv, bd, c in zip(kvs, bounds, codes)]
             for name, o in opts.items()}

    def planned(name: str) -> Any:
        def step() -> None:
            for plan, kv, bd, c in zip(plans[name], kvs, bounds, codes):
                if name == "quest":
                    plan.run(q, kv, bounds=bd, update_from=lengths - 1)  # the new token's page, as a step does
                elif "int8" in name:
                    sc.quantize_keys(kv, out=c, start=lengths - 1)  # the new token's codes, as a step does
                    plan.run(q, kv, codes=c)
                else:
                    plan.run(q, kv)
        return step

    qt = torch.from_numpy(q)[:, :, None]
    dense_kv = [(torch.from_numpy(kk).transpose(1, 2).contiguous(), torch.from_numpy(vv).transpose(1, 2).contiguous())
                for kk, vv in zip(ks, vs)]

    def sdpa() -> None:
        for kt, vt in dense_kv:
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    fns = {"dense sdpa": sdpa}
    fns.update({f"kernel {n}": kernels(n) for n in ("exact", "int8", "top_p", "int8 top_p")})
    fns.update({f"step {n}": planned(n) for n in opts})
    for f in fns.values():
        f()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(args.rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[name].append(1e3 * (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in samples.items()) + " ms",
              file=sys.stderr)
    dense = statistics.median(samples["dense sdpa"])
    rows = {n: {"median_ms": statistics.median(v), "min_ms": min(v),
                "fraction_of_dense_sdpa": statistics.median(v) / dense} for n, v in samples.items()}
    for name in opts:  # keys per selection row of the last step (random keys: indicative only)
        rows[f"step {name}"]["mean_keys_per_row"] = float(np.mean([np.mean(np.asarray(p.last_index.counts))
                                                                   for p in plans[name]]))
    for n, r in rows.items():
        print(f"{n:<18} {r['median_ms']:7.1f} ms (min {r['min_ms']:6.1f})  {100 * r['fraction_of_dense_sdpa']:5.1f} % "
              "of dense sdpa")
    if args.json:
        from sparsecore._env import git_commit, host, library_versions

        with open(args.json, "w") as f:
            json.dump({"context": s, "layers": n_layers, "rounds": args.rounds, "rows": rows, "host": host(),
                       "versions": library_versions(), "commit": git_commit(), "command": " ".join(sys.argv)}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
