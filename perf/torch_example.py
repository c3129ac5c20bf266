"""The README's torch example timed: ``relu_gated_ffn`` forward + backward against the same FFN in dense torch.

    python perf/torch_example.py --m 8 --d 64 --k 256                      # the README's first example (random gate)
    python perf/torch_example.py --m 64 --d 576 --k 1536 --threshold 2.33  # a trained-like gate: ~1 % non-zero

``--threshold t`` keeps gate values > t (what an L1-trained gate looks like: most activations zero); the dense
version computes the same function (``relu(z) * (z > t)``). Prints min/median/max ms of 20 repeats and the
gate's density; both results are checked equal first.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsecore.torch.functional import relu_gated_ffn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=8, help="tokens (default 8)")
    ap.add_argument("--d", type=int, default=64, help="model width (default 64)")
    ap.add_argument("--k", type=int, default=256, help="FFN width (default 256)")
    ap.add_argument("--threshold", type=float, default=0.0, help="gate values <= this are zero (default 0: ReLU)")
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats (default 20)")
    ap.add_argument("--scaled", action="store_true", help="weights / sqrt(fan-in) instead of torch.randn")
    a = ap.parse_args()
    torch.manual_seed(0)
    s = (lambda n: n ** -0.5) if a.scaled else (lambda n: 1.0)
    x = torch.randn(a.m, a.d)
    w_gate, w_up = torch.randn(a.k, a.d) * s(a.d), torch.randn(a.k, a.d) * s(a.d)
    w_down = (torch.randn(a.k, a.d) * s(a.k)).requires_grad_()

    def sparse() -> torch.Tensor:
        w_down.grad = None
        out, _ = relu_gated_ffn(x, w_gate, w_up, w_down, threshold=a.threshold)
        out.square().mean().backward()
        return out

    def dense() -> torch.Tensor:
        w_down.grad = None
        z = x @ w_gate.T
        h = torch.relu(z) * (z > a.threshold)
        out = (h * (x @ w_up.T)) @ w_down
        out.square().mean().backward()
        return out

    z = x @ w_gate.T
    density = float(((torch.relu(z) * (z > a.threshold)) != 0).float().mean())
    torch.testing.assert_close(sparse().detach(), dense().detach(), rtol=1e-4, atol=1e-4)
    for name, fn in (("sparse (sparsecore)", sparse), ("dense (torch)", dense)):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        print(f"{name:<22} min {ts[0]:8.3f}  median {ts[len(ts) // 2]:8.3f}  max {ts[-1]:8.3f} ms  "
              f"(M {a.m}, D {a.d}, K {a.k}, gate density {density:.1%})", flush=True)


if __name__ == "__main__":
    main()
