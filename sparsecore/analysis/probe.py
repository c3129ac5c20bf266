"""Compressed-sensing probe: which units (attention heads, FFN channel blocks, prompt tokens) does the last
position's prediction depend on, measured with far fewer forwards than units?

Give every unit ``j`` a scalar gate ``g[j]`` (1 = the unmodified model) and let ``f(g)`` be the log-probability,
at the last position, of the full model's top-1 next token. Near ``g = 1``, ``f(1 + delta * a) - f(1) ~= delta *
a @ grad f(1)``, so ``m`` random sign directions ``a_i`` (the rows of ``A[m, p]``) give ``m`` linear measurements
of ``x = grad f(1)``::

    y[i] = (f(1 + delta * A[i]) - f(1)) / delta               # scheme="forward" (one forward per row)
    y[i] = (f(1 + delta * A[i]) - f(1 - delta * A[i])) / (2 * delta)   # scheme="central" (two, O(delta^2))
    x_hat = argmin ||y - A x||  subject to  ||x||_0 <= k      # greedily, by orthogonal matching pursuit

If ``x`` is (nearly) ``k``-sparse, ``m ~ C * k * log(p / k)`` rows recover it (compressed sensing; a random
sign matrix has the restricted isometry property with high probability), so a probe costs ``m`` batched
forwards instead of the ``p`` of a per-unit sweep. The gates reach the model through
:class:`~sparsecore.analysis.hooks.Tracer`: ``head[L, B, H]``, ``ffn_block[L, B, nb]`` and ``token[B, T]``
multipliers, one batch row per direction. On small models the result is checked against the exact
gradient (autograd through the same gates) and against knock-outs (each unit zeroed alone).

Unit order in ``x`` (and in :attr:`ProbeResult.units`): every head (layer-major), then every FFN block
(layer-major), then every prompt token, restricted to the kinds named in ``units``.

Why our own OMP (:func:`omp`) rather than scikit-learn's ``OrthogonalMatchingPursuit``:

- no dependency: the probe is part of the library, scikit-learn only of the ``analysis``/``dev`` extras;
- the algorithm is exactly the textbook one and is stated here (selection by ``|A_n^T r|`` over unit-norm
  columns ``A_n``, a least-squares refit on the whole support at every step, the two stopping rules), so a
  result can be reproduced by reading the docstring; scikit-learn's version runs Cholesky updates with its
  own tolerances and selects by ``|A^T r|`` on the raw columns (it assumes unit-norm columns, so on columns
  of unequal norm it picks different atoms; on unit-norm columns the two agree);
- the refit uses the un-normalised columns with ``numpy.linalg.lstsq``, so the coefficients are on the
  scale of ``x``.

``solver="sklearn_omp"`` (``OrthogonalMatchingPursuit``) and ``solver="lasso"`` (``LassoCV``, L1 with a
cross-validated penalty) run the scikit-learn solvers when it is installed, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._checks import fail
from .density import spearman
from .hooks import Intervention, Tracer, model_dims

__all__ = ["omp", "solve_sparse", "default_k", "synthetic_recovery", "probe_function", "ProbeResult",
           "probe_model", "recovery_vs_m", "quality", "UNIT_KINDS", "SOLVERS"]

UNIT_KINDS = ("head", "ffn_block", "token")
SOLVERS = ("omp", "sklearn_omp", "lasso", "lstsq")


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------

def _int_arg(where: str, name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        fail(where, f"{name} = {v!r}; must be an int >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        fail(where, f"{name} = {v}; allowed {lo} <= {name}" + (f" <= {hi}" if hi is not None else ""))
    return v


def _float_arg(where: str, name: str, v: Any, lo: float = 0.0, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        fail(where, f"{name} = {v!r}; must be a finite real number {'>' if strict else '>='} {lo}")
    v = float(v)
    if v < lo or (strict and v == lo):
        fail(where, f"{name} = {v}; must be {'>' if strict else '>='} {lo}")
    return v


def _check_solver(where: str, solver: Any, allowed: Sequence[str] = SOLVERS) -> str:
    if solver not in allowed:
        fail(where, f"solver = {solver!r}; allowed: {', '.join(repr(s) for s in allowed)}")
    return str(solver)


# --------------------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------------------

def omp(A: Any, y: Any, k: int | None = None, tol: float | None = None) -> np.ndarray:
    """Orthogonal matching pursuit: a ``k``-sparse ``x[p]`` with ``A @ x ~= y`` (float64). Meaning::

        n = np.linalg.norm(A, axis=0); S = []; x = 0; r = y
        while len(S) < k_max and np.linalg.norm(r) > tol * np.linalg.norm(y):
            c = np.abs(A.T @ r) / n;  c[S] = 0;  c[n == 0] = 0      # correlation with unit-norm columns
            if c.max() == 0: break                                   # r is orthogonal to every column left
            S.append(argmax(c))                                      # the first of equal maxima
            x[S] = lstsq(A[:, S], y)                                 # refit on the whole support
            r = y - A[:, S] @ x[S]

    ``A[m, p]`` and ``y[m]`` finite. ``k``: at most this many atoms, ``1 <= k <= min(m, p)``; ``tol``: stop
    once ``||r|| <= tol * ||y||``, ``tol >= 0``. Both ``None``: ``k_max = min(m, p)`` and ``tol = 1e-10``
    (run until ``y`` is explained). With only one given, the other does not stop the loop (beyond
    ``min(m, p)`` atoms). ``y = 0`` returns ``x = 0``.
    """
    w = "omp"
    A = np.asarray(A, dtype=np.float64) if not isinstance(A, torch.Tensor) else A.detach().double().cpu().numpy()
    y = np.asarray(y, dtype=np.float64) if not isinstance(y, torch.Tensor) else y.detach().double().cpu().numpy()
    if A.ndim != 2 or A.shape[0] < 1 or A.shape[1] < 1:
        fail(w, f"A has shape {A.shape}; expected a non-empty matrix [m, p]")
    m, p = A.shape
    if y.shape != (m,):
        fail(w, f"y has shape {y.shape}; expected ({m},), one value per row of A [m={m}, p={p}]")
    if not np.isfinite(A).all():
        fail(w, "A has non-finite entries; all entries must be finite")
    if not np.isfinite(y).all():
        fail(w, "y has non-finite entries; all entries must be finite")
    k_max = min(m, p)
    if k is not None:
        k_max = _int_arg(w, "k", k, 1, min(m, p))
    if tol is not None:
        tol_v = _float_arg(w, "tol", tol)
    else:
        tol_v = 1e-10 if k is None else 0.0
    x = np.zeros(p)
    y_norm = float(np.linalg.norm(y))
    if y_norm == 0.0:
        return x
    norms = np.linalg.norm(A, axis=0)
    usable = norms > 0
    inv = np.where(usable, 1.0 / np.where(usable, norms, 1.0), 0.0)
    support: list[int] = []
    r = y.copy()
    coef = np.zeros(0)
    while len(support) < k_max and np.linalg.norm(r) > tol_v * y_norm:
        c = np.abs(A.T @ r) * inv
        c[support] = 0.0
        j = int(np.argmax(c))
        if c[j] <= 1e-14 * y_norm * float(norms.max()):
            break
        support.append(j)
        coef = np.linalg.lstsq(A[:, support], y, rcond=None)[0]
        r = y - A[:, support] @ coef
    x[support] = coef
    return x


def _sklearn(where: str) -> Any:
    try:
        import sklearn.linear_model as lm
    except ImportError:  # pragma: no cover - scikit-learn is in the analysis and dev extras
        fail(where, "solver needs scikit-learn (pip install 'sparsecore[analysis]'); use solver='omp'", ImportError)
    return lm


def solve_sparse(A: np.ndarray, y: np.ndarray, solver: str = "omp", k: int | None = None, *,
                 seed: int = 0) -> np.ndarray:
    """Recover ``x[p]`` from ``y[m] = A[m, p] @ x``:

    - ``"omp"``: :func:`omp` with ``k`` atoms (``None``: until ``y`` is explained);
    - ``"sklearn_omp"``: scikit-learn's ``OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False)``;
    - ``"lasso"``: scikit-learn's ``LassoCV(fit_intercept=False, cv=min(5, m))`` (``k`` unused; the L1
      penalty is chosen by cross-validation, so coefficients are shrunk towards 0);
    - ``"lstsq"``: the minimum-norm least-squares solution (dense; the ground truth when ``m >= p``).
    """
    w = "solve_sparse"
    solver = _check_solver(w, solver)
    A = np.asarray(A, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, p = A.shape
    if k is not None:
        k = _int_arg(w, "k", k, 1, min(m, p))
    if solver == "omp":
        return omp(A, y, k=k)
    if solver == "lstsq":
        return np.linalg.lstsq(A, y, rcond=None)[0]
    lm = _sklearn(w)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # convergence / rank warnings on underdetermined problems
        if solver == "sklearn_omp":
            est = lm.OrthogonalMatchingPursuit(n_nonzero_coefs=k if k is not None else min(m, p), fit_intercept=False)
            est.fit(A, y)
            return np.asarray(est.coef_, dtype=np.float64)
        if m < 3:
            fail(w, f"solver = 'lasso' needs m >= 3 measurements for cross-validation, got m = {m}")
        est = lm.LassoCV(fit_intercept=False, cv=min(5, m), random_state=seed, max_iter=5000)
        est.fit(A, y)
        return np.asarray(est.coef_, dtype=np.float64)


def default_k(m: int, p: int) -> int:
    """The sparsity a probe with ``m`` measurements of ``p`` unknowns asks for when ``k`` is not given: the
    largest ``k`` such that ``2 * j * ln(p / j) <= m`` for every ``j <= k`` (at least 1, at most
    ``min(m, p)``); ``min(m, p)`` when ``m >= p`` (then the system is determined and OMP ends as least
    squares)."""
    if m >= p:
        return min(m, p)
    best = 1
    for k in range(2, min(m, p) + 1):      # the first k past the bound ends the search (the bound is not monotone)
        if 2 * k * math.log(p / k) > m:
            break
        best = k
    return best


# --------------------------------------------------------------------------------------------------
# synthetic recovery
# --------------------------------------------------------------------------------------------------

def _support(x: np.ndarray, rel: float = 1e-6) -> np.ndarray:
    scale = float(np.abs(x).max()) if x.size else 0.0
    return np.abs(x) > rel * scale if scale > 0 else np.zeros(x.shape, dtype=bool)


def synthetic_recovery(p: int, k: int, ms: Sequence[int], trials: int, noise: float = 0.0, seed: int = 0,
                       solver: str | Sequence[str] = "omp") -> dict[str, Any]:
    """Recovery rate of a planted ``k``-sparse ``x[p]`` from ``m`` random measurements, for each ``m`` in ``ms``.

    Per trial: ``x`` has ``k`` non-zeros at a uniformly random support with standard normal values;
    ``A[m, p]`` has independent entries ``+-1 / sqrt(m)``; ``y = A @ x + noise * ||A @ x|| / sqrt(m) * e``
    with ``e`` standard normal (``noise`` is the relative noise level); ``x_hat`` comes from each solver
    (``"omp"``: ours with ``k`` atoms; ``"sklearn_omp"``, ``"lasso"``: scikit-learn; ``"all"``: those three).

    Returns ``{"p", "k", "ms", "trials", "noise", "klogpk": k * ln(p / k), "solvers": {name: {"success",
    "support", "rel_err"}}}`` with one value per ``m``: ``success`` the fraction of trials with
    ``||x_hat - x|| / ||x|| < 1e-2``, ``support`` the fraction whose support (entries above ``1e-6`` of the
    largest) equals the planted one, ``rel_err`` the mean relative L2 error.
    """
    w = "synthetic_recovery"
    p = _int_arg(w, "p", p, 1)
    k = _int_arg(w, "k", k, 1, p)
    trials = _int_arg(w, "trials", trials, 1)
    noise = _float_arg(w, "noise", noise)
    if isinstance(ms, (int, np.integer)) or not isinstance(ms, Sequence) or len(ms) == 0:
        fail(w, f"ms = {ms!r}; must be a non-empty sequence of measurement counts")
    ms = [_int_arg(w, f"ms[{i}]", v, 1) for i, v in enumerate(ms)]
    solvers = ["omp", "sklearn_omp", "lasso"] if solver == "all" else ([solver] if isinstance(solver, str)
                                                                      else list(solver))
    if not solvers:
        fail(w, "solver = []; name at least one of 'omp', 'sklearn_omp', 'lasso', or 'all'")
    for s in solvers:
        _check_solver(w, s, ("omp", "sklearn_omp", "lasso"))
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[float]]] = {s: {"success": [], "support": [], "rel_err": []} for s in solvers}
    for m in ms:
        acc = {s: [0, 0, 0.0] for s in solvers}
        for _ in range(trials):
            x = np.zeros(p)
            supp = rng.choice(p, size=k, replace=False)
            x[supp] = rng.standard_normal(k)
            A = rng.choice([-1.0, 1.0], size=(m, p)) / math.sqrt(m)
            y = A @ x
            if noise > 0:
                y = y + noise * np.linalg.norm(y) / math.sqrt(m) * rng.standard_normal(m)
            for s in solvers:
                kk = min(k, m, p)
                if s == "lasso" and m < 3:
                    x_hat = np.zeros(p)
                else:
                    x_hat = solve_sparse(A, y, s, kk, seed=seed)
                err = float(np.linalg.norm(x_hat - x) / np.linalg.norm(x))
                acc[s][0] += err < 1e-2
                acc[s][1] += bool(np.array_equal(_support(x_hat), x != 0))
                acc[s][2] += err
        for s in solvers:
            out[s]["success"].append(acc[s][0] / trials)
            out[s]["support"].append(acc[s][1] / trials)
            out[s]["rel_err"].append(acc[s][2] / trials)
    return {"p": p, "k": k, "ms": ms, "trials": trials, "noise": noise, "klogpk": k * math.log(p / k),
            "solvers": out}


# --------------------------------------------------------------------------------------------------
# quality of a recovered vector against a ground truth
# --------------------------------------------------------------------------------------------------

def quality(x: np.ndarray, truth: np.ndarray, top: int | None = None) -> dict[str, float]:
    """How well ``x`` matches ``truth`` (both ``[p]``)::

        rel_err      = ||x - truth|| / ||truth||
        cosine       = x @ truth / (||x|| ||truth||)          (0 when x = 0)
        spearman_abs = spearman(|x|, |truth|)
        top_overlap  = |top_n(|x|) & top_n(|truth|)| / n,  n = top or the number of non-zeros of x (>= 1)
        best_k_err   = ||truth - (truth restricted to its n largest |.|)|| / ||truth||
                       (the error of the best n-sparse vector: a floor for any n-sparse x)
    """
    x = np.asarray(x, float)
    t = np.asarray(truth, float)
    tn = float(np.linalg.norm(t))
    xn = float(np.linalg.norm(x))
    n = top if top is not None else max(1, int(np.count_nonzero(_support(x))))
    n = min(n, t.size)
    tx = set(np.argsort(-np.abs(x), kind="stable")[:n].tolist())
    tt_idx = np.argsort(-np.abs(t), kind="stable")[:n]
    rest = t.copy()
    rest[tt_idx] = 0
    return {
        "rel_err": float(np.linalg.norm(x - t) / tn) if tn > 0 else float("nan"),
        "cosine": float(x @ t / (xn * tn)) if xn > 0 and tn > 0 else 0.0,
        "spearman_abs": spearman(np.abs(x), np.abs(t)),
        "top_overlap": len(tx & set(tt_idx.tolist())) / n,
        "top_n": n,
        "best_k_err": float(np.linalg.norm(rest) / tn) if tn > 0 else float("nan"),
    }


# --------------------------------------------------------------------------------------------------
# the generic probe
# --------------------------------------------------------------------------------------------------

def probe_function(fn: Callable[[np.ndarray], np.ndarray], p: int, *, m: int, delta: float = 0.05,
                   solver: str = "omp", k: int | None = None, seed: int = 0, scheme: str = "forward",
                   f0: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probe any ``fn(G[n, p]) -> [n]`` (gates in, one scalar per row out) at ``g = 1``: ``(x_hat, A, y)``.

    ``A[m, p]`` has independent ``+-1`` entries (seeded), ``y`` as in the module docstring, and ``x_hat =
    solve_sparse(A, y, solver, k)`` with ``k = default_k(m, p)`` when not given (``k`` unused by
    ``"lasso"``/``"lstsq"``). ``f0``: ``fn(ones)`` if already known.
    """
    w = "probe_function"
    p = _int_arg(w, "p", p, 1)
    m = _int_arg(w, "m", m, 1)
    delta = _float_arg(w, "delta", delta, 0.0, strict=True)
    solver = _check_solver(w, solver)
    if scheme not in ("forward", "central"):
        fail(w, f"scheme = {scheme!r}; allowed: 'forward', 'central'")
    if k is not None:
        k = _int_arg(w, "k", k, 1, min(m, p))
    rng = np.random.default_rng(seed)
    A = rng.choice([-1.0, 1.0], size=(m, p))
    if scheme == "forward":
        base = float(np.asarray(fn(np.ones((1, p))))[0]) if f0 is None else float(f0)
        y = (np.asarray(fn(1.0 + delta * A), dtype=np.float64) - base) / delta
    else:
        y = (np.asarray(fn(1.0 + delta * A), np.float64) - np.asarray(fn(1.0 - delta * A), np.float64)) / (2 * delta)
    kk = k if k is not None else default_k(m, p)
    s = 1.0 / math.sqrt(m)                    # solve at the usual CS scale (columns of norm 1); same x
    x = solve_sparse(A * s, y * s, solver, kk if solver in ("omp", "sklearn_omp") else None, seed=seed)
    return x, A, y


# --------------------------------------------------------------------------------------------------
# the model probe
# --------------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    layers: int
    heads: int
    n_blocks: int
    tokens: int
    ffn_block_size: int
    kinds: tuple[str, ...]

    @property
    def sizes(self) -> dict[str, int]:
        return {"head": self.layers * self.heads, "ffn_block": self.layers * self.n_blocks, "token": self.tokens}

    @property
    def p(self) -> int:
        return sum(self.sizes[k] for k in self.kinds)

    def slices(self) -> dict[str, slice]:
        out, lo = {}, 0
        for kind in self.kinds:
            out[kind] = slice(lo, lo + self.sizes[kind])
            lo += self.sizes[kind]
        return out

    def names(self) -> list[str]:
        out: list[str] = []
        for kind in self.kinds:
            if kind == "head":
                out += [f"L{i}.head{h}" for i in range(self.layers) for h in range(self.heads)]
            elif kind == "ffn_block":
                out += [f"L{i}.ffn{j}" for i in range(self.layers) for j in range(self.n_blocks)]
            else:
                out += [f"tok{t}" for t in range(self.tokens)]
        return out

    def intervention(self, G: torch.Tensor) -> Intervention:
        """Gates ``G[n, p]`` -> the Tracer's per-row multipliers."""
        n = G.shape[0]
        sl = self.slices()
        iv = Intervention(ffn_block_size=self.ffn_block_size)
        if "head" in sl:
            iv.head = G[:, sl["head"]].reshape(n, self.layers, self.heads).transpose(0, 1)
        if "ffn_block" in sl:
            iv.ffn_block = G[:, sl["ffn_block"]].reshape(n, self.layers, self.n_blocks).transpose(0, 1)
        if "token" in sl:
            iv.token = G[:, sl["token"]]
        return iv


@dataclass
class ProbeResult:
    """A model probe (see the module docstring). Vectors are ``[p]`` in the order of ``units``."""

    units: list[str]
    kinds: list[str]                  # the kind of each unit: "head", "ffn_block" or "token"
    x: np.ndarray                     # recovered gradient of f at g = 1
    gradient: np.ndarray | None       # exact (autograd) gradient, or None
    knockout: np.ndarray | None       # f(unit j zeroed alone) - f(1), or None
    m: int
    p: int
    k: int | None
    delta: float
    solver: str
    scheme: str
    f0: float                         # f(1): log-probability of the target token
    target: int                       # the full model's top-1 next token
    dims: dict[str, int]              # layers, heads, n_blocks, tokens, ffn_block_size
    quality: dict[str, dict[str, float]] = field(default_factory=dict)   # {"gradient"|"knockout": quality()}

    def values(self, kind: str, which: str = "x") -> np.ndarray:
        """``which`` ("x", "gradient", "knockout") of one kind, shaped ``[L, H]``, ``[L, nb]`` or ``[T]``."""
        v = getattr(self, which)
        if v is None:
            fail("ProbeResult.values", f"which = {which!r} was not computed")
        if kind not in self.kinds:
            fail("ProbeResult.values", f"kind = {kind!r} was not probed; probed: {sorted(set(self.kinds))}")
        sel = np.asarray(v)[np.asarray(self.kinds) == kind]
        d = self.dims
        shape = {"head": (d["layers"], d["heads"]), "ffn_block": (d["layers"], d["n_blocks"]),
                 "token": (d["tokens"],)}[kind]
        return sel.reshape(shape)

    def to_json(self) -> dict[str, Any]:
        def lst(v: np.ndarray | None) -> list[float] | None:
            return None if v is None else [float(t) for t in v]

        return {"units": self.units, "kinds": self.kinds, "x": lst(self.x), "gradient": lst(self.gradient),
                "knockout": lst(self.knockout), "m": self.m, "p": self.p, "k": self.k, "delta": self.delta,
                "solver": self.solver, "scheme": self.scheme, "f0": self.f0, "target": self.target,
                "dims": self.dims, "quality": self.quality}


def _check_model_args(where: str, model: Any, input_ids: Any, units: Any, ffn_block_size: Any
                      ) -> tuple[torch.Tensor, _Layout]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        fail(where, f"input_ids must be an integer torch tensor [T] or [1, T], got {type(input_ids).__name__}"
                    + (f" of dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
    if input_ids.ndim == 2 and input_ids.shape[0] != 1 or input_ids.ndim not in (1, 2):
        fail(where, f"input_ids has shape {tuple(input_ids.shape)}; expected [T] or [1, T] (one prompt)")
    ids = input_ids.reshape(1, -1)
    if ids.shape[1] < 1:
        fail(where, "input_ids is empty; expected at least one token")
    if isinstance(units, str) or not isinstance(units, Sequence) or not units:
        fail(where, f"units = {units!r}; must be a non-empty sequence of {', '.join(UNIT_KINDS)}")
    for u in units:
        if u not in UNIT_KINDS:
            fail(where, f"units contains {u!r}; allowed: {', '.join(repr(k) for k in UNIT_KINDS)}")
    if len(set(units)) != len(units):
        fail(where, f"units = {units!r} names a kind twice")
    dims = model_dims(model)
    bs = _int_arg(where, "ffn_block_size", ffn_block_size, 1)
    ffn = dims["ffn"]
    if "ffn_block" in units and (ffn <= 0 or ffn % bs):
        fail(where, f"ffn_block_size = {bs} does not divide the FFN width {ffn}; pick a divisor")
    kinds = tuple(k for k in UNIT_KINDS if k in units)
    return ids, _Layout(dims["layers"], dims["heads"], ffn // bs if ffn > 0 else 0, int(ids.shape[1]), bs, kinds)


def _model_fn(tr: Tracer, ids: torch.Tensor, lay: _Layout, target: int, batch: int
              ) -> Callable[[np.ndarray], np.ndarray]:
    device = ids.device

    def fn(G: np.ndarray) -> np.ndarray:
        out = []
        for lo in range(0, G.shape[0], batch):
            g = torch.as_tensor(G[lo:lo + batch], dtype=torch.float32, device=device)
            logits = tr.run(ids.expand(g.shape[0], -1), lay.intervention(g), last_only=True)
            out.append(torch.log_softmax(logits[:, -1].double(), -1)[:, target].cpu().numpy())
        return np.concatenate(out)
    return fn


def _baseline(tr: Tracer, ids: torch.Tensor, lay: _Layout, batch: int
              ) -> tuple[int, float, Callable[[np.ndarray], np.ndarray]]:
    """(the full model's top-1 next token, its log-probability ``f(1)``, ``f`` of a batch of gate rows)."""
    logp = torch.log_softmax(tr.run(ids, last_only=True)[0, -1].double(), -1)
    target = int(logp.argmax())
    return target, float(logp[target]), _model_fn(tr, ids, lay, target, batch)


def _autograd_gradient(tr: Tracer, ids: torch.Tensor, lay: _Layout, target: int) -> np.ndarray:
    """d f / d g at g = 1 through the same Tracer multipliers (one forward and backward)."""
    g = torch.ones(1, lay.p, dtype=torch.float32, device=ids.device, requires_grad=True)
    with torch.enable_grad():
        logits = tr.forward(ids, lay.intervention(g))
        f = torch.log_softmax(logits[0, -1].double(), -1)[target]
        (grad,) = torch.autograd.grad(f, g)
    return grad[0].double().cpu().numpy()


def probe_model(model: Any, input_ids: torch.Tensor, *, m: int, delta: float = 0.05, ffn_block_size: int = 64,
                units: Sequence[str] = UNIT_KINDS, solver: str = "omp", k: int | None = None, seed: int = 0,
                batch: int = 32, scheme: str = "forward", ground_truth: bool = True,
                knockout: bool = True) -> ProbeResult:
    """Probe one prompt (``input_ids [T]`` or ``[1, T]``) with ``m`` random gate directions; see the module
    docstring. ``f(g)`` is the log-probability of the full model's top-1 next token at the last position.

    ``ground_truth=True`` also computes the exact gradient (autograd through the gates: one forward and
    backward) and the knock-out effects (``p`` forwards, ``batch`` rows each) and fills
    :attr:`ProbeResult.quality` with :func:`quality` of ``x`` against the gradient and of ``-x`` against the
    knock-outs (a knock-out moves its gate by -1, so to first order its effect is ``-x[j]``; beyond first order
    they differ, so read that comparison for ranks and overlap); ``knockout=False`` skips the knock-outs.
    Forwards run ``batch`` gate rows at a time.
    """
    w = "probe_model"
    ids, lay = _check_model_args(w, model, input_ids, units, ffn_block_size)
    m = _int_arg(w, "m", m, 1)
    batch = _int_arg(w, "batch", batch, 1)
    delta = _float_arg(w, "delta", delta, 0.0, strict=True)
    solver = _check_solver(w, solver)
    p = lay.p
    if k is not None:
        k = _int_arg(w, "k", k, 1, min(m, p))
    was_training = model.training
    model.eval()
    try:
        with Tracer(model, record=False) as tr:
            target, f0, fn = _baseline(tr, ids, lay, batch)
            x, _, _ = probe_function(fn, p, m=m, delta=delta, solver=solver, k=k, seed=seed, scheme=scheme, f0=f0)
            grad = knock = None
            if ground_truth:
                grad = _autograd_gradient(tr, ids, lay, target)
                if knockout:                  # p more forwards: skip on a large model (knockout=False)
                    knock = fn(1.0 - np.eye(p)) - f0
    finally:
        model.train(was_training)
    kk = (k if k is not None else default_k(m, p)) if solver in ("omp", "sklearn_omp") else None
    res = ProbeResult(units=lay.names(), kinds=[kd for kd in lay.kinds for _ in range(lay.sizes[kd])], x=x,
                      gradient=grad, knockout=knock, m=m, p=p, k=kk, delta=delta, solver=solver, scheme=scheme,
                      f0=f0, target=target,
                      dims={"layers": lay.layers, "heads": lay.heads, "n_blocks": lay.n_blocks, "tokens": lay.tokens,
                            "ffn_block_size": lay.ffn_block_size})
    if grad is not None:
        res.quality["gradient"] = quality(x, grad)
    if knock is not None:
        res.quality["knockout"] = quality(-x, knock)
    return res


def recovery_vs_m(model: Any, input_ids: torch.Tensor, ms: Sequence[int], *, delta: float = 0.05,
                  ffn_block_size: int = 64, units: Sequence[str] = UNIT_KINDS, solver: str = "omp",
                  k: int | None = None, seeds: Sequence[int] = (0,), batch: int = 32,
                  scheme: str = "forward") -> dict[str, Any]:
    """Quality of the probe against the exact gradient (and the knock-outs) as the number of measurements
    grows. Per seed, one ``A[max(ms), p]`` is drawn and measured once; the probe with ``m`` measurements
    uses its first ``m`` rows (so the curves are nested, and the cost is ``max(ms)`` forwards per seed).
    ``k``: the solver's sparsity for every ``m`` (``None``: :func:`default_k` of each ``m``).

    Also solves the full least-squares problem on all ``max(ms)`` rows (``"lstsq_full"``) when
    ``max(ms) >= p``: the best any solver can do from these (finite-difference) measurements.

    Returns ``{"ms", "p", "k": [the sparsity used per m], "klogpk_ref": [k ln(p / k) for those k],
    "gradient": {metric: [mean over seeds per m]}, "knockout": {... of -x against the knock-outs},
    "lstsq_full": quality or None, "gradient_norm", "units"}``.
    """
    w = "recovery_vs_m"
    ids, lay = _check_model_args(w, model, input_ids, units, ffn_block_size)
    if isinstance(ms, (int, np.integer)) or not isinstance(ms, Sequence) or len(ms) == 0:
        fail(w, f"ms = {ms!r}; must be a non-empty sequence of measurement counts")
    ms = [_int_arg(w, f"ms[{i}]", v, 1) for i, v in enumerate(ms)]
    if not seeds:
        fail(w, "seeds = (); give at least one seed")
    solver = _check_solver(w, solver)
    delta = _float_arg(w, "delta", delta, 0.0, strict=True)
    batch = _int_arg(w, "batch", batch, 1)
    if scheme not in ("forward", "central"):
        fail(w, f"scheme = {scheme!r}; allowed: 'forward', 'central'")
    p = lay.p
    m_max = max(ms)
    was_training = model.training
    model.eval()
    per_seed: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        with Tracer(model, record=False) as tr:
            target, f0, fn = _baseline(tr, ids, lay, batch)
            grad = _autograd_gradient(tr, ids, lay, target)
            knock = fn(1.0 - np.eye(p)) - f0
            for s in seeds:
                _, A, y = probe_function(fn, p, m=m_max, delta=delta, solver="lstsq", seed=int(s), scheme=scheme,
                                         f0=f0)
                per_seed.append((A, y))
    finally:
        model.train(was_training)
    metrics = ("rel_err", "cosine", "spearman_abs", "top_overlap", "best_k_err")
    out: dict[str, Any] = {"ms": ms, "p": p, "units": lay.names(), "gradient_norm": float(np.linalg.norm(grad)),
                           "gradient": {q: [] for q in metrics}, "knockout": {q: [] for q in metrics}, "k": []}
    for m in ms:
        kk = min(k, m, p) if k is not None else default_k(m, p)
        out["k"].append(kk)
        acc: dict[str, dict[str, list[float]]] = {"gradient": {q: [] for q in metrics},
                                                  "knockout": {q: [] for q in metrics}}
        for A, y in per_seed:
            s = 1.0 / math.sqrt(m)
            x = solve_sparse(A[:m] * s, y[:m] * s, solver, kk if solver in ("omp", "sklearn_omp") else None)
            for name, truth, sign in (("gradient", grad, 1.0), ("knockout", knock, -1.0)):
                qv = quality(sign * x, truth)
                for q in metrics:
                    acc[name][q].append(qv[q])
        for name in ("gradient", "knockout"):
            for q in metrics:
                out[name][q].append(float(np.nanmean(acc[name][q])))
    out["klogpk_ref"] = [kk * math.log(p / kk) for kk in out["k"]]
    out["lstsq_full"] = None
    if m_max >= p:
        A, y = per_seed[0]
        out["lstsq_full"] = quality(np.linalg.lstsq(A, y, rcond=None)[0], grad)
    return out
