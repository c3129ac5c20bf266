"""Figures of the compressed-sensing probe (PNG files, matplotlib's Agg backend; no display needed).

- :func:`plot_synthetic_recovery`: success rate and relative error against ``m`` for a planted ``k``-sparse
  vector (the output of :func:`~sparsecore.analysis.probe.synthetic_recovery`), with ``m = k ln(p / k)``
  marked.
- :func:`plot_model_recovery`: the probe's quality against the exact gradient as ``m`` grows on a model
  (the output of :func:`~sparsecore.analysis.probe.recovery_vs_m`), with ``m = p`` marked.
- :func:`plot_probe_vs_truth`: the recovered ``x`` against the exact gradient and against ``-knockout``, one
  point per unit, coloured by kind.

Every function writes ``path`` and returns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._checks import fail  # noqa: E402
from .plots import _save  # noqa: E402
from .probe import ProbeResult  # noqa: E402

__all__ = ["plot_synthetic_recovery", "plot_model_recovery", "plot_probe_vs_truth"]

_KIND_COLOURS = {"head": "tab:blue", "ffn_block": "tab:orange", "token": "tab:green"}


def plot_synthetic_recovery(result: dict[str, Any], path: str | Path) -> Path:
    """Left: success rate (relative error < 1e-2) per solver against ``m``; right: mean relative error (log
    scale). A dashed line marks ``m = k ln(p / k)``."""
    for key in ("ms", "solvers", "klogpk", "p", "k"):
        if key not in result:
            fail("plot_synthetic_recovery", f"result has no {key!r}; pass the dict synthetic_recovery returned")
    ms = result["ms"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, v in result["solvers"].items():
        a1.plot(ms, v["success"], marker="o", label=name)
        a2.semilogy(ms, np.maximum(v["rel_err"], 1e-16), marker="o", label=name)
    for ax in (a1, a2):
        ax.axvline(result["klogpk"], color="k", ls="--", lw=1, label="k ln(p/k)")
        ax.set_xlabel("measurements m")
        ax.grid(alpha=0.3)
    a1.set_ylabel("success rate")
    a1.set_ylim(-0.03, 1.03)
    a2.set_ylabel("mean relative L2 error")
    a1.legend(fontsize=8)
    fig.suptitle(f"planted {result['k']}-sparse x in R^{result['p']}, noise {result.get('noise', 0.0)}")
    return _save(fig, path)


def plot_model_recovery(result: dict[str, Any], path: str | Path) -> Path:
    """The probe's quality against the exact gradient (relative error, Spearman of ``|x|``, top overlap, and
    the best-``k`` floor) against ``m``; dashed: ``m = p``; dotted: the full least-squares error if measured."""
    for key in ("ms", "p", "gradient"):
        if key not in result:
            fail("plot_model_recovery", f"result has no {key!r}; pass the dict recovery_vs_m returned")
    ms = result["ms"]
    g = result["gradient"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ms, g["rel_err"], marker="o", label="rel. error vs gradient")
    a1.plot(ms, np.maximum(g["best_k_err"], 1e-6), marker=".", ls=":", label="best k-term error (floor)")
    if result.get("lstsq_full"):
        a1.axhline(result["lstsq_full"]["rel_err"], color="grey", ls=":", label="least squares, all rows")
    a1.set_yscale("log")                                    # m = p (a square sign matrix) can be ill-conditioned
    a1.set_ylabel("relative L2 error")
    a2.plot(ms, g["spearman_abs"], marker="o", label="Spearman |x| vs |gradient|")
    a2.plot(ms, g["top_overlap"], marker="s", label="top-k overlap")
    if "knockout" in result:
        a2.plot(ms, result["knockout"]["spearman_abs"], marker="^", ls="--", label="Spearman |x| vs |knockout|")
    a2.set_ylim(-0.05, 1.05)
    for ax in (a1, a2):
        ax.axvline(result["p"], color="k", ls="--", lw=1, label="m = p")
        ax.set_xlabel("measurements m")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"probe recovery on the model (p = {result['p']} units)")
    return _save(fig, path)


def plot_probe_vs_truth(result: ProbeResult, path: str | Path) -> Path:
    """Scatter of the recovered ``x`` against the exact gradient (left) and ``-knockout`` (right), per unit."""
    if not isinstance(result, ProbeResult):
        fail("plot_probe_vs_truth", f"result must be a ProbeResult, got {type(result).__name__}", TypeError)
    panels = [(result.gradient, "exact gradient", 1.0), (result.knockout, "-knockout effect", -1.0)]
    panels = [pn for pn in panels if pn[0] is not None]
    if not panels:
        fail("plot_probe_vs_truth", "result has neither gradient nor knockout; run probe_model(ground_truth=True)")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    kinds = np.asarray(result.kinds)
    for ax, (truth, label, sign) in zip(axes[0], panels):
        t = sign * np.asarray(truth)
        for kind in dict.fromkeys(result.kinds):
            sel = kinds == kind
            ax.scatter(t[sel], result.x[sel], s=14, alpha=0.8, color=_KIND_COLOURS.get(kind), label=kind)
        lim = float(max(np.abs(t).max(), np.abs(result.x).max(), 1e-12)) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("recovered x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"probe: m = {result.m}, p = {result.p}, solver {result.solver}, k = {result.k}")
    return _save(fig, path)
