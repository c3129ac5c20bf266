"""PNG figures of s-Trace results and density studies (matplotlib, ``Agg`` backend).

Every function takes a result dict and an output path, writes one PNG there (creating parent folders) and
returns the path. The curve plots (:func:`plot_tv_curves`, :func:`plot_top_p`, :func:`plot_composition`) accept
a :meth:`~.strace.TraceResult.to_json` dict (one input: a single line), a list of them (mean with the
interquartile band across inputs) or a :func:`~.density.density_study` result (one panel per model, from its
``curves`` / ``composition``); the others need a density study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._checks import fail  # noqa: E402

METHOD_STYLE = {"strace": ("s-Trace", "C0"), "random": ("random", "C1"),
                "complement_sample": ("random from complement", "C2"), "complement": ("whole complement", "C3")}


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return p


def _is_study(obj: Any) -> bool:
    return isinstance(obj, dict) and "models" in obj and "fractions" in obj


def _is_trace(obj: Any) -> bool:
    return isinstance(obj, dict) and "metrics" in obj and "fractions" in obj


def _panels(obj: Any, where: str) -> tuple[list[float], dict[str, dict[str, Any]]]:
    """(fractions, {panel title: {"curves": {method: {metric: {mean, q25, q75}}}, "composition": [...]}})."""
    if _is_study(obj):
        return obj["fractions"], {name: {"curves": m["curves"], "composition": m["composition"]}
                                  for name, m in obj["models"].items()}
    traces = [obj] if _is_trace(obj) else obj
    if not isinstance(traces, list) or not traces or not all(_is_trace(t) for t in traces):
        fail(where, "result must be a TraceResult.to_json() dict, a non-empty list of them, or a density_study() "
                    f"result; got {type(obj).__name__}", TypeError)
    fr = traces[0]["fractions"]
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in [m for m in METHOD_STYLE if m in traces[0]["metrics"]]:
        curves[method] = {}
        for metric in ("tv", "top1", "top_p"):
            a = np.asarray([t["metrics"][method][metric] for t in traces], dtype=float)
            curves[method][metric] = {"mean": a.mean(0).tolist(), "q25": np.quantile(a, 0.25, 0).tolist(),
                                      "q75": np.quantile(a, 0.75, 0).tolist()}
    keys = sorted({k for t in traces for c in t["composition"] for k in c})
    comp = [{k: float(np.mean([t["composition"][j].get(k, 0.0) for t in traces])) for k in keys}
            for j in range(len(fr))]
    title = "1 input" if len(traces) == 1 else f"{len(traces)} inputs"
    return fr, {title: {"curves": curves, "composition": comp}}


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _arr(vals: Any) -> np.ndarray:
    return np.asarray([_nan(v) for v in vals], dtype=float)


def _metric_curves(obj: Any, path: str | Path, metric: str, ylabel: str, where: str) -> Path:
    fr, panels = _panels(obj, where)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (title, p) in zip(axes[0], panels.items()):
        for method, (label, color) in METHOD_STYLE.items():
            if method not in p["curves"]:          # a study that skipped this control
                continue
            c = p["curves"][method][metric]
            ax.plot(fr, _arr(c["mean"]), color=color, label=label, marker=".")
            ax.fill_between(fr, _arr(c["q25"]), _arr(c["q75"]), color=color, alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("s (fraction of edges kept)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def plot_tv_curves(result: Any, path: str | Path) -> Path:
    """TV distance to the full model's next-token distribution versus ``s`` (log axis) for the s-Trace and the
    controls: mean line and interquartile band across inputs."""
    return _metric_curves(result, path, "tv", "total variation distance", "plot_tv_curves")


def plot_top_p(result: Any, path: str | Path) -> Path:
    """Top-p agreement (Jaccard overlap of the nucleus sets) versus ``s``, as :func:`plot_tv_curves`."""
    return _metric_curves(result, path, "top_p", "top-p agreement (Jaccard)", "plot_top_p")


def plot_composition(result: Any, path: str | Path) -> Path:
    """Stacked area of the share of kept s-Trace edges by ``kind/quartile`` versus ``s`` (mean over inputs)."""
    fr, panels = _panels(result, "plot_composition")
    keys = sorted({k for p in panels.values() for c in p["composition"] for k in c})
    cmap = plt.get_cmap("tab20")
    colors = {k: cmap(i % 20) for i, k in enumerate(keys)}         # one colour per kind/quartile in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (title, p) in zip(axes[0], panels.items()):
        if keys:
            ys = np.array([[_nan(c.get(k, 0.0)) for c in p["composition"]] for k in keys])
            ax.stackplot(fr, ys, labels=keys, colors=[colors[k] for k in keys], alpha=0.9)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("s (fraction of edges kept)")
        ax.set_title(title)
    axes[0][0].set_ylabel("share of kept edges")
    if keys:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _study(obj: Any, where: str) -> dict[str, Any]:
    if not _is_study(obj):
        fail(where, f"result must be a density_study() result (a dict with 'models'), got {type(obj).__name__}",
             TypeError)
    return obj


def plot_density_hist(study: Any, path: str | Path) -> Path:
    """Histogram of the densities per model (the study's bins on [0, 1]), with mean and median marked."""
    s = _study(study, "plot_density_hist")
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (name, m) in enumerate(s["models"].items()):
        h = m["density"]["hist"]
        edges = np.asarray(h["edges"])
        ax.stairs(h["counts"], edges, label=f"{name} (n={m['density']['n']})", color=f"C{k}", linewidth=1.5)
        ax.axvline(_nan(m["density"]["mean"]), color=f"C{k}", linestyle="--", linewidth=1)
        ax.axvline(_nan(m["density"]["quantiles"]["0.5"]), color=f"C{k}", linestyle=":", linewidth=1)
    ax.set_xlabel("computation density (-- mean, : median)")
    ax.set_ylabel("inputs")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_density_entropy(study: Any, path: str | Path) -> Path:
    """Scatter of density versus output entropy per input, one colour per model, Spearman rho in the legend."""
    s = _study(study, "plot_density_entropy")
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (name, m) in enumerate(s["models"].items()):
        c = m["correlations"]["density_entropy"]
        ax.scatter(_arr([r["entropy"] for r in m["inputs"]]), _arr([r["density"] for r in m["inputs"]]), s=14,
                   color=f"C{k}", alpha=0.7, label=f"{name}: rho={_nan(c['rho']):.2f}, p={_nan(c['p']):.3g}")
    ax.set_xlabel("entropy of the next-token distribution (nats)")
    ax.set_ylabel("computation density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_density_context(study: Any, path: str | Path) -> Path:
    """Left: density versus context length (median over inputs, band = interquartile range). Right: log-log
    edges needed for TV <= threshold (median) and graph edges versus context length, with the fitted slopes."""
    s = _study(study, "plot_density_context")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, m) in enumerate(s["models"].items()):
        cl = np.asarray(m["context"]["lengths"], dtype=float)
        d = np.array([[_nan(x["density"]) for x in r["context"]] for r in m["inputs"]])
        ax.plot(cl, np.median(d, 0), marker="o", color=f"C{k}", label=name)
        ax.fill_between(cl, np.quantile(d, 0.25, 0), np.quantile(d, 0.75, 0), color=f"C{k}", alpha=0.2, linewidth=0)
        ctx = m["context"]
        bx.plot(cl, _arr(ctx["edges_needed_median"]), marker="o", color=f"C{k}",
                label=f"{name}: needed (slope {_nan(ctx['slope_edges_needed_of_median']):.2f})")
        bx.plot(cl, _arr(ctx["n_edges"]), marker="s", linestyle="--", color=f"C{k}",
                label=f"{name}: graph (slope {_nan(ctx['slope_n_edges']):.2f})")
    lengths = [float(c) for c in s["context_lengths"]]
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xticks(lengths, [f"{c:g}" for c in lengths])
        a.minorticks_off()
    ax.set_xlabel("context length (last c tokens)")
    ax.set_ylabel("computation density")
    ax.legend(fontsize=8)
    bx.set_yscale("log")
    bx.set_xlabel("context length (last c tokens)")
    bx.set_ylabel(f"edges (needed for TV <= {s.get('tv_threshold', 0.1)})")
    bx.legend(fontsize=7)
    return _save(fig, path)


def plot_cross_model(study: Any, path: str | Path) -> Path:
    """Scatter of the densities of each pair of models on the same inputs, with Spearman rho and p-value
    (a figure saying so when the study has a single model)."""
    s = _study(study, "plot_cross_model")
    pairs = s.get("cross_model", [])
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(4.5 * max(1, len(pairs)), 4), squeeze=False)
    if not pairs:
        axes[0][0].text(0.5, 0.5, "cross-model comparison needs 2+ models", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, pr in zip(axes[0], pairs):
        da = _arr([r["density"] for r in s["models"][pr["a"]]["inputs"]])
        db = _arr([r["density"] for r in s["models"][pr["b"]]["inputs"]])
        ax.scatter(da, db, s=14, alpha=0.7)
        lim = [0, max(1e-3, float(np.nanmax(np.concatenate([da, db]))) * 1.05)]
        ax.plot(lim, lim, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"density, {pr['a']}")
        ax.set_ylabel(f"density, {pr['b']}")
        ax.set_title(f"rho={_nan(pr['rho']):.2f}, p={_nan(pr['p']):.3g}, n={pr['n']}")
    return _save(fig, path)


def plot_all(study: Any, outdir: str | Path) -> dict[str, Path]:
    """Every figure of a density study into ``outdir`` (``tv.png``, ``top_p.png``, ``composition.png``,
    ``density_hist.png``, ``density_entropy.png``, ``density_context.png``, ``cross_model.png``)."""
    d = Path(outdir)
    fns = {"tv": plot_tv_curves, "top_p": plot_top_p, "composition": plot_composition,
           "density_hist": plot_density_hist, "density_entropy": plot_density_entropy,
           "density_context": plot_density_context, "cross_model": plot_cross_model}
    return {k: f(study, d / f"{k}.png") for k, f in fns.items()}
