"""One SmolLM2-135M MLP layer at decode (M = 1): the dense LlamaMLP against ThresholdSparseMLP with 50 %
hidden sparsity, and with input sparsity too (TEAL), interleaved rounds in one process.

    python3 perf/ffn_layer.py [--threads 1] [--m 1] [--input-sparsity 0.4] [--json PATH]

Random weights (the real model's shapes); thresholds are quantiles of this input's own activations, so
the sparsities are exact. Prints min and median microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    p.add_argument("--m", type=int, default=1, help="tokens per call")
    p.add_argument("--sparsity", type=float, default=0.5, help="hidden sparsity")
    p.add_argument("--input-sparsity", type=float, default=0.4)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import numba
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from sparsecore.torch.modules import ThresholdSparseMLP

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = LlamaMLP(LlamaConfig(hidden_size=576, intermediate_size=1536, hidden_act="silu")).eval()
    x = torch.randn(1, args.m, 576)
    with torch.no_grad():
        h = dense.act_fn(dense.gate_proj(x)) * dense.up_proj(x)
        th = float(h.abs().flatten().kthvalue(max(1, int(h.numel() * args.sparsity))).values)
        tx = float(x.abs().flatten().kthvalue(max(1, int(x.numel() * args.input_sparsity))).values)
    hid = ThresholdSparseMLP.from_dense(dense, threshold=th, expected_sparsity=args.sparsity).eval()
    both = ThresholdSparseMLP.from_dense(dense, threshold=th, expected_sparsity=args.sparsity, input_threshold=tx,
                                         expected_input_sparsity=args.input_sparsity).eval()
    fns = {"dense LlamaMLP": lambda: dense(x), f"hidden {args.sparsity:.0%} sparse": lambda: hid(x),
           f"hidden {args.sparsity:.0%} + input {args.input_sparsity:.0%} sparse": lambda: both(x)}
    res: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for _ in range(30):
                f()
        for _ in range(args.rounds):
            for k, f in fns.items():  # interleaved: a busy moment slows every variant alike
                t0 = time.perf_counter()
                for _ in range(100):
                    f()
                res[k].append((time.perf_counter() - t0) / 100 * 1e6)
    rows = [dict(variant=k, min_us=min(v), median_us=statistics.median(v)) for k, v in res.items()]
    for r in rows:
        print(f"{r['variant']:<36} min {r['min_us']:8.1f} us   median {r['median_us']:8.1f} us")
    if args.json:
        from sparsecore._env import host, library_versions

        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, args=vars(args), host=host(), versions=library_versions()), f, indent=1)


if __name__ == "__main__":
    main()
