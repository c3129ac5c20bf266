"""Top-k selection methods on a real model (SmolLM2-135M-Instruct, CPU) at equal average budgets.

Writes ``results.json`` to ``--out`` (and ``tables.md``), in three sections:

1. **quality**: teacher-forced next-token loss change, top-1 agreement and KL against the dense
   model, the fraction of the cached keys read, and the **attention mass kept** (the dense softmax
   of every query head summed over the keys its selection kept, averaged over heads, layers and
   steps), for exact top-k, Quest, int8 ranking (with and without re-scoring), the adaptive budget
   (``top_p``) and exact top-k at the budget the adaptive one really used, at an average budget of
   ``S / div`` keys per selection row.
2. **attention**: time per decode step of the attention alone, summed over the 30 layers, on the
   model's own queries and caches at each context: dense (torch sdpa, and sparsecore's
   ``dense_decode``) against ``select_topk`` + ``sparse_decode`` of each method (a ``DecodePlan``,
   as the patched model runs it), and ``select_topk`` alone.
   The same section times whole decode steps of the patched model from that cache, dense against
   each method.

Every timed variant takes turns with the others, ``--rounds`` times, and the median is reported;
one thread (``--threads``) for torch and numba.

Example (the command behind docs/selection.md)::

    nice -n 10 python examples/eval_selection.py --out perf/results/cpu-amd-epyc-2core/selection
    python examples/eval_selection.py --tables perf/results/cpu-amd-epyc-2core/selection/results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sparsecore as sc
from sparsecore import models
from sparsecore.torch.attention import TopKDecode
from sparsecore.torch.patch import patch_model

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


class Tracked(TopKDecode):
    """A TopKDecode that also records the dense attention mass its selections keep, and the last
    step's inputs (for the attention timing)."""

    track_mass = True

    def reset_stats(self) -> None:
        super().reset_stats()
        self.mass_sum, self.mass_n, self.last = 0.0, 0, None

    def attend(self, q, keys, values, lengths, *, scaling=None):  # type: ignore[override]
        out = super().attend(q, keys, values, lengths, scaling=scaling)
        self.last = (q, keys, values, lengths, scaling)
        if self.track_mass:
            self._add_mass(q, keys, lengths, scaling, self._last_plan.last_index)
        return out

    def _add_mass(self, q, keys, lengths, scaling, index) -> None:
        b, hkv, s, d = keys.shape
        hq = q.shape[1]
        group = hq // hkv
        lens = torch.tensor([int(lengths)] * b if isinstance(lengths, int) else [int(n) for n in lengths])
        scale = scaling if scaling is not None else d ** -0.5
        logits = torch.einsum("bhd,bhsd->bhs", q.float(), keys.float().repeat_interleave(group, 1)) * scale
        logits = logits.masked_fill(torch.arange(s)[None, None] >= lens[:, None, None], float("-inf"))
        p = logits.softmax(-1)  # [b, hq, s]
        ind, cnt = torch.as_tensor(index.indices).long(), torch.as_tensor(index.counts).long()
        ps = index.page_size if index.granularity == "page" else 1
        keep = torch.zeros(ind.shape[0], ind.shape[1], -(-s // ps) * ps, dtype=torch.bool)
        valid = torch.arange(ind.shape[2])[None, None] < cnt[..., None]
        rows = torch.where(valid, ind, 0)
        for o in range(ps):
            keep.scatter_(2, rows * ps + o, valid | keep.gather(2, rows * ps + o))
        keep = keep[..., :s]
        if ind.shape[0] == b * hkv:  # TopKDecode's layout: B * Hkv sequences, the group's heads as heads
            keep = keep.reshape(b, hkv, ind.shape[1], s)
            keep = keep.expand(b, hkv, group, s) if ind.shape[1] == 1 else keep
            keep = keep.reshape(b, hq, s)
        else:  # [B, G, s] with G = Hkv (shared) or Hq
            keep = keep.repeat_interleave(group, 1) if ind.shape[1] == hkv else keep
        self.mass_sum += float((p * keep).sum(-1).mean())
        self.mass_n += 1

    @property
    def mass(self) -> float:
        return self.mass_sum / max(self.mass_n, 1)


class Oracle(Tracked):
    """Not a sparsecore method: a selection made from the **dense** attention of the step (every
    query head's softmax over every key, computed in torch), to bound what any ranking of keys can
    reach at a budget of ``k`` keys per selection row. ``criterion`` ranks the keys of a KV group by:

    - ``"mass"``: the group's mean attention mass (what ``candidates`` estimates);
    - ``"max mass"``: the largest mass of any head of the group;
    - ``"value-weighted mass"``: the mean over the group of ``p[h, t] * |v[t] - o[h]|``, each key's
      first-order share of the output error if dropped (``o`` the dense output);
    - ``"per-head mass"``: each query head its own ``k`` keys of highest mass (``shared=False``).

    The step's output is the softmax attention over the kept keys, in float32; with the suffix
    ``" + tail mean"`` (:data:`TAIL`), the kept keys' dense probabilities times their values plus
    the mass of the dropped keys times the mean of their values (an estimate of the dropped part
    instead of renormalising the kept one)."""

    def __init__(self, criterion: str, **opts: Any) -> None:
        super().__init__(**opts)
        self.criterion = criterion

    def attend(self, q, keys, values, lengths, *, scaling=None):  # type: ignore[override]
        b, hkv, s, d = keys.shape
        hq = q.shape[1]
        g = hq // hkv
        criterion = self.criterion.removesuffix(TAIL)
        lens = torch.tensor([int(lengths)] * b if isinstance(lengths, int) else [int(n) for n in lengths])
        scale = scaling if scaling is not None else d ** -0.5
        kk, vv = keys.float().repeat_interleave(g, 1), values.float().repeat_interleave(g, 1)
        valid = torch.arange(s)[None, None] < lens[:, None, None]
        logits = (torch.einsum("bhd,bhsd->bhs", q.float(), kk) * scale).masked_fill(~valid, float("-inf"))
        p = logits.softmax(-1)  # [b, hq, s]
        k = min(self.k, int(lens.min()))
        if criterion == "per-head mass":
            keep = torch.zeros_like(p, dtype=torch.bool).scatter_(2, p.topk(k, -1).indices, True)
            rows = hq
        else:
            grouped = p.view(b, hkv, g, s)
            if criterion == "mass":
                score = grouped.mean(2)
            elif criterion == "max mass":
                score = grouped.amax(2)
            elif criterion == "value-weighted mass":
                o = torch.einsum("bhs,bhsd->bhd", p, vv)
                score = (p * (vv - o[:, :, None]).norm(dim=-1)).view(b, hkv, g, s).mean(2)
            else:
                raise ValueError(f"Oracle: criterion = {self.criterion!r}")
            score = score.masked_fill(~valid[:, :1].expand(b, hkv, s), float("-inf"))
            keep = torch.zeros_like(score, dtype=torch.bool).scatter_(2, score.topk(k, -1).indices, True)
            keep = keep.repeat_interleave(g, 1)
            rows = hkv
        if self.criterion.endswith(TAIL):  # the kept keys' exact share; the rest on the others' mean value
            rest = (valid & ~keep).float()
            mean = torch.einsum("bhs,bhsd->bhd", rest, vv) / rest.sum(-1, keepdim=True).clamp_min(1)
            kept = p * keep
            out = torch.einsum("bhs,bhsd->bhd", kept, vv) + (1 - kept.sum(-1, keepdim=True)) * mean
        else:
            out = torch.einsum("bhs,bhsd->bhd", logits.masked_fill(~keep, float("-inf")).softmax(-1), vv)
        self._keys_read_host += k * rows * b
        self.keys_total += rows * int(lens.sum())
        self.decode_steps += 1
        if self.track_mass:
            self.mass_sum += float((p * keep).sum(-1).mean())
            self.mass_n += 1
        return out.to(q.dtype)


class MassCurve(Tracked):
    """Dense decode steps (every key kept) that record, per layer, the mean over selection rows of
    the group-mean attention masses sorted in descending order (the first ``k`` entries): the mass
    a ranking by mass keeps at each budget, for :func:`layer_budgets`."""

    def __init__(self, k: int) -> None:
        super().__init__(k=k)
        self.curve, self.rows = torch.zeros(k, dtype=torch.float64), 0

    def attend(self, q, keys, values, lengths, *, scaling=None):  # type: ignore[override]
        b, hkv, s, d = keys.shape
        g = q.shape[1] // hkv
        lens = torch.tensor([int(lengths)] * b if isinstance(lengths, int) else [int(n) for n in lengths])
        scale = scaling if scaling is not None else d ** -0.5
        kk, vv = keys.float().repeat_interleave(g, 1), values.float().repeat_interleave(g, 1)
        valid = torch.arange(s)[None, None] < lens[:, None, None]
        p = (torch.einsum("bhd,bhsd->bhs", q.float(), kk) * scale).masked_fill(~valid, float("-inf")).softmax(-1)
        top = p.view(b, hkv, g, s).mean(2).sort(-1, descending=True).values[..., :self.k]
        self.curve[:top.shape[-1]] += top.double().sum((0, 1))
        self.rows += b * hkv
        return torch.einsum("bhs,bhsd->bhd", p, vv).to(q.dtype)


def layer_budgets(model, ids: torch.Tensor, k: int, steps: int, most: int, least: int, rule: str) -> list[int]:
    """Per-layer budgets with mean ``k`` (each in ``[least, most]``) from the mean sorted mass curves
    of :class:`MassCurve` on the text ``ids`` ([n, S]: a prefill of S - steps - 1 tokens, then
    ``steps`` dense decode steps). ``rule="greedy"``: the most mass kept in all (the budget goes,
    key by key, to the layer whose next key holds the most mass: the L * k largest entries of all
    layers' curves); ``"cover"``: every layer the fewest keys that keep the same mass ``tau``, the
    largest ``tau`` within the budget (a static, per-layer top_p)."""
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    set_decode(patched, None)
    with torch.no_grad():
        cache = models.output_cache(patched(ids[:, :-steps - 1], use_cache=True))
    curves = []
    for m in patched.modules():
        if isinstance(getattr(m, "sparsecore_decode", None), TopKDecode):
            m.sparsecore_decode = MassCurve(most)
            curves.append(m.sparsecore_decode)
    teacher_forced(patched, cache, ids[:, -steps - 1:-1])
    c = torch.stack([mc.curve / max(mc.rows, 1) for mc in curves])  # [L, most]
    n_layers = c.shape[0]
    if rule == "cover":
        cum = c.cumsum(1)

        def need(tau: float) -> list[int]:
            return [min(most, max(least, int((row < tau).sum()) + 1)) for row in cum]

        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(need(mid)) <= n_layers * k else (lo, mid)
        log(f"layer budgets (cover): tau {lo:.4f}")
        return need(lo)
    budgets = [least] * n_layers
    gains = c[:, least:].flatten()
    order = gains.argsort(descending=True)[:max(0, n_layers * k - n_layers * least)]
    for i in order.tolist():
        budgets[i // (most - least)] += 1
    return budgets


#: the oracle criteria (--oracle): labels "oracle <criterion>"
ORACLES = ("mass", "max mass", "value-weighted mass", "per-head mass")
#: an oracle criterion with this suffix puts the mass of the keys it drops on their mean value
TAIL = " + tail mean"


def set_decode(model: torch.nn.Module, opts: dict[str, Any] | None, track: bool = True,
               oracle: str | None = None, layers: set[int] | None = None,
               budgets: list[int] | None = None) -> list[Tracked]:
    """Give every patched attention layer a fresh :class:`Tracked` (or :class:`Oracle`) of ``opts``
    (None: dense); with ``layers``, only those layers (counted from 0) decode sparsely and the
    others densely; with ``budgets``, layer L's ``k`` is ``budgets[L]``. Returns the sparse layers'
    states."""
    states = []
    layer = -1
    for m in model.modules():
        if isinstance(getattr(m, "sparsecore_decode", None), TopKDecode):
            layer += 1
            if opts is None or (layers is not None and layer not in layers):
                m.sparsecore_decode = Tracked(k=1)
                m.sparsecore_decode.enabled = False
            else:
                o = opts if budgets is None else dict(opts, k=budgets[layer])
                m.sparsecore_decode = Tracked(**o) if oracle is None else Oracle(oracle, **o)
            m.sparsecore_decode.track_mass = track
            if m.sparsecore_decode.enabled or opts is None:
                states.append(m.sparsecore_decode)
    return states


def configs(s: int, div: int, top_ps: list[float], sink: int, window: int, page: int, caps: tuple[int, ...] = (4,),
            top_p_methods: tuple[str, ...] = ("exact",), per_head: bool = False, pools: tuple[int, ...] = (),
            tail_sample: int | None = None, oracle: bool = False) -> list[dict[str, Any]]:
    """The methods at an average budget of ``s / div`` keys per selection row (the adaptive budget
    over the exact scores, and with ``"int8"`` in ``top_p_methods`` over the int8 codes' too; for
    each ``pools`` entry P, exact and int8 ranking by attention mass among the P budgets best by the
    summed score, at the budget and as each adaptive budget: ``candidates``; with ``oracle``, the
    :class:`Oracle` selections at the budget)."""
    budget = max(1, s // div)
    out = [dict(label="exact", opts=dict(k=budget)),
           dict(label=f"exact+sink{sink}/win{window}", opts=dict(k=max(1, budget - sink - window), sink=sink,
                                                                  window=window)),
           dict(label="quest", opts=dict(k=max(1, round(budget / page) - 1), method="quest", page_size=page))]
    out.append(dict(label="int8", opts=dict(k=budget, method="int8")))
    out.append(dict(label="int8+rescore", opts=dict(k=budget, method="int8", rescore=min(s, 2 * budget))))
    for method in top_p_methods:
        for p in top_ps:
            for cap in caps:
                label = ("" if method == "exact" else f"{method} ") + (f"top_p {p}" if cap == 4 else
                                                                        f"top_p {p} k<={cap}x")
                opts = dict(k=min(s, cap * budget), k_min=max(1, budget // 8), top_p=p)
                if method != "exact":
                    opts["method"] = method
                out.append(dict(label=label, opts=opts, match=True))
                if per_head:  # each query head its own keys (shared=False) at the same budget per row
                    out.append(dict(label=f"{label} per-head", opts=dict(opts, shared=False), match=True))
                for pool in pools:  # the pool's best by the shared ranking, ranked by mass, cut by top_p
                    extra = {} if tail_sample is None else dict(tail_sample=tail_sample)
                    name = f"{label} {_pool_name(pool)}" + ("" if tail_sample is None else f" tail{tail_sample}")
                    out.append(dict(label=name, opts=dict(opts, candidates=_pool_size(pool, budget, s), **extra),
                                    match=True))
    if oracle:  # the dense attention's own choice at the budget (a bound, not a method)
        out += [dict(label=f"oracle {c}", opts=dict(k=budget), oracle=c) for c in ORACLES + (f"mass{TAIL}",)]
    for pool in pools:  # a fixed budget ranked by mass among the pool
        extra = {} if tail_sample is None else dict(tail_sample=tail_sample)
        for method in ("exact", "int8"):
            name = f"{method} mass {_pool_name(pool)}" + ("" if tail_sample is None else f" tail{tail_sample}")
            opts = dict(k=budget, candidates=_pool_size(pool, budget, s), **extra)
            if method != "exact":
                opts["method"] = method
            out.append(dict(label=name, opts=opts))
            # the same budget with the sink and window forced, as exact+sink/win
            out.append(dict(label=f"{name}+sink{sink}/win{window}",
                            opts=dict(opts, k=max(1, budget - sink - window), sink=sink, window=window)))
    return out


def _pool_name(pool: int) -> str:
    return "every key" if pool == 0 else f"pool{pool}x"


def _pool_size(pool: int, budget: int, s: int) -> int:
    """``candidates`` of a pool of ``pool`` budgets (0: every key; twice the context, so also the keys
    the decode steps add: TopKDecode clamps it to the cache)."""
    return 2 * s if pool == 0 else min(s, pool * budget)


@torch.no_grad()
def teacher_forced(model, cache, feed) -> tuple[torch.Tensor, list[float]]:
    logps, times = [], []
    for t in range(feed.shape[1]):
        t0 = time.perf_counter()
        out = model(feed[:, t:t + 1], use_cache=True, **models.cache_kwargs(model, cache))
        times.append(time.perf_counter() - t0)
        cache = models.output_cache(out)
        logps.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.stack(logps, 1), times


def eval_quality(model, tok, s: int, n_windows: int, batch: int, steps: int, cfgs: list[dict], save,
                 skip_windows: int = 0, each_layer: bool = False,
                 budgets: dict[str, list[int]] | None = None, text: str = "english") -> list[dict]:
    """The quality rows of ``cfgs`` (see the module's docstring); with ``each_layer``, also each
    method with one layer sparse and the others dense, for every layer (what each layer costs);
    ``budgets``: the per-layer ``k`` of each rule, for the configs marked ``layered`` with it;
    ``text``: which of :func:`sparsecore.models.real_text` the windows come from."""
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    n_layers = len(set_decode(patched, None))
    ids_all = models.token_windows(tok, text, s, n_windows, skip=skip_windows * s)
    acc: dict[str, dict[str, Any]] = {}
    dense_nll_all, dense_top_all = [], []

    def run(label: str, opts: dict, cache0, feed, target, dense_lp, dense_nll, dense_top,
            oracle: str | None = None, layers: set[int] | None = None, layered: str | None = None) -> dict:
        t = time.perf_counter()
        states = set_decode(patched, opts, oracle=oracle, layers=layers,
                            budgets=budgets[layered] if layered else None)
        lp, _ = teacher_forced(patched, copy.deepcopy(cache0), feed)
        a = acc.setdefault(label, dict(opts=opts, nll=[], top=[], kl=[], read=[0, 0], mass=[]))
        a["nll"].append(-lp.gather(-1, target[..., None])[..., 0])
        a["top"].append(lp.argmax(-1))
        a["kl"].append((dense_lp.exp() * (dense_lp - lp)).sum(-1))
        read = sum(st.keys_read for st in states), sum(st.keys_total for st in states)
        a["read"][0] += read[0]
        a["read"][1] += read[1]
        a["mass"].append(sum(st.mass for st in states) / len(states))
        log(f"  ctx {s} {label:<26} dloss {float((a['nll'][-1] - dense_nll).mean()):+.4f}  top1 "
            f"{float((a['top'][-1] == dense_top).float().mean()):.3f}  read {read[0] / max(1, read[1]):.4f}  "
            f"mass {a['mass'][-1]:.3f}  ({time.perf_counter() - t:.1f}s)")
        return dict(read=read[0] / max(1, read[1]))

    for b0 in range(0, n_windows, batch):
        ids = ids_all[b0:b0 + batch]
        log(f"quality: context {s}, windows {b0 + 1}-{b0 + ids.shape[0]} of {n_windows}, dense prefill...")
        set_decode(patched, None)
        with torch.no_grad():
            cache0 = models.output_cache(patched(ids[:, :s - steps - 1], use_cache=True))
        feed, target = ids[:, s - steps - 1:s - 1], ids[:, s - steps:s]
        dense_lp, _ = teacher_forced(patched, copy.deepcopy(cache0), feed)
        dense_nll = -dense_lp.gather(-1, target[..., None])[..., 0]
        dense_top = dense_lp.argmax(-1)
        dense_nll_all.append(dense_nll)
        dense_top_all.append(dense_top)
        for cfg in cfgs:
            r = run(cfg["label"], cfg["opts"], cache0, feed, target, dense_lp, dense_nll, dense_top,
                    cfg.get("oracle"), layered=cfg.get("layered"))
            for layer in range(n_layers if each_layer else 0):  # this layer sparse, the others dense
                run(f"{cfg['label']} [layer {layer} only]", cfg["opts"], cache0, feed, target, dense_lp, dense_nll,
                    dense_top, cfg.get("oracle"), {layer})
            if cfg.get("match"):  # exact top-k at the budget the adaptive one really used (this batch)
                k = max(1, round(r["read"] * s))
                run(f"exact @ {cfg['label']}", dict(k=k), cache0, feed, target, dense_lp, dense_nll, dense_top)
        del cache0
    dense_nll, dense_top = torch.cat(dense_nll_all), torch.cat(dense_top_all)
    rows = []
    for label, a in acc.items():
        nll, top, kl = torch.cat(a["nll"]), torch.cat(a["top"]), torch.cat(a["kl"])
        per_window = (nll - dense_nll).mean(1)
        rows.append(dict(context=s, config=label, opts=a["opts"], windows=n_windows, skip_windows=skip_windows,
                         text=text, steps=steps,
                         dense_loss=float(dense_nll.mean()), delta_loss=float((nll - dense_nll).mean()),
                         delta_loss_per_window=[float(x) for x in per_window],
                         # the standard error of the mean loss change, windows as the samples
                         delta_loss_se=float(per_window.std() / len(per_window) ** 0.5) if len(per_window) > 1
                         else None,
                         top1_agreement=float((top == dense_top).float().mean()), kl=float(kl.mean()),
                         read_fraction=a["read"][0] / max(1, a["read"][1]),
                         mass_kept=float(np.mean(a["mass"]))))
    save(rows)
    return rows


def _median_ms(ts: list[float]) -> float:
    return float(np.median(ts)) * 1e3


def _layer_inputs(q, k, v, scaling):
    """One layer's decode inputs in TopKDecode's layout: B * Hkv sequences of one KV head each."""
    b, hkv, s, d = k.shape
    kv = sc.DenseKV(k.reshape(b * hkv, s, 1, d), v.reshape(b * hkv, s, 1, d),
                    torch.full((b * hkv,), s, dtype=torch.int32))
    return q.reshape(b * hkv, -1, d).contiguous(), kv, scaling


def _sel_opts(opts: dict[str, Any], scaling: float | None) -> dict[str, Any]:
    """``opts`` without ``k``; with ``scale`` for an adaptive budget when ``scaling`` is given."""
    o = {n: v for n, v in opts.items() if n != "k"}
    if o.get("top_p") is not None and scaling is not None:
        o["scale"] = scaling
    return o


def eval_attention(model, tok, s: int, cfgs: list[dict], rounds: int, quality_rows: list[dict], save) -> dict:
    """Per-layer attention of one decode step on the model's own q and cache, summed over layers:
    each method is a DecodePlan per layer (select_topk + sparse_decode, as TopKDecode runs it), Quest
    with its per-step bound update (the page of the new token) included."""
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    ids = models.token_windows(tok, "english", s, 1, skip=0)
    states = set_decode(patched, dict(k=1), track=False)
    with torch.no_grad():
        cache = models.output_cache(patched(ids[:, :-1], use_cache=True))
        # one decode step records q, K, V per layer
        patched(ids[:, -1:], use_cache=True, **models.cache_kwargs(patched, cache))
    raw = [st.last for st in states]
    layers = [_layer_inputs(q, k, v, scaling) for q, k, v, _, scaling in raw]
    variants: dict[str, dict[str, Any]] = {}
    matched = {r["config"]: r for r in quality_rows if r["context"] == s}
    for cfg in cfgs:
        if cfg.get("oracle"):  # computed from the dense attention: nothing to time
            continue
        variants[cfg["label"]] = cfg["opts"]
        if cfg.get("match") and f"exact @ {cfg['label']}" in matched:
            variants[f"exact @ {cfg['label']}"] = matched[f"exact @ {cfg['label']}"]["opts"]
    bounds = {label: [sc.page_bounds(kv, o["page_size"]) if o.get("method") == "quest" else None
                      for _, kv, _ in layers] for label, o in variants.items()}
    codes = {label: [sc.quantize_keys(kv) if o.get("method") == "int8" else None for _, kv, _ in layers]
             for label, o in variants.items()}
    plans = {label: [sc.DecodePlan(q, kv, o["k"], scale=scaling, bounds=bd, codes=cd, **_sel_opts(o, None))
                     for (q, kv, scaling), bd, cd in zip(layers, bounds[label], codes[label])]
             for label, o in variants.items()}
    times: dict[str, list[float]] = {n: [] for n in ["dense sdpa", "dense_decode"] + list(variants)}
    sel_times: dict[str, list[float]] = {n: [] for n in variants}
    counts = {n: 0.0 for n in variants}
    with torch.no_grad():
        for r in range(rounds):
            t = time.perf_counter()
            for q, k, v, _, scaling in raw:
                torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=scaling, enable_gqa=True)
            times["dense sdpa"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for q, kv, scaling in layers:
                sc.dense_decode(q, kv, scale=scaling)
            times["dense_decode"].append(time.perf_counter() - t)
            for label, o in variants.items():
                t = time.perf_counter()
                for (q, kv, _), plan, bd, cd in zip(layers, plans[label], bounds[label], codes[label]):
                    if bd is not None:  # Quest: the new token's page is updated every step
                        sc.page_bounds(kv, out=bd, start=kv.lengths - 1)
                    if cd is not None:  # int8: the new token's key is quantised every step
                        sc.quantize_keys(kv, out=cd, start=kv.lengths - 1)
                    plan.run(q, kv, bounds=bd, codes=cd)
                times[label].append(time.perf_counter() - t)
                counts[label] = float(np.mean([float(p.last_index.counts.float().mean()) for p in plans[label]]))
                t = time.perf_counter()
                for (q, kv, scaling), bd, cd in zip(layers, bounds[label], codes[label]):
                    sc.select_topk(q, kv, o["k"], bounds=bd, codes=cd, **_sel_opts(o, scaling))
                sel_times[label].append(time.perf_counter() - t)
            log(f"attention timing, context {s}, round {r + 1}/{rounds}: "
                + ", ".join(f"{n} {1e3 * v[-1]:.1f}" for n, v in times.items()) + " ms")
    step = _step_times(patched, cache, ids, variants, max(2, rounds // 2), steps=4)
    dense = _median_ms(times["dense sdpa"])
    res = dict(context=s, layers=len(layers), rounds=rounds, step_ms=step,
               ms={n: _median_ms(v) for n, v in times.items()},
               select_ms={n: _median_ms(v) for n, v in sel_times.items()},
               mean_count=counts,
               fraction_of_dense_sdpa={n: _median_ms(v) / dense for n, v in times.items()},
               options=variants)
    save(res)
    return res


def _step_times(patched, cache, ids, variants: dict[str, dict[str, Any]], rounds: int, steps: int) -> dict:
    """Whole greedy-fed decode steps of the patched model from ``cache`` (the attention section's),
    dense against each method, taking turns; the median step of the median round, in ms."""
    feed = ids[:, -steps:]
    runs: dict[str, list[float]] = {n: [] for n in ["dense"] + list(variants)}
    for r in range(rounds):
        for label in runs:
            set_decode(patched, None if label == "dense" else variants[label], track=False)
            _, ts = teacher_forced(patched, copy.deepcopy(cache), feed)
            runs[label].append(float(np.median(ts[1:])))
        log(f"step timing, round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * v[-1]:.0f}" for n, v in runs.items())
            + " ms")
    return {n: _median_ms(v) for n, v in runs.items()}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    import numba
    import transformers

    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                numba=numba.__version__, transformers=transformers.__version__, commit=commit,
                load_avg=os.getloadavg())


def tables(res: dict) -> str:
    out = []
    for s in sorted({r["context"] for r in res.get("quality", [])}):
        rows = [r for r in res["quality"] if r["context"] == s]
        r0 = rows[0]
        out.append(f"**Context {s}** ({r0['windows']} windows x {r0['steps']} teacher-forced steps; dense loss "
                   f"{r0['dense_loss']:.3f})\n")
        out.append("| method | keys read | attention mass kept | loss change (nats, ± s.e. over windows) | "
                   "top-1 agreement | KL |")
        out.append("|---|---|---|---|---|---|")
        for r in rows:
            se = "" if r.get("delta_loss_se") is None else f" ± {r['delta_loss_se']:.3f}"
            out.append(f"| {r['config']} | {100 * r['read_fraction']:.2f} % | {r['mass_kept']:.3f} | "
                       f"{r['delta_loss']:+.4f}{se} | {100 * r['top1_agreement']:.1f} % | {r['kl']:.4f} |")
        out.append("")
    att = res.get("attention", [])
    if att:
        out.append("**Attention per decode step, summed over 30 layers** (ms, median of rounds; fraction of "
                   "dense sdpa in brackets; select = `select_topk` alone)\n")
        names = list(att[0]["ms"])
        out.append("| context | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for a in att:
            cells = []
            for n in names:
                c = f"{a['ms'][n]:.1f} ({100 * a['fraction_of_dense_sdpa'][n]:.0f} %)"
                if n in a["select_ms"]:
                    c += f", select {a['select_ms'][n]:.1f}"
                cells.append(c)
            out.append(f"| {a['context']} | " + " | ".join(cells) + " |")
        out.append("")
    st = [a for a in att if "step_ms" in a]
    if st:
        out.append("**Whole decode step of the model** (ms, median; attention and everything else)\n")
        names = list(st[0]["step_ms"])
        out.append("| context | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for a in st:
            out.append(f"| {a['context']} | " + " | ".join(f"{a['step_ms'][n]:.0f}" for n in names) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tables", type=Path, help="print the tables of this results.json and exit")
    ap.add_argument("--sections", nargs="+", default=["quality", "attention"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--skip-windows", type=int, default=0,
                    help="start after this many windows of the text (more windows for an earlier sample)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--div", type=int, default=50)
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--top-p-cap", type=int, nargs="+", default=[4],
                    help="top_p's k (its most keys) in budgets; several: each is a method")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", action="store_true", help="add to an existing results.json")
    ap.add_argument("--top-p-methods", nargs="+", default=["exact"], choices=["exact", "int8"],
                    help="the scores the adaptive budget estimates the mass from (int8: the keys' int8 codes)")
    ap.add_argument("--per-head", action="store_true",
                    help="also each adaptive budget per query head (shared=False)")
    ap.add_argument("--pool", type=int, nargs="+", default=[],
                    help="also rank by attention mass among this many budgets best by the summed score "
                         "(select_topk's candidates), fixed and adaptive; 0: every key")
    ap.add_argument("--tail-sample", type=int, help="the mass ranking's sample of the other keys (tail_sample)")
    ap.add_argument("--oracle", action="store_true",
                    help="also the selections of the dense attention itself (Oracle: a bound on any ranking)")
    ap.add_argument("--each-layer", action="store_true",
                    help="also each method with only one layer sparse, for every layer (labels '... [layer L only]')")
    ap.add_argument("--layered", nargs="+", default=[], choices=["greedy", "cover"],
                    help="also each fixed-budget method with per-layer budgets of the same mean by these rules, "
                         "calibrated on other text (layer_budgets; labels '... layered <rule>')")
    ap.add_argument("--text", default="english", choices=["english", "python"],
                    help="the text of the quality section's windows")
    ap.add_argument("--calib-kind", default="python", choices=["english", "python"],
                    help="the text --layered calibrates on")
    ap.add_argument("--configs", nargs="+", help="run only the methods with these labels (e.g. int8 quest)")
    ap.add_argument("--merge-from", type=Path, nargs="+",
                    help="fold the rows of these results.json files into --out's (same context and method: theirs win)")
    a = ap.parse_args()
    if a.tables:
        print(tables(json.loads(a.tables.read_text())))
        return
    set_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    res: dict[str, Any] = json.loads(path.read_text()) if a.merge and path.exists() else {}
    res.setdefault("runs", []).append(dict(argv=sys.argv[1:], machine=machine()))

    def save(_: Any = None) -> None:
        path.write_text(json.dumps(res, indent=1))
        (a.out / "tables.md").write_text(tables(res))

    if a.merge_from:
        for other in a.merge_from:
            o = json.loads(other.read_text())
            res["runs"] += o.get("runs", [])
            keys = {(r["context"], r["config"]) for r in o.get("quality", [])}
            res["quality"] = sorted([r for r in res.get("quality", []) if (r["context"], r["config"]) not in keys]
                                    + o.get("quality", []), key=lambda r: r["context"])
            for sec in ("attention",):
                ctx = {r["context"] for r in o.get(sec, [])}
                res[sec] = sorted([r for r in res.get(sec, []) if r["context"] not in ctx] + o.get(sec, []),
                                  key=lambda r: r["context"])
        save()
        return
    model, tok = models.smollm2()
    for s in a.contexts:
        cfgs = configs(s, a.div, a.top_p, a.sink, a.window, a.page, tuple(a.top_p_cap), tuple(a.top_p_methods),
                       a.per_head, tuple(a.pool), a.tail_sample, a.oracle)
        fixed = [c for c in cfgs if c.get("match") is None and "sink" not in c["opts"] and "rescore" not in
                 c["opts"] and c["opts"].get("method") != "quest" and "oracle" not in c]
        cfgs += [dict(c, label=f"{c['label']} layered {rule}", layered=rule) for rule in a.layered for c in fixed]
        if a.configs:
            cfgs = [c for c in cfgs if c["label"] in a.configs]
        budgets = {}
        for rule in sorted({c["layered"] for c in cfgs if c.get("layered")}):
            k = max(1, s // a.div)
            log(f"layer budgets ({rule}): calibrating on {a.calib_kind} text, {s} tokens...")
            budgets[rule] = layer_budgets(model, models.token_windows(tok, a.calib_kind, s, 2), k, 16,
                                          (8 if rule == "greedy" else 4) * k, max(1, k // 4), rule)
            log(f"layer budgets ({rule}, mean {sum(budgets[rule]) / len(budgets[rule]):.1f}): {budgets[rule]}")
            res.setdefault("layer_budgets", {}).setdefault(str(s), {})[rule] = budgets[rule]
        if "quality" in a.sections:
            rows = eval_quality(model, tok, s, a.windows, a.batch, a.steps, cfgs, lambda rows: None, a.skip_windows,
                                a.each_layer, budgets, a.text)
            done = {r["config"] for r in rows}
            res["quality"] = [r for r in res.get("quality", []) if r["context"] != s or r["config"] not in done]
            res["quality"] += rows
            res["quality"].sort(key=lambda r: r["context"])
            save()
        if "attention" in a.sections:
            res["attention"] = [r for r in res.get("attention", []) if r["context"] != s]
            res["attention"].append(eval_attention(model, tok, s, cfgs, a.rounds, res.get("quality", []),
                                                   lambda r: None))
            save()
    log("done")


if __name__ == "__main__":
    main()
