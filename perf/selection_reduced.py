"""Is exact ranking over reduced-precision key copies cheaper than over the keys themselves, on this
host? A measurement of numba kernels, not a timed test (docs/selection.md, "Cheaper scoring").

Per decode step of a model shaped like SmolLM2-135M (30 layers, Hkv 3, group 3, D 64; TopKDecode's
layout of one sequence per KV head), for each context: the time to score every cached key of every
layer (shared selection: the group's queries summed) and take the top k = S/50, from

- ``fp32``: the float32 keys (what ``select_topk(method="exact")`` reads),
- ``bf16``: bfloat16 copies (the top 16 bits of the float32 keys, widened by a shift),
- ``int8``: int8 copies with one float32 scale per (token, head) (``k ~ code * scale``, symmetric,
  ``scale = max|k| / 127``), scored as ``scale[t] * (q . code[t])`` with a float32 query,
- ``int8+rescore``: the int8 ranking's top ``4k`` re-scored exactly from the float32 keys, then top k,

each over 30 distinct layers' buffers (so the keys come from memory, as in a decode step, not from a
cache warmed by the previous call). Also reports how well each ranking agrees with the exact one
on the keys of the real model (``--real``: SmolLM2's cache after a prefill): recall of the exact
top-k set, and the exact softmax mass of the chosen keys over the mass of the exact top-k.

Run::

    NUMBA_NUM_THREADS=1 nice -n 10 python perf/selection_reduced.py \
        --out perf/results/cpu-amd-epyc-2core/selection/reduced.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from sparsecore.backends.numba_cpu.kernels import _take_top

_OPTS = {"cache": True, "nogil": True, "fastmath": {"contract", "reassoc"}}


@njit(**_OPTS)
def score_fp32(qs, keys, out):
    n, d = keys.shape
    for t in range(n):
        acc = np.float32(0)
        for j in range(d):
            acc += qs[j] * keys[t, j]
        out[t] = acc


@njit(**_OPTS)
def score_bf16(qs, bits, out):
    """bfloat16 bits widened to float32 by a 16-bit shift into a row buffer, then the dot product."""
    n, d = bits.shape
    tmp = np.empty(d, np.uint32)
    row = tmp.view(np.float32)
    for t in range(n):
        for j in range(d):
            tmp[j] = np.uint32(bits[t, j]) << np.uint32(16)
        acc = np.float32(0)
        for j in range(d):
            acc += qs[j] * row[j]
        out[t] = acc


@njit(**_OPTS)
def score_int8(qs, codes, scales, out):
    n, d = codes.shape
    for t in range(n):
        acc = np.float32(0)
        for j in range(d):
            acc += qs[j] * np.float32(codes[t, j])
        out[t] = acc * scales[t]


@njit(**_OPTS)
def top(score, k, chosen):
    free = np.ones(score.shape[0], np.bool_)
    chosen[:] = False
    _take_top(score, free, k, chosen)


@njit(**_OPTS)
def rescore(qs, keys, chosen, k, out_chosen):
    """Exact scores of the chosen candidates, then their top k."""
    n, d = keys.shape
    sc = np.full(n, -np.inf, np.float32)
    for t in range(n):
        if chosen[t]:
            acc = np.float32(0)
            for j in range(d):
                acc += qs[j] * keys[t, j]
            sc[t] = acc
    free = chosen.copy()
    out_chosen[:] = False
    _take_top(sc, free, k, out_chosen)


def quantise_int8(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(keys).max(axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(keys / scale[..., None]), -127, 127).astype(np.int8)
    return codes, scale


def to_bf16_bits(keys: np.ndarray) -> np.ndarray:
    u = keys.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def bench(s: int, layers: int, rows: int, d: int, rounds: int, rng: np.random.Generator) -> dict:
    k = max(1, s // 50)
    keys = [rng.standard_normal((s, d)).astype(np.float32) for _ in range(layers * rows)]
    q = rng.standard_normal(d).astype(np.float32)
    codes = [quantise_int8(x) for x in keys]
    bits = [to_bf16_bits(x) for x in keys]
    score = np.empty(s, np.float32)
    chosen = np.zeros(s, np.bool_)
    final = np.zeros(s, np.bool_)
    kinds = ("fp32", "bf16", "int8", "int8+rescore")
    t_score = {n: [] for n in kinds}
    t_total = {n: [] for n in kinds}
    for _ in range(rounds):
        for name in kinds:
            ts = tt = 0.0
            for i in range(layers * rows):
                a = time.perf_counter()
                if name == "fp32":
                    score_fp32(q, keys[i], score)
                elif name == "bf16":
                    score_bf16(q, bits[i], score)
                else:
                    score_int8(q, codes[i][0], codes[i][1], score)
                b = time.perf_counter()
                if name == "int8+rescore":
                    top(score, min(s, 4 * k), chosen)
                    rescore(q, keys[i], chosen, k, final)
                else:
                    top(score, k, chosen)
                c = time.perf_counter()
                ts += b - a
                tt += c - a
            t_score[name].append(ts)
            t_total[name].append(tt)
    med = {n: 1e3 * float(np.median(v)) for n, v in t_score.items()}
    tot = {n: 1e3 * float(np.median(v)) for n, v in t_total.items()}
    return dict(context=s, k=k, layers=layers, rows=rows, head_dim=d, rounds=rounds, score_ms=med, total_ms=tot,
                bytes_per_key={"fp32": 4 * d, "bf16": 2 * d, "int8": d + 4, "int8+rescore": d + 4})


def ranking_quality(s: int, k_div: int = 50) -> dict:
    """Agreement of each reduced ranking with the exact one on SmolLM2's own keys and queries."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import eval_selection as E

    from sparsecore import models
    from sparsecore.torch.patch import patch_model

    model, tok = models.smollm2(verbose=False)
    p = patch_model(model, decode=dict(k=1))
    ids = models.token_windows(tok, "english", s, 1)
    states = E.set_decode(p, dict(k=1), track=False)
    with torch.no_grad():
        c = models.output_cache(p(ids[:, :-1], use_cache=True))
        p(ids[:, -1:], use_cache=True, **models.cache_kwargs(p, c))
    k = max(1, s // k_div)
    res = {n: dict(recall=[], mass_ratio=[]) for n in ("bf16", "int8", "int8+rescore")}
    for st in states:
        q, keys, _, _, scaling = st.last
        hkv, group = keys.shape[1], q.shape[1] // keys.shape[1]
        for h in range(hkv):
            kk = keys[0, h].float().numpy()
            qh = q[0, h * group:(h + 1) * group].float().numpy()
            qs = qh.sum(0)
            logits = (qh @ kk.T) * scaling
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            mass = pr.mean(0)
            exact = kk @ qs
            ex = set(np.argsort(-exact)[:k].tolist())
            best = mass[list(ex)].sum()
            codes, scale = quantise_int8(kk)
            bits = to_bf16_bits(kk)
            approx = {"int8": (codes.astype(np.float32) @ qs) * scale,
                      "bf16": (bits.astype(np.uint32) << 16).view(np.float32) @ qs}
            for name in res:
                if name == "int8+rescore":
                    cand = np.argsort(-approx["int8"])[:4 * k]
                    sel = cand[np.argsort(-exact[cand])[:k]]
                else:
                    sel = np.argsort(-approx[name])[:k]
                res[name]["recall"].append(len(ex & set(sel.tolist())) / k)
                res[name]["mass_ratio"].append(float(mass[sel].sum() / best) if best > 0 else 1.0)
    return dict(context=s, k=k, rows=len(res["int8"]["recall"]),
                **{n: dict(recall=float(np.mean(v["recall"])), min_recall=float(np.min(v["recall"])),
                           mass_ratio=float(np.mean(v["mass_ratio"])), min_mass_ratio=float(np.min(v["mass_ratio"])))
                   for n, v in res.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--real", type=int, nargs="*", default=[4096], help="contexts for the ranking quality")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    bench(256, 1, 1, 64, 1, rng)  # compile
    out = dict(timing=[], ranking=[], threads=os.environ.get("NUMBA_NUM_THREADS"), load_avg=os.getloadavg())
    for s in a.contexts:
        r = bench(s, 30, 3, 64, a.rounds, rng)
        out["timing"].append(r)
        print(json.dumps(r), flush=True)
    for s in a.real:
        r = ranking_quality(s)
        out["ranking"].append(r)
        print(json.dumps(r), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
