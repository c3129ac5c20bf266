"""Does torch.compile make SmolLM2's decode step faster on this host? Dense model, StaticCache,
greedy steps after a dense prefill, eager and compiled (``torch.compile(model.forward,
dynamic=False)``, inductor's default mode) taking turns in one process; median ms per step.

    python perf/torch_compile_step.py [--context 2048] [--rounds 3] [--steps 16] [--json out.json]

The question behind it (docs/real_model.md, "Where the step's time goes"): a decode step spends a
third of its time in the dense projections and in transformers' per-layer code, which no sparsity
touches; compiling the step is the usual way to remove the latter.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

from sparsecore import models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    from transformers import StaticCache

    model, tok = models.smollm2()
    ids = models.token_windows(tok, "english", a.context, 1, skip=0)
    static = StaticCache(config=model.config, max_cache_len=a.context + a.steps + 8)
    print(f"dense prefill of {a.context} tokens...", file=sys.stderr, flush=True)
    with torch.no_grad():
        cache0 = models.output_cache(model(ids[:, :-1], **models.cache_kwargs(model, static), use_cache=True))
    torch.set_num_threads(a.threads)
    compiled = torch.compile(model.forward, dynamic=False)

    def run(fn, n: int) -> list[float]:
        cache, nxt, ts = copy.deepcopy(cache0), ids[:, -1:], []
        with torch.no_grad():
            for i in range(n):
                t0 = time.perf_counter()
                out = fn(nxt, **models.cache_kwargs(model, cache), use_cache=True,
                         cache_position=torch.tensor([a.context - 1 + i]))
                ts.append(time.perf_counter() - t0)
                cache, nxt = models.output_cache(out), out.logits[:, -1:].argmax(-1)
        return ts

    print("compiling the step (a minute or two on a small CPU)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    run(compiled, 3)
    compile_s = time.perf_counter() - t0
    rounds = []
    for r in range(a.rounds):
        eager, comp = run(model.forward, a.steps), run(compiled, a.steps)
        rounds.append(dict(eager_ms=1e3 * statistics.median(eager), compiled_ms=1e3 * statistics.median(comp)))
        print(f"round {r + 1}/{a.rounds}: eager {rounds[-1]['eager_ms']:.1f} ms, compiled "
              f"{rounds[-1]['compiled_ms']:.1f} ms per step", file=sys.stderr, flush=True)
    res = dict(context=a.context, threads=a.threads, steps=a.steps, compile_and_3_steps_s=compile_s, rounds=rounds,
               eager_ms=statistics.median(r["eager_ms"] for r in rounds),
               compiled_ms=statistics.median(r["compiled_ms"] for r in rounds),
               machine=dict(cpu=platform.processor() or platform.machine(), python=platform.python_version(),
                            torch=torch.__version__), command=" ".join(["python"] + sys.argv))
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
