"""The analysis on a real pretrained model: SmolLM2-135M on real English and Python text.

``python -m sparsecore analyze --model smollm2 --out DIR`` runs :func:`run_study`, which:

1. builds ``n`` inputs (:func:`word_boundary_inputs`): half from the English text and half from the Python
   text of :func:`sparsecore.models.real_text`, each a window of ``length`` tokens that ends at a word
   boundary (the text's real next token starts with a space and a letter, digit or underscore), evenly spaced
   over the text; the target is that real next token;
2. runs the density study (:func:`~.density.density_study`) on SmolLM2: s-Trace snapshots with the random
   control at full length, the s-Trace alone on the truncations to each context length;
3. runs the same study on a second model, the project's byte-level 2-layer model, on the *same text*: the
   byte model reads the last bytes of the same prefix plus the space that starts the target word, so both
   models predict the beginning of the same next word (:func:`byte_inputs`);
4. probes a few inputs with the compressed-sensing probe (heads, FFN channel blocks, tokens), compares the
   recovered vector with the exact gradient, and runs execution plans of several sizes built from the probe,
   from the exact gradient (an oracle) and at random, through :func:`~.plan.run_plans` (one decode step:
   sparse_decode over the kept tokens and heads, sliced FFN weights for the kept channel blocks);
5. computes the statistics of every claim (:func:`claims`) and writes JSON and figures.

Everything here takes the model, an ``encode``/``decode`` pair and the texts as arguments, so the tests run it
on a tiny random LLaMA with a toy tokenizer; only :func:`main` loads the real model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import fail
from .density import _clean, bootstrap_ci, correlation, density_study, spearman

# s-Trace snapshot fractions for the real model: resolution where its TV actually falls (above 0.1)
REAL_FRACTIONS = (1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)
PLAN_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


# ---------------------------------------------------------------------------------------------------- inputs
def is_word_start(piece: str) -> bool:
    """A token that starts a new word: a space followed by a letter, digit or underscore."""
    return len(piece) >= 2 and piece[0] == " " and (piece[1].isalnum() or piece[1] == "_")


def word_boundary_inputs(texts: dict[str, str], encode: Callable[[str], list[int]],
                         decode: Callable[[list[int]], str], n: int, length: int) -> dict[str, Any]:
    """``n`` inputs split evenly over the texts (the first kinds get the remainder): per kind, the positions
    ``e >= length`` whose token starts a word (:func:`is_word_start`), ``n_kind`` of them evenly spaced over
    the text; input = tokens ``e - length .. e - 1``, target = token ``e``.

    Returns ``{"windows": LongTensor [n, length], "targets": [n], "kinds": [n], "prefix": [n] (the decoded
    window), "target_text": [n], "counts": token counts over all the texts (for corpus frequencies)}``."""
    if not texts:
        fail("word_boundary_inputs", "texts is empty")
    kinds = list(texts)
    per = [n // len(kinds) + (1 if i < n % len(kinds) else 0) for i in range(len(kinds))]
    wins, tgts, kk, prefix, ttext = [], [], [], [], []
    all_ids = []
    for kind, k in zip(kinds, per):
        ids = np.asarray(encode(texts[kind]), dtype=np.int64)
        all_ids.append(ids)
        uniq = np.unique(ids)
        start = {int(u): is_word_start(decode([int(u)])) for u in uniq}
        cand = np.array([e for e in range(length, ids.size) if start[int(ids[e])]], dtype=np.int64)
        if cand.size < k:
            fail("word_boundary_inputs", f"the {kind} text has {cand.size} word-start positions after {length} "
                                         f"tokens; {k} inputs were asked for")
        pick = cand[np.round(np.linspace(0, cand.size - 1, k)).astype(np.int64)] if k > 1 else cand[:k]
        for e in pick:
            w = ids[e - length:e]
            wins.append(w)
            tgts.append(int(ids[e]))
            kk.append(kind)
            prefix.append(decode([int(t) for t in w]))
            ttext.append(decode([int(ids[e])]))
    vocab = int(max(int(a.max()) for a in all_ids)) + 1
    counts = np.bincount(np.concatenate(all_ids), minlength=vocab).astype(np.float64)
    return {"windows": torch.from_numpy(np.stack(wins)), "targets": tgts, "kinds": kk, "prefix": prefix,
            "target_text": ttext, "counts": counts}


def byte_inputs(prefix: Sequence[str], target_text: Sequence[str], length: int) -> dict[str, Any]:
    """The same inputs for a byte-level model: the last ``length`` bytes of ``prefix + " "`` (the space that
    starts the target word, which the BPE token carries), target = the word's first byte. Both models then
    predict the beginning of the same next word from the same text (the byte model sees fewer characters of
    it when ``length`` bytes are fewer than the prefix has)."""
    wins, tgts = [], []
    for p, t in zip(prefix, target_text):
        b = (p + " ").encode("utf-8")
        if len(b) < length:
            fail("byte_inputs", f"a prefix has {len(b)} bytes, fewer than length = {length}")
        wins.append(np.frombuffer(b[-length:], dtype=np.uint8).astype(np.int64))
        tgts.append(t.encode("utf-8")[1])
    return {"windows": torch.from_numpy(np.stack(wins)), "targets": tgts}


# ------------------------------------------------------------------------------------------------- statistics
def _arr(records: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)


def _dist(v: np.ndarray, seed: int) -> dict[str, Any]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "q05": float(np.quantile(v, 0.05)), "q95": float(np.quantile(v, 0.95)),
            "min": float(v.min()), "max": float(v.max()),
            "mean_ci": bootstrap_ci(np.mean, v, seed=seed), "median_ci": bootstrap_ci(np.median, v, seed=seed)}


def _context_stats(records: list[dict[str, Any]], lengths: list[int], n_perm: int, seed: int) -> dict[str, Any]:
    """Density against context length, paired per input: the mean of the per-input Spearman rho of
    (c, density) with a within-input permutation p-value (each input's lengths shuffled), and the paired
    difference density(longest) - density(shortest) with a bootstrap interval and a Wilcoxon p."""
    d = np.asarray([[np.nan if x["density"] is None else x["density"] for x in r["context"]] for r in records])
    ok = np.isfinite(d).all(1)
    d = d[ok]
    c = np.asarray(lengths, dtype=float)
    out: dict[str, Any] = {"lengths": lengths, "n": int(d.shape[0]),
                           "density_mean": d.mean(0).tolist() if d.size else None,
                           "density_median": np.median(d, 0).tolist() if d.size else None}
    if d.shape[0] < 2 or len(lengths) < 2:
        return out
    rhos = np.array([spearman(c, row) for row in d])
    rhos = np.nan_to_num(rhos)
    obs = float(rhos.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        perm = np.array([spearman(rng.permutation(c), row) for row in d])
        hits += abs(float(np.nan_to_num(perm).mean())) >= abs(obs) - 1e-12
    diff = d[:, -1] - d[:, 0]
    from scipy.stats import wilcoxon

    try:
        wp = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    except ValueError:
        wp = float("nan")
    out.update(mean_rho=obs, p=(1 + hits) / (1 + n_perm), n_perm=n_perm,
               diff_longest_minus_shortest=bootstrap_ci(np.mean, diff, seed=seed), wilcoxon_p=wp,
               share_decreasing=float(np.mean(diff < 0)))
    return out


def composition_phases(study_model: dict[str, Any], fractions: Sequence[float],
                       sizes: Sequence[float]) -> dict[str, Any]:
    """The kept s-Trace edges by kind and layer quartile along the growth, and what each growth step adds:
    ``shares[j]`` (of the edges kept at snapshot ``j``) and ``added[j]`` (of the edges added between snapshot
    ``j - 1`` and ``j``, from the mean counts ``share * size``). Summaries: the share of first-quartile
    (early-layer) edges and of late (q3 + q4) attention edges, in the first snapshot and in what the later
    snapshots add."""
    comp = study_model["composition"]
    keys = sorted({k for c in comp for k in c})
    counts = np.array([[c.get(k, 0.0) * s for k in keys] for c, s in zip(comp, sizes)])
    added = np.diff(np.vstack([np.zeros(len(keys)), counts]), axis=0)
    added = np.clip(added, 0, None)
    tot = added.sum(1, keepdims=True)
    added_share = np.divide(added, tot, out=np.zeros_like(added), where=tot > 0)
    share = np.array([[c.get(k, 0.0) for k in keys] for c in comp])

    def pick(row: np.ndarray, pred: Callable[[str], bool]) -> float:
        return float(sum(v for k, v in zip(keys, row) if pred(k)))

    early = lambda k: k.endswith("/q1")                                         # noqa: E731
    late_attn = lambda k: k.startswith("attention/") and k[-2:] in ("q3", "q4")  # noqa: E731
    return {"keys": keys, "fractions": list(fractions), "shares": share.tolist(), "added": added_share.tolist(),
            "early_share": [pick(r, early) for r in share], "late_attention_share": [pick(r, late_attn) for r in share],
            "added_early_share": [pick(r, early) for r in added_share],
            "added_late_attention_share": [pick(r, late_attn) for r in added_share]}


def claims(study: dict[str, Any], name: str, kinds: Sequence[str], *, n_perm: int = 1000,
           seed: int = 0) -> dict[str, Any]:
    """The statistics of each claim for model ``name`` of a density study (with targets)."""
    m = study["models"][name]
    recs = m["inputs"]
    dens = _arr(recs, "density")
    n_edges = _arr(recs, "n_edges")
    need = _arr(recs, "edges_needed")
    need_frac = need / n_edges                                   # inf where TV <= 0.1 is never reached
    kinds_a = np.asarray(kinds)
    out: dict[str, Any] = {"n": int(dens.size), "density": _dist(dens, seed),
                           "density_by_kind": {k: _dist(dens[kinds_a == k], seed) for k in dict.fromkeys(kinds)},
                           "edges_needed_fraction": {"median": float(np.median(need_frac)),
                                                     "share_reached": float(np.isfinite(need_frac).mean())}}
    corr = {}
    for key, label in (("entropy", "density_entropy"), ("target_freq", "density_target_freq"),
                       ("predicted_freq", "density_predicted_freq"), ("target_logp", "density_target_logp")):
        v = _arr(recs, key)
        if np.isfinite(v).all():
            corr[label] = correlation(dens, v, n_perm=n_perm, seed=seed)
            for k in dict.fromkeys(kinds):
                sel = kinds_a == k
                corr[f"{label}[{k}]"] = correlation(dens[sel], v[sel], n_perm=n_perm, seed=seed)
    ent = _arr(recs, "entropy")
    corr["edges_needed_entropy"] = correlation(np.where(np.isfinite(need_frac), need_frac, 10.0), ent,
                                               n_perm=n_perm, seed=seed)
    out["correlations"] = corr
    out["context"] = _context_stats(recs, study["context_lengths"], n_perm=min(n_perm, 200), seed=seed)
    sizes = np.mean([[c for c in _sizes(study["fractions"], r["n_edges"])] for r in recs], axis=0)
    out["composition"] = composition_phases(m, study["fractions"], sizes)
    cur = m["curves"]
    out["tv_curve"] = {meth: cur[meth]["tv"]["mean"] for meth in cur}
    out["top1_curve"] = {meth: cur[meth]["top1"]["mean"] for meth in cur}
    return out


def _sizes(fractions: Sequence[float], n_edges: int) -> list[int]:
    return [max(1, math.ceil(f * n_edges)) for f in fractions]


# ----------------------------------------------------------------------------------------- probe and plans
def plan_sweep(model: Any, windows: torch.Tensor, targets: Sequence[int], *, n_inputs: int, m: int,
               ffn_block_size: int, fractions: Sequence[float] = PLAN_FRACTIONS, delta: float = 1e-3,
               repeats: int = 5, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Probe ``n_inputs`` evenly spaced inputs (``m`` central-difference measurements, exact gradient for
    comparison) and run plans keeping the top fraction ``f`` of heads, FFN blocks and tokens by ``|x|`` (the
    probe), by ``|gradient|`` (an oracle the probe approximates) and at random, for each ``f``; and plans that
    cut one unit kind only (by the probe). Every plan keeps the first token (the attention sink) and the last."""
    from .plan import ExecutionPlan, run_plans
    from .probe import probe_model

    n = windows.shape[0]
    idx = np.unique(np.round(np.linspace(0, n - 1, max(1, n_inputs))).astype(int)) if n_inputs else []
    rng = np.random.default_rng(seed)
    out = []
    for j, i in enumerate(idx):
        if progress:
            progress(f"probe input {j + 1}/{len(idx)}")
        w = windows[int(i)]
        t0 = time.perf_counter()
        res = probe_model(model, w, m=m, ffn_block_size=ffn_block_size, seed=seed + j, delta=delta,
                          scheme="central", knockout=False)
        t_probe = time.perf_counter() - t0
        d = res.dims
        sizes = {"head": d["layers"] * d["heads"], "ffn_block": d["layers"] * d["n_blocks"], "token": d["tokens"]}
        plans, labels = [], []
        for f in fractions:
            count = {k: max(1, int(round(f * s))) for k, s in sizes.items()}
            plans.append(ExecutionPlan.from_probe(res, count=count, sink=1))
            labels.append(("probe", f))
            plans.append(ExecutionPlan.from_probe(res, count=count, which="gradient", sink=1))
            labels.append(("gradient", f))
            for kind in ("head", "ffn_block", "token"):          # one unit kind cut, the others whole
                only = {k: (count[k] if k == kind else s) for k, s in sizes.items()}
                plans.append(ExecutionPlan.from_probe(res, count=only, sink=1))
                labels.append((f"probe_{kind}_only", f))
            rnd = ExecutionPlan.from_probe(res, count=count)
            for arr, kind in ((rnd.heads_kept, "head"), (rnd.ffn_blocks_kept, "ffn_block")):
                flat = np.zeros(arr.size, bool)
                flat[rng.choice(arr.size, size=count[kind], replace=False)] = True
                arr[...] = flat.reshape(arr.shape)
            tk = np.zeros(d["tokens"], bool)
            tk[0] = tk[-1] = True                                 # the sink and the last token, as above
            free = np.arange(1, d["tokens"] - 1)
            tk[rng.choice(free, size=min(free.size, max(0, count["token"] - 2)), replace=False)] = True
            rnd.tokens_kept = tk
            plans.append(rnd)
            labels.append(("random", f))
        if progress:
            progress(f"plans of input {j + 1}/{len(idx)}")
        run = run_plans(model, w, plans, target=int(targets[int(i)]), repeats=repeats)
        for (src, f), r in zip(labels, run["plans"]):
            r.update(source=src, fraction=f)
        out.append({"index": int(i), "quality": res.quality, "m": m, "p": res.p, "k": res.k, "f0": res.f0,
                    "probe_seconds": t_probe, "ref": run["ref"], "plans": run["plans"]})
    return {"inputs": out, "fractions": list(fractions), "m": m, "ffn_block_size": ffn_block_size,
            "frontier": frontier(out, fractions)}


def frontier(inputs: list[dict[str, Any]], fractions: Sequence[float]) -> list[dict[str, Any]]:
    """Per plan source and fraction, over the probed inputs: mean top-1 agreement, mean TV, mean loss increase
    over the dense model, and the median time ratio plan / dense (the Hugging Face decode step)."""
    rows = []
    for src in ("probe", "gradient", "random", "probe_head_only", "probe_ffn_block_only", "probe_token_only"):
        for f in fractions:
            ps = [(x["ref"], p) for x in inputs for p in x["plans"] if p["source"] == src and p["fraction"] == f]
            if not ps:
                continue
            rows.append({"source": src, "fraction": f, "n": len(ps),
                         "top1": float(np.mean([p["top1"] for _, p in ps])),
                         "tv": float(np.mean([p["tv"] for _, p in ps])),
                         "loss_increase": float(np.mean([p["loss"] - r["loss"] for r, p in ps])),
                         "time_vs_hf": float(np.median([p["time_plan_s"] / r["time_hf_s"] for r, p in ps])),
                         "time_vs_full_plan": float(np.median([p["time_plan_s"] / r["time_full_s"] for r, p in ps])),
                         "time_plan_ms": float(np.median([1e3 * p["time_plan_s"] for _, p in ps]))})
    return rows


# ------------------------------------------------------------------------------------------------ the study
def run_study(model: Any, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
              texts: dict[str, str], *, n: int, length: int, context_lengths: Sequence[int],
              second: Any = None, second_length: int = 128, probe_inputs: int = 4, probe_m: int = 96,
              ffn_block_size: int = 128, fractions: Sequence[float] = REAL_FRACTIONS, n_perm: int = 1000,
              seed: int = 0, progress: Callable[[str], None] | None = None,
              model_name: str = "smollm2", second_name: str = "byte_model") -> dict[str, Any]:
    """Everything the module docstring lists; returns ``{"inputs", "study", "second_study", "plans",
    "claims", "seconds"}`` (JSON-able)."""
    t0 = time.perf_counter()
    say = progress or (lambda s: None)
    inp = word_boundary_inputs(texts, encode, decode, n, length)
    vocab = int(getattr(model.config, "vocab_size", inp["counts"].size))
    counts = np.zeros(max(vocab, inp["counts"].size))
    counts[:inp["counts"].size] = inp["counts"]
    study = density_study({model_name: model}, inp["windows"], corpus_counts=counts,
                          context_lengths=tuple(context_lengths), fractions=tuple(fractions),
                          methods=("strace", "random"), context_methods=("strace",), targets=inp["targets"],
                          n_perm=n_perm, seed=seed,
                          progress=lambda name, i: say(f"{name}: s-Trace input {i + 1}/{n}"))
    out: dict[str, Any] = {"inputs": {"kinds": inp["kinds"], "targets": inp["targets"],
                                      "target_text": inp["target_text"], "length": length},
                           "study": study}
    cl = {model_name: claims(study, model_name, inp["kinds"], n_perm=n_perm, seed=seed)}
    if second is not None:
        bi = byte_inputs(inp["prefix"], inp["target_text"], second_length)
        texts_b = b"".join(t.encode("utf-8") for t in texts.values())
        bcounts = np.bincount(np.frombuffer(texts_b, dtype=np.uint8), minlength=256).astype(np.float64)
        ctx2 = sorted({c for c in (second_length // 4, second_length // 2, second_length) if c >= 2})
        s2 = density_study({second_name: second}, bi["windows"], corpus_counts=bcounts, context_lengths=ctx2,
                           fractions=tuple(fractions), methods=("strace", "random"), context_methods=("strace",),
                           targets=bi["targets"], n_perm=n_perm, seed=seed,
                           progress=lambda name, i: say(f"{name}: s-Trace input {i + 1}/{n}"))
        out["second_study"] = s2
        cl[second_name] = claims(s2, second_name, inp["kinds"], n_perm=n_perm, seed=seed)
        da = _arr(study["models"][model_name]["inputs"], "density")
        db = _arr(s2["models"][second_name]["inputs"], "density")
        kinds_a = np.asarray(inp["kinds"])
        cross = {"all": correlation(da, db, n_perm=n_perm, seed=seed)}
        for k in dict.fromkeys(inp["kinds"]):
            cross[k] = correlation(da[kinds_a == k], db[kinds_a == k], n_perm=n_perm, seed=seed)
        ea = _arr(study["models"][model_name]["inputs"], "entropy")
        eb = _arr(s2["models"][second_name]["inputs"], "entropy")
        cross["entropy_all"] = correlation(ea, eb, n_perm=n_perm, seed=seed)
        cl["cross_model"] = cross
    if probe_inputs:
        out["plans"] = plan_sweep(model, inp["windows"], inp["targets"], n_inputs=probe_inputs, m=probe_m,
                                  ffn_block_size=ffn_block_size, seed=seed, progress=say)
        q = [x["quality"]["gradient"] for x in out["plans"]["inputs"]]
        cl["probe"] = {"m": probe_m, "p": out["plans"]["inputs"][0]["p"],
                       "k": out["plans"]["inputs"][0]["k"],
                       **{key: float(np.mean([x[key] for x in q])) for key in ("cosine", "spearman_abs", "top_overlap",
                                                                             "rel_err", "best_k_err")}}
    out["claims"] = cl
    out["seconds"] = time.perf_counter() - t0
    return _clean(out)


# -------------------------------------------------------------------------------------------------- figures
def plot_real(res: dict[str, Any], outdir: Path, model_name: str = "smollm2",
              second_name: str = "byte_model") -> dict[str, str]:
    """Figures of a :func:`run_study` result into ``outdir``; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, str] = {}
    study = res["study"]["models"][model_name]
    recs = study["inputs"]
    kinds = np.asarray(res["inputs"]["kinds"])
    dens = _arr(recs, "density")
    cl = res["claims"][model_name]

    def save(fig: Any, name: str) -> None:
        p = outdir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs[name] = str(p)

    # 1. density distribution by text kind
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k in dict.fromkeys(kinds):
        ax.hist(dens[kinds == k], bins=20, range=(0, 1), alpha=0.6, label=f"{k} (n={int((kinds == k).sum())})")
    ax.set_xlabel("computation density")
    ax.set_ylabel("inputs")
    ax.set_title(f"{model_name}: density per input")
    ax.legend(fontsize=8)
    save(fig, "density_hist")

    # 2. density against entropy, target frequency, target log-prob
    keys = [("entropy", "next-token entropy (nats)", "density_entropy", False),
            ("target_freq", "target token corpus frequency", "density_target_freq", True),
            ("target_logp", "log p(target)", "density_target_logp", False)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, ck, logx) in zip(axes, keys):
        v = _arr(recs, key)
        for k in dict.fromkeys(kinds):
            ax.scatter(v[kinds == k], dens[kinds == k], s=10, alpha=0.7, label=k)
        if logx:
            ax.set_xscale("log")
        c = cl["correlations"].get(ck, {})
        ci = c.get("ci") or [None, None]
        ax.set_title(f"rho={_f(c.get('rho'))} [{_f(ci[0])}, {_f(ci[1])}], p={_f(c.get('p'))}", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("density")
    axes[0].legend(fontsize=8)
    save(fig, "density_correlates")

    # 3. density against context length
    ctx = cl["context"]
    d = np.asarray([[np.nan if x["density"] is None else x["density"] for x in r["context"]] for r in recs])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.boxplot([d[:, j][np.isfinite(d[:, j])] for j in range(d.shape[1])])
    ax.set_xticks(range(1, d.shape[1] + 1), [str(c) for c in ctx["lengths"]])
    ax.set_xlabel("context length (tokens, last c of the window)")
    ax.set_ylabel("computation density")
    ax.set_title(f"mean per-input rho={_f(ctx.get('mean_rho'))}, p={_f(ctx.get('p'))}", fontsize=9)
    save(fig, "density_context")

    # 4. TV / top-1 curves of the s-Trace and the random control
    fr = res["study"]["fractions"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for meth, color in (("strace", "C0"), ("random", "C3")):
        if meth not in study["curves"]:
            continue
        for ax, metric in zip(axes, ("tv", "top1")):
            c = study["curves"][meth][metric]
            ax.plot(fr, _nanarr(c["mean"]), color=color, marker=".", label=meth)
            ax.fill_between(fr, _nanarr(c["q25"]), _nanarr(c["q75"]), color=color, alpha=0.2, linewidth=0)
    for ax, lab in zip(axes, ("TV to the full model", "top-1 agreement")):
        ax.set_xscale("log")
        ax.set_xlabel("s (fraction of edges kept)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "tv_curves")

    # 5. composition along the growth: kept edges and what each step adds
    comp = cl["composition"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    cmap = plt.get_cmap("tab20")
    for ax, key, title in ((axes[0], "shares", "share of kept edges"), (axes[1], "added", "share of added edges")):
        ys = np.asarray(comp[key]).T
        ax.stackplot(fr, ys, labels=comp["keys"], colors=[cmap(i % 20) for i in range(len(comp["keys"]))])
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("s (fraction of edges kept)")
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, "composition")

    # 6. cross-model
    if "second_study" in res:
        db = _arr(res["second_study"]["models"][second_name]["inputs"], "density")
        c = res["claims"]["cross_model"]["all"]
        fig, ax = plt.subplots(figsize=(5, 4))
        for k in dict.fromkeys(kinds):
            ax.scatter(dens[kinds == k], db[kinds == k], s=10, alpha=0.7, label=k)
        ax.set_xlabel(f"density, {model_name}")
        ax.set_ylabel(f"density, {second_name}")
        ax.set_title(f"rho={_f(c.get('rho'))} [{_f(c['ci'][0])}, {_f(c['ci'][1])}], p={_f(c.get('p'))}", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, "cross_model")

    # 7. execution plan frontier
    if "plans" in res and res["plans"]["frontier"]:
        rows = res["plans"]["frontier"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for src, color in (("probe", "C0"), ("gradient", "C2"), ("random", "C3")):
            r = [x for x in rows if x["source"] == src]
            t = [x["time_vs_hf"] for x in r]
            axes[0].plot(t, [x["top1"] for x in r], marker="o", color=color, label=src)
            axes[1].plot(t, [x["loss_increase"] for x in r], marker="o", color=color, label=src)
        for ax, lab in zip(axes, ("top-1 agreement with the dense model", "loss increase (nats)")):
            ax.axvline(1.0, color="gray", linestyle=":")
            ax.set_xlabel("decode-step time / dense (Hugging Face) step")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "plan_frontier")
    return figs


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _nanarr(v: Any) -> np.ndarray:
    return np.asarray([np.nan if x is None else x for x in v], dtype=float)


# ------------------------------------------------------------------------------------------------------- CLI
def main(args: Any) -> int:
    """``analyze --model smollm2``: load SmolLM2-135M and the byte-level model, run :func:`run_study`, write
    ``study.json`` (everything), ``summary.json`` (the claims' statistics) and the figures into ``--out``."""
    from .._progress import Progress
    from ..models import real_text, smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.inputs or 128
    length = args.length or 64
    ctx = [int(c) for c in (args.context_lengths or f"{length // 4},{length // 2},{length}").split(",") if c.strip()]
    if any(c < 2 or c > length for c in ctx):
        raise SystemExit(f"analyze: --context-lengths must lie in [2, --length = {length}], got {ctx}")
    probe_n = 4 if args.probe_inputs is None else args.probe_inputs
    probe_m = 96 if args.probe_plan_m is None else args.probe_plan_m
    ffn_block = args.ffn_block or 128
    show = not args.no_progress
    second_dir = args.second_model
    if second_dir == "auto":
        from .cli import _DEFAULT_SECOND

        second_dir = str(_DEFAULT_SECOND) if (_DEFAULT_SECOND / "config.json").is_file() else "none"
    total = n * (2 if second_dir != "none" else 1) + 2 * probe_n
    p = Progress(total, "analyze smollm2", enabled=show)
    model, tok = smollm2(verbose=show)
    second = None
    if second_dir != "none":
        from .cli import load

        second, _ = load(second_dir)
    texts = {"english": real_text("english"), "python": real_text("python")}
    res = run_study(model, lambda s: tok(s, add_special_tokens=False)["input_ids"],
                    lambda ids: tok.decode(ids), texts, n=n, length=length, context_lengths=ctx, second=second,
                    probe_inputs=probe_n, probe_m=probe_m, ffn_block_size=ffn_block, seed=args.seed,
                    progress=p.step)
    p.done(f"{n} inputs")
    res["command"] = ("python3 -m sparsecore analyze --model smollm2 --out " + str(args.out)
                      + f" --inputs {n} --length {length}" + (f" --threads {args.threads}" if args.threads else ""))
    res["torch_threads"] = torch.get_num_threads()
    (out / "study.json").write_text(json.dumps(res, indent=1) + "\n")
    figs = plot_real(res, out)
    summary = {"command": res["command"], "seconds": res["seconds"], "inputs": n, "length": length,
               "claims": res["claims"], "frontier": res.get("plans", {}).get("frontier"), "figures": figs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    c = res["claims"]["smollm2"]
    print(f"analyze: smollm2, {n} inputs of {length} tokens, {res['seconds']:.0f} s")
    print(f"  density mean {c['density']['mean']:.3g} (median {c['density']['median']:.3g})")
    for k, v in c["correlations"].items():
        if "[" not in k:
            print(f"  {k}: rho {_f(v.get('rho'))} CI [{_f(v['ci'][0])}, {_f(v['ci'][1])}] p {_f(v.get('p'))}")
    if "cross_model" in res["claims"]:
        v = res["claims"]["cross_model"]["all"]
        print(f"  cross-model density rho {_f(v.get('rho'))} p {_f(v.get('p'))}")
    for r in summary["frontier"] or []:
        print(f"  plan {r['source']:8s} f={r['fraction']:.2f}: top1 {r['top1']:.2f}, loss +{r['loss_increase']:.3g}, "
              f"time/dense {r['time_vs_hf']:.2f}")
    print(f"wrote {out / 'study.json'}, {out / 'summary.json'} and {len(figs)} figures")
    return 0
