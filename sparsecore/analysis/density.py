"""Computation density over a set of inputs: its distribution, what it correlates with, and how it scales.

For each model and each input window ``w`` ([T] token ids) the study runs :func:`~.strace.trace_input` on ``w``
(the *density* of the input, see :func:`~.strace.computation_density`) and on its truncations ``w[-c:]`` (the
last ``c`` tokens, so that the predicted position is the same) for each context length ``c``. From these:

- per input: density, entropy (nats) of the full model's next-token distribution, the predicted (top-1) token
  and its corpus frequency ``counts[token] / counts.sum()``;
- per model: Spearman rank correlation of density with entropy and with the predicted token's corpus frequency
  (with a two-sided permutation p-value, :func:`permutation_test`); the distribution of densities;
- per model and context length ``c``: the density, the graph's edge count ``n_edges(c)`` and the number of edges
  the s-Trace needs to reach ``TV <= tv_threshold`` (:func:`edges_needed`: 0 when the empty graph
  already does, ``inf`` when no snapshot does); the fitted slope of ``log(edges needed)`` and of ``log(n_edges)``
  against ``log(c)`` (:func:`loglog_slope`, over the lengths where edges needed is finite and positive).
  Attention edges grow as ``c (c + 1) / 2`` per head, so ``n_edges`` has slope close to 2; an input whose needed
  edges have slope near 1 needs a computation linear in the context, near 2 one that grows with the whole
  attention pattern;
- across models (2 or more): Spearman of their densities on the same inputs, per pair;
- mean TV / top-1 / top-p curves (with interquartile band) per method and the mean composition of the kept
  edges per snapshot fraction, over the full-length traces.

Everything returned is JSON-able: non-finite floats (``nan``, ``inf``) are written as ``None``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch

from .._checks import fail
from .strace import DEFAULT_FRACTIONS, TraceResult, trace_input

METHODS = ("strace", "random", "complement_sample", "complement")
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
HIST_BINS = 20


# ----------------------------------------------------------------------------------------------------- statistics
def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..n of the entries of the 1-D array ``x``; tied entries get the average of the ranks they span."""
    a = np.asarray(x, dtype=float).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    srt = a[order]
    # start of each run of equal values in sorted order
    new = np.concatenate([[True], srt[1:] != srt[:-1]])
    run_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [a.size]])          # exclusive
    avg = 0.5 * (starts + 1 + ends)                          # mean of ranks starts+1 .. ends
    ranks = np.empty(a.size)
    ranks[order] = avg[run_id]
    return ranks


def _pearson_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``rx`` ([n]) with each row of ``ry`` ([k, n]) (or with ``ry`` itself if 1-D)."""
    dx = rx - rx.mean()
    dy = ry - ry.mean(axis=-1, keepdims=True)
    num = (dy * dx).sum(-1)
    den = math.sqrt(float((dx * dx).sum())) * np.sqrt((dy * dy).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(num / den, -1.0, 1.0)


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (:func:`rankdata`) of ``x`` and
    ``y`` (1-D, equal length). ``nan`` when fewer than 2 pairs, when either input is constant, or when an input
    contains ``nan``."""
    a = np.asarray(x, dtype=float).reshape(-1)
    b = np.asarray(y, dtype=float).reshape(-1)
    if a.size != b.size:
        fail("spearman", f"x and y must have the same length, got {a.size} and {b.size}")
    if a.size < 2 or np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if np.all(ra == ra[0]) or np.all(rb == rb[0]):
        return float("nan")
    return float(_pearson_rows(ra, rb))


def permutation_test(x: Any, y: Any, *, n_perm: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{"rho", "p", "n", "n_perm"}``: Spearman's ``rho`` of ``x`` and ``y`` and its two-sided permutation
    p-value ``(1 + #{perm: |rho_perm| >= |rho| - 1e-12}) / (1 + n_perm)``, where each ``rho_perm`` pairs ``x``
    with a uniformly random permutation of ``y`` (``numpy.random.default_rng(seed)``). ``rho`` and ``p`` are
    ``nan`` where :func:`spearman` is."""
    a = np.asarray(x, dtype=float).reshape(-1)
    b = np.asarray(y, dtype=float).reshape(-1)
    rho = spearman(a, b)
    if math.isnan(rho):
        return {"rho": rho, "p": float("nan"), "n": int(a.size), "n_perm": int(n_perm)}
    ra, rb = rankdata(a), rankdata(b)
    rng = np.random.default_rng(seed)
    perm = rng.permuted(np.broadcast_to(rb, (n_perm, rb.size)).copy(), axis=1)
    rp = _pearson_rows(ra, perm)
    hits = int(np.count_nonzero(np.abs(rp) >= abs(rho) - 1e-12))
    return {"rho": rho, "p": (1 + hits) / (1 + n_perm), "n": int(a.size), "n_perm": int(n_perm)}


def bootstrap_ci(stat: Any, *arrays: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap interval of ``stat(*arrays)``: the arrays (1-D, equal length ``n``) are resampled
    together, ``n`` rows with replacement, ``n_boot`` times (``numpy.random.default_rng(seed)``).
    Returns ``{"value", "lo", "hi", "level", "n_boot"}``; resamples where ``stat`` is ``nan`` (e.g. a
    constant resample for :func:`spearman`) are left out of the quantiles."""
    arrs = [np.asarray(a, dtype=float).reshape(-1) for a in arrays]
    n = arrs[0].size
    if any(a.size != n for a in arrs):
        fail("bootstrap_ci", f"arrays must have equal lengths, got {[a.size for a in arrs]}")
    value = float(stat(*arrs))
    if n < 2:
        return {"value": value, "lo": float("nan"), "hi": float("nan"), "level": level, "n_boot": int(n_boot)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    vals = np.array([float(stat(*[a[ix] for a in arrs])) for ix in idx])
    vals = vals[np.isfinite(vals)]
    a = (1.0 - level) / 2
    lo, hi = (float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))) if vals.size else (float("nan"),) * 2
    return {"value": value, "lo": lo, "hi": hi, "level": level, "n_boot": int(n_boot)}


def correlation(x: Any, y: Any, *, n_perm: int = 1000, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """:func:`permutation_test` of ``x`` and ``y`` plus a bootstrap interval of Spearman's rho
    (``"ci": [lo, hi]``, 95 %)."""
    out = permutation_test(x, y, n_perm=n_perm, seed=seed)
    b = bootstrap_ci(spearman, x, y, n_boot=n_boot, seed=seed)
    out["ci"] = [b["lo"], b["hi"]]
    return out


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log(y)`` against ``log(x)`` over the pairs where both are finite and positive
    (``y = a x^k`` gives ``k``); ``nan`` when fewer than 2 such pairs with distinct ``x``."""
    a = np.asarray(x, dtype=float).reshape(-1)
    b = np.asarray(y, dtype=float).reshape(-1)
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    lx, ly = np.log(a[ok]), np.log(b[ok])
    if lx.size < 2 or np.all(lx == lx[0]):
        return float("nan")
    dx = lx - lx.mean()
    return float((dx * (ly - ly.mean())).sum() / (dx * dx).sum())


def edges_needed(sizes: Sequence[int], tv: Sequence[float], threshold: float = 0.1, *,
                 empty_tv: float | None = None) -> float:
    """The number of edges at which the s-Trace first reaches ``TV <= threshold``: 0 if ``empty_tv`` (the TV of
    the graph with every edge zeroed) is given and already ``<= threshold``; ``sizes[0]`` if the first snapshot
    does (an upper bound); otherwise, for the first snapshot ``j`` with ``tv[j] <= threshold``, linear
    interpolation of ``log(size)`` in TV between snapshots ``j - 1`` and ``j``; ``inf`` if no snapshot does."""
    if empty_tv is not None and empty_tv <= threshold:
        return 0.0
    s = np.asarray(sizes, dtype=float)
    t = np.asarray(tv, dtype=float)
    hit = np.flatnonzero(t <= threshold)
    if hit.size == 0:
        return float("inf")
    j = int(hit[0])
    if j == 0:
        return float(s[0])
    t0, t1 = t[j - 1], t[j]
    frac = (t0 - threshold) / (t0 - t1) if t0 > t1 else 1.0
    return float(math.exp(math.log(s[j - 1]) + frac * (math.log(s[j]) - math.log(s[j - 1]))))


def distribution(values: Sequence[float], *, bins: int = HIST_BINS, lo: float = 0.0,
                 hi: float = 1.0) -> dict[str, Any]:
    """``{"n", "mean", "std", "quantiles": {q: value}, "hist": {"edges", "counts"}}`` of ``values``: ``std`` with
    ``ddof=1`` (``nan`` for one value), quantiles by linear interpolation at :data:`QUANTILES`, histogram of
    ``bins`` equal bins over ``[lo, hi]`` (values outside are clipped into the end bins)."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 0:
        fail("distribution", "values is empty; need at least one value")
    counts, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            "quantiles": {f"{q:g}": float(np.quantile(v, q)) for q in QUANTILES},
            "hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


# ---------------------------------------------------------------------------------------------------------- inputs
def windows_from_text(data: bytes, n: int, length: int, seed: int = 0, *, random: bool = False) -> torch.Tensor:
    """``n`` windows of ``length`` consecutive bytes of ``data`` as token ids (``torch.long`` ``[n, length]``, one
    token per byte). Starts are ``round(linspace(0, len(data) - length, n))`` (evenly spaced, first and last window
    at the ends of the text; the first if ``n == 1``), or with ``random=True`` ``n`` distinct starts drawn
    uniformly without replacement (``numpy.random.default_rng(seed)``) and sorted. Needs
    ``len(data) - length + 1 >= n`` so that the ``n`` windows are distinct."""
    where = "windows_from_text"
    if isinstance(data, str):
        fail(where, "data must be bytes (encode the text first, e.g. text.encode('utf-8')), got str", TypeError)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        fail(where, f"data must be bytes, bytearray or memoryview, got {type(data).__name__}", TypeError)
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    for name, v in (("n", n), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            fail(where, f"{name} = {v!r}; must be an int >= 1")
    n, length = int(n), int(length)
    n_starts = buf.size - length + 1
    if buf.size < length:
        fail(where, f"data is too short: {buf.size} bytes, but length = {length} needs at least {length} bytes")
    if n_starts < n:
        fail(where, f"data is too short: {buf.size} bytes give {n_starts} distinct windows of length = {length}, "
                    f"but n = {n} were asked for; need at least {length + n - 1} bytes")
    if random:
        starts = np.sort(np.random.default_rng(seed).choice(n_starts, size=n, replace=False))
    elif n == 1:
        starts = np.zeros(1, dtype=np.int64)
    else:
        starts = np.round(np.linspace(0, n_starts - 1, n)).astype(np.int64)
    idx = starts[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(buf[idx].astype(np.int64))


# ----------------------------------------------------------------------------------------------------------- study
def _clean(x: Any) -> Any:
    """Replace non-finite floats by ``None`` and NumPy scalars/arrays by Python values, recursively."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_clean(v) for v in x.tolist()]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    return x


def _curves(traces: list[TraceResult], methods: Sequence[str] = METHODS
            ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per method and metric: mean, 25th and 75th percentile across traces, per snapshot fraction."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in methods:
        out[method] = {}
        for metric in ("tv", "top1", "top_p"):
            a = np.asarray([t.metrics[method][metric] for t in traces], dtype=float)
            out[method][metric] = {"mean": a.mean(0).tolist(), "q25": np.quantile(a, 0.25, axis=0).tolist(),
                                   "q75": np.quantile(a, 0.75, axis=0).tolist()}
    return out


def _mean_composition(traces: list[TraceResult]) -> list[dict[str, float]]:
    """Per snapshot: the mean over traces of each ``kind/quartile`` share (0 where a trace has none)."""
    keys = sorted({k for t in traces for comp in t.composition for k in comp})
    n_snap = len(traces[0].composition)
    return [{k: float(np.mean([t.composition[j].get(k, 0.0) for t in traces])) for k in keys} for j in range(n_snap)]


def _check_study_args(models: Any, windows: Any, corpus_counts: Any, context_lengths: Any,
                      tv_threshold: Any) -> tuple[torch.Tensor, tuple[int, ...], np.ndarray | None]:
    where = "density_study"
    if not isinstance(models, dict):
        fail(where, f"models must be a dict name -> model, got {type(models).__name__}", TypeError)
    if not models:
        fail(where, "models is empty; pass at least one model")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        desc = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        fail(where, f"windows must be a 2-D torch tensor [n_inputs, T] of token ids, got {desc}", TypeError)
    if windows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        fail(where, f"windows has dtype {windows.dtype}; allowed: integer token ids (torch.long)", TypeError)
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        fail(where, f"windows has shape {tuple(windows.shape)}; need at least 1 input of at least 2 tokens")
    windows = windows.long().cpu()
    if int(windows.min()) < 0:
        fail(where, f"windows contains the negative token id {int(windows.min())}; token ids must be >= 0")
    t = windows.shape[1]
    cl = tuple(context_lengths)
    if not cl or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 2 <= c <= t for c in cl):
        fail(where, f"context_lengths = {cl!r}; each must be an int in [2, T = {t}] (the window length)")
    if len(set(cl)) != len(cl):
        fail(where, f"context_lengths = {cl!r}; must not repeat a length")
    cl = tuple(sorted(int(c) for c in cl))
    if not (isinstance(tv_threshold, (int, float)) and 0 < tv_threshold < 1):
        fail(where, f"tv_threshold = {tv_threshold!r}; must be a number in (0, 1)")
    counts = None
    if corpus_counts is not None:
        counts = np.asarray(corpus_counts, dtype=float)
        if counts.ndim != 1 or counts.size == 0 or not np.all(np.isfinite(counts)) or np.any(counts < 0) \
                or counts.sum() <= 0:
            fail(where, f"corpus_counts must be a 1-D array of finite counts >= 0 with a positive sum (one per token "
                        f"id), got shape {counts.shape}")
    for name, model in models.items():
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and int(windows.max()) >= vocab:
            fail(where, f"windows contains token id {int(windows.max())}, outside model {name!r}'s vocab_size {vocab}")
        if vocab is not None and counts is not None and counts.size < vocab:
            fail(where, f"corpus_counts has {counts.size} entries, fewer than model {name!r}'s vocab_size {vocab}")
    return windows, cl, counts


def density_study(models: dict[str, Any], windows: torch.Tensor, *, corpus_counts: np.ndarray | None = None,
                  context_lengths: Sequence[int] = (16, 32, 64, 128),
                  fractions: tuple[float, ...] = DEFAULT_FRACTIONS, key: str = "flow", top_p: float = 0.9,
                  tv_threshold: float = 0.1, n_perm: int = 1000, seed: int = 0,
                  batch: int = 32, methods: tuple[str, ...] = METHODS,
                  context_methods: tuple[str, ...] | None = None, targets: Any = None,
                  progress: Any = None) -> dict[str, Any]:
    """Computation density of every model on every window, its correlates, its context-length scaling and the
    agreement between models (see the module docstring). Input ``i`` is traced with ``seed + i`` for the random
    controls; lengths in ``context_lengths`` equal to ``T`` reuse the full-length trace.

    ``methods``: the subgraph families evaluated on the full-length traces (:func:`~.strace.trace_input`);
    ``context_methods``: those evaluated on the truncations (default ``methods``; ``("strace",)`` skips the
    controls there, which only the full-length curves need). ``targets``: ``[n_inputs]`` token ids of the
    text's real next tokens; each record then also has ``"target"``, ``"target_freq"`` (its corpus frequency)
    and ``"target_logp"``, and the correlations ``"density_target_freq"`` and ``"density_target_logp"``.
    ``progress``: called as ``progress(model_name, i)`` before input ``i`` of each model is traced.

    Returns (JSON-able; ``None`` for non-finite values)::

        {"n_inputs", "n_tokens" (T), "fractions", "context_lengths", "tv_threshold", "key", "top_p", "n_perm",
         "corpus_counts_source" ("given" | "windows"), "seconds",
         "models": {name: {
             "inputs": [{"index", "density", "entropy", "predicted", "predicted_freq", "n_edges", "empty_tv",
                         "edges_needed" (at T), "context": [{"c", "density", "n_edges", "edges_needed"}, ...],
                         "slope_edges_needed"}],
             "density": distribution() of the densities,
             "correlations": {"density_entropy": permutation_test(), "density_predicted_freq": permutation_test()},
             "context": {"lengths", "density_mean", "density_median", "n_edges" (mean), "edges_needed_median",
                         "n_reached" (inputs reaching the threshold, per c), "slope_n_edges",
                         "slope_edges_needed_median" (of the per-input slopes), "slope_edges_needed_mean",
                         "slope_edges_needed_of_median" (slope of the median curve)},
             "curves": {method: {"tv"|"top1"|"top_p": {"mean", "q25", "q75"}}},
             "composition": [{"kind/qN": mean share}, ...] per fraction,
             "seconds"}},
         "cross_model": [{"a", "b", "rho", "p", "n", "n_perm"}, ...]}
    """
    windows, cl, counts = _check_study_args(models, windows, corpus_counts, context_lengths, tv_threshold)
    t0 = time.perf_counter()
    n_in, t_len = windows.shape
    source = "given"
    if counts is None:
        source = "windows"
        vmax = max([int(windows.max()) + 1] + [int(getattr(getattr(m, "config", None), "vocab_size", 0) or 0)
                                               for m in models.values()])
        counts = np.bincount(windows.reshape(-1).numpy(), minlength=vmax).astype(float)
    freq = counts / counts.sum()
    methods = tuple(dict.fromkeys(("strace",) + tuple(methods)))
    c_methods = methods if context_methods is None else tuple(dict.fromkeys(("strace",) + tuple(context_methods)))
    tg = None
    if targets is not None:
        tg = np.asarray(targets, dtype=np.int64).reshape(-1)
        if tg.size != n_in or tg.min() < 0 or tg.max() >= freq.size:
            fail("density_study", f"targets must hold {n_in} token ids in [0, {freq.size}), got {tg.size} ids")
    out_models: dict[str, Any] = {}
    for name, model in models.items():
        tm = time.perf_counter()
        records: list[dict[str, Any]] = []
        full_traces: list[TraceResult] = []
        for i in range(n_in):
            w = windows[i]
            if progress is not None:
                progress(name, i)
            tgt = None if tg is None else int(tg[i])
            full = trace_input(model, w, fractions=fractions, key=key, top_p=top_p, seed=seed + i, batch=batch,
                               methods=methods, target=tgt)
            full_traces.append(full)
            ctx = []
            for c in cl:
                r = full if c == t_len else trace_input(model, w[-c:], fractions=fractions, key=key, top_p=top_p,
                                                        seed=seed + i, batch=batch, methods=c_methods)
                ctx.append({"c": c, "density": r.density, "n_edges": r.n_edges,
                            "edges_needed": edges_needed(r.sizes, r.metrics["strace"]["tv"], tv_threshold,
                                                         empty_tv=r.empty_tv)})
            if full.predicted >= freq.size:
                fail("density_study", f"model {name!r} predicted token {full.predicted}, outside corpus_counts "
                                      f"({freq.size} entries)")
            records.append({
                "index": i, "density": full.density, "entropy": full.entropy, "predicted": full.predicted,
                "predicted_freq": float(freq[full.predicted]), "n_edges": full.n_edges, "empty_tv": full.empty_tv,
                "edges_needed": edges_needed(full.sizes, full.metrics["strace"]["tv"], tv_threshold,
                                             empty_tv=full.empty_tv),
                "context": ctx,
                "slope_edges_needed": loglog_slope(cl, [x["edges_needed"] for x in ctx])})
            if tgt is not None:
                records[-1].update(target=tgt, target_freq=float(freq[tgt]), target_logp=full.extra["target_logp"])
        dens = np.array([r["density"] for r in records])
        ent = np.array([r["entropy"] for r in records])
        pf = np.array([r["predicted_freq"] for r in records])
        need = np.array([[x["edges_needed"] for x in r["context"]] for r in records], dtype=float)   # [n, C]
        n_e = np.array([[x["n_edges"] for x in r["context"]] for r in records], dtype=float)
        c_dens = np.array([[x["density"] for x in r["context"]] for r in records], dtype=float)
        slopes = np.array([r["slope_edges_needed"] for r in records], dtype=float)
        fin = slopes[np.isfinite(slopes)]
        need_med = np.median(need, axis=0)          # inf where more than half never reach the threshold
        out_models[name] = {
            "inputs": records,
            "density": distribution(dens),
            "correlations": {"density_entropy": permutation_test(dens, ent, n_perm=n_perm, seed=seed),
                             "density_predicted_freq": permutation_test(dens, pf, n_perm=n_perm, seed=seed),
                             **({} if tg is None else {
                                 "density_target_freq": permutation_test(
                                     dens, [r["target_freq"] for r in records], n_perm=n_perm, seed=seed),
                                 "density_target_logp": permutation_test(
                                     dens, [r["target_logp"] for r in records], n_perm=n_perm, seed=seed)})},
            "context": {"lengths": list(cl), "density_mean": c_dens.mean(0), "density_median": np.median(c_dens, 0),
                        "n_edges": n_e.mean(0), "edges_needed_median": need_med,
                        "n_reached": np.isfinite(need).sum(0),
                        "slope_n_edges": loglog_slope(cl, n_e.mean(0)),
                        "slope_edges_needed_median": float(np.median(fin)) if fin.size else float("nan"),
                        "slope_edges_needed_mean": float(fin.mean()) if fin.size else float("nan"),
                        "slope_edges_needed_of_median": loglog_slope(cl, need_med)},
            "curves": _curves(full_traces, methods),
            "composition": _mean_composition(full_traces),
            "seconds": time.perf_counter() - tm}
    cross = []
    for a, b in combinations(list(models), 2):
        da = [r["density"] for r in out_models[a]["inputs"]]
        db = [r["density"] for r in out_models[b]["inputs"]]
        cross.append({"a": a, "b": b, **permutation_test(da, db, n_perm=n_perm, seed=seed)})
    return _clean({"n_inputs": n_in, "n_tokens": t_len, "fractions": list(fractions), "context_lengths": list(cl),
                   "tv_threshold": tv_threshold, "key": key, "top_p": top_p, "n_perm": n_perm,
                   "corpus_counts_source": source, "models": out_models, "cross_model": cross,
                   "seconds": time.perf_counter() - t0})
