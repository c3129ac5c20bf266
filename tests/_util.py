"""Comparison helpers: per-dtype tolerances, and failures that report the worst element."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsecore._arrays import to_host

#: (atol, rtol) per value dtype, for results accumulated in float32 or better and rounded once.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-5, 1e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


def as_f64(x: Any) -> np.ndarray:
    return np.asarray(to_host(x)).astype(np.float64)


def assert_close(actual: Any, expected: Any, dtype: str, *, what: str = "", scale: Any = None) -> None:
    """|actual - expected| <= atol * s + rtol * |expected| elementwise, where ``s`` is ``scale`` (an
    array or number giving the magnitude of the terms summed, default 1). NaN must match NaN."""
    a, e = as_f64(actual), as_f64(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    atol, rtol = TOLERANCES[dtype]
    s = 1.0 if scale is None else as_f64(scale)
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if (nan_a != nan_e).any():
        i = tuple(int(j) for j in np.unravel_index(np.argmax(nan_a != nan_e), a.shape))
        raise AssertionError(f"{what}: NaN mismatch at {i}: actual {a[i]}, expected {e[i]}")
    with np.errstate(invalid="ignore"):
        same_inf = np.isinf(e) & (a == e)
        err = np.where(nan_e | same_inf, 0.0, np.abs(a - e))
        bound = atol * s + rtol * np.abs(np.where(np.isinf(e), 0.0, e))
    bad = ~(err <= bound) & ~nan_e
    if bad.any():
        ratio = np.where(bound > 0, err / np.maximum(bound, 1e-300), np.inf)
        i = tuple(int(j) for j in np.unravel_index(np.argmax(np.where(bad, ratio, -1)), a.shape))
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())} of {a.size} elements out of tolerance; worst at {i}: "
            f"actual {a[i]!r}, expected {e[i]!r}, |diff| {err[i]:.3g} > bound {np.broadcast_to(bound, a.shape)[i]:.3g}")


#: host backends that every property test runs against, in turn
HOST_BACKENDS = ("reference", "numba_cpu")


def host_backend_params(variants: dict[str, tuple[str, ...]] | None = None) -> list[Any]:
    """pytest params for HOST_BACKENDS (and ``"backend:variant"`` for each of ``variants[backend]``);
    a backend whose library is missing is skipped, with the reason its classes give (never silently)."""
    import pytest

    from sparsecore.ops.dispatcher import implementations

    params = []
    for name in HOST_BACKENDS:
        cls = next((c for c in implementations("spmm") if c.BACKEND == name), None)
        reasons = ["not registered"] if cls is None else cls.availability_reasons()
        marks = [pytest.mark.skip(reason=f"{name}: {'; '.join(reasons)}")] if reasons else []
        for label in (name, *(f"{name}:{v}" for v in (variants or {}).get(name, ()))):
            params.append(pytest.param(label, id=label, marks=marks))
    return params


def backend_takes(backend: str, dtype: str) -> str:
    """``backend`` if it takes ``dtype``; otherwise this example or test is set aside with a stated
    reason (hypothesis: rejected; pytest: skipped). The reference takes every dtype."""
    from sparsecore.ops.dispatcher import implementations

    cls = next(c for c in implementations("spmm") if c.BACKEND == backend)
    if dtype not in cls.DTYPES:
        from hypothesis import reject
        from hypothesis.control import currently_in_test_context

        if currently_in_test_context():
            reject()
        import pytest

        pytest.skip(f"{backend} does not take {dtype} (supported: {', '.join(cls.DTYPES)})")
    return backend


def _host_index(got: Any, want: Any, kv: Any, counts: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``got``'s indices and counts on the host, after checking its shape against ``want`` (and its
    counts, with ``counts``) and validating it against the cache's lengths."""
    ind, cnt = to_host(got.indices), to_host(got.counts)
    assert ind.shape == want.indices.shape, f"k_max: {ind.shape} != {want.indices.shape}"
    if counts:
        np.testing.assert_array_equal(cnt, want.counts, err_msg="counts")
    got.map_arrays(to_host).validate(lengths=kv.lengths)
    return ind, cnt


def _row_sums(s: np.ndarray, group: int, shared: bool) -> np.ndarray:
    """Per-head scores ``[Hq, n]`` as the selection rows see them: summed over each group when shared."""
    return s.reshape(s.shape[0] // group, group, s.shape[1]).sum(axis=1) if shared else s


def check_topk_against_reference(got: Any, want: Any, q: np.ndarray, kv: Any, *, shared: bool, sink: int,
                                 window: int, rel_tol: float) -> None:
    """A device ``select_topk`` result ``got`` (any array kind) against the reference's ``want`` on the same
    host inputs: same index shape and counts, valid, the forced (sink/window) units kept, and every freely
    chosen unit scoring at least every unchosen one, up to ``rel_tol * (1 + max |score|)`` (ties may break
    either way, so indices are never compared)."""
    from sparsecore.reference.attention import forced_positions, head_scores, page_key_bounds, quest_bounds, sequence_kv

    ind, cnt = _host_index(got, want, kv)
    group = q.shape[1] // kv.num_kv_heads
    ps = want.page_size
    for b in range(q.shape[0]):
        keys, _ = sequence_kv(kv, b)
        s = _row_sums(head_scores(q[b], keys, group) if ps is None else
                      quest_bounds(q[b], *page_key_bounds(keys, ps), group), group, shared)
        n = int(kv.lengths[b])
        units = n if ps is None else -(-n // ps)
        forced = set(forced_positions(n, sink, window, ps).tolist())
        tol = rel_tol * (1.0 + np.abs(s).max()) if s.size else 0.0
        for g in range(ind.shape[1]):
            _check_row(ind[b, g, :cnt[b, g]], s[g], units, forced, lambda hi, t=tol: t, (b, g))


def _check_row(sel_units: np.ndarray, score: np.ndarray, units: int, forced: set[int], tol: Any,
               where: tuple[int, int]) -> None:
    """One selection row: the forced units kept, and every freely chosen unit scoring at least every
    unit left out, up to ``tol(highest score left)``."""
    sel = set(sel_units.tolist())
    assert forced <= sel, f"row {where} lacks forced units {sorted(forced - sel)}"
    chosen, left = sorted(sel - forced), sorted(set(range(units)) - sel)
    if chosen and left:
        lo, hi = score[chosen].min(), score[left].max()
        assert lo >= hi - tol(hi), f"row {where}: chose a unit scoring {lo} over one scoring {hi}"


def check_rescore_against_reference(got: Any, want: Any, q: np.ndarray, kv: Any, *, shared: bool, sink: int,
                                    window: int, rel_tol: float) -> None:
    """A device ``select_topk(method="int8", rescore=r)`` result ``got`` against the reference's ``want``
    (the k best by the exact score among the r best by the int8 score): the same counts, valid, the
    forced units kept, and per row the freely chosen units' exact scores, sorted, the reference's up
    to ``rel_tol * (1 + max |score|)`` (ties may pick other units of the same score)."""
    from sparsecore.reference.attention import forced_positions, head_scores, sequence_kv

    ind, cnt = _host_index(got, want, kv)
    group = q.shape[1] // kv.num_kv_heads
    for b in range(q.shape[0]):
        keys, _ = sequence_kv(kv, b)
        s = _row_sums(head_scores(q[b], keys, group), group, shared)
        forced = set(forced_positions(int(kv.lengths[b]), sink, window, None).tolist())
        tol = rel_tol * (1.0 + np.abs(s).max()) if s.size else 0.0
        for g in range(ind.shape[1]):
            mine = set(ind[b, g, :cnt[b, g]].tolist())
            theirs = set(want.indices[b, g, :want.counts[b, g]].tolist())
            assert forced <= mine, f"row {(b, g)} lacks forced units {sorted(forced - mine)}"
            a, w = np.sort(s[g, sorted(mine - forced)]), np.sort(s[g, sorted(theirs - forced)])
            np.testing.assert_allclose(a, w, rtol=0, atol=tol, err_msg=f"row {(b, g)}: chosen exact scores")


def dequantized_kv(kv: Any, codes: Any) -> Any:
    """The cache (dense, float32, on the host) whose keys are what ``codes`` (a KeyCodes of ``kv``) stand
    for, ``codes * scales``: ``select_topk(method="int8", codes=codes)`` on ``kv`` is exact ranking on
    this cache, so the exact checkers hold int8 ranking to the reference."""
    from sparsecore import reference as ref
    from sparsecore.formats.kv import DenseKV

    host = codes.map_arrays(to_host)
    lengths = to_host(kv.lengths)
    s = host.max_len
    k = np.stack([np.pad(ref.attention.int8_keys(host, b, int(lengths[b])),
                         ((0, s - int(lengths[b])), (0, 0), (0, 0))) for b in range(kv.batch)]).astype(np.float32)
    return DenseKV(k, k, np.asarray(lengths))


def check_mass_ranking_against_reference(got: Any, q: np.ndarray, kv: Any, k: int, *, sink: int, window: int,
                                         shared: bool, scale: float | None, rel_tol: float) -> None:
    """A device ``select_topk(candidates=c)`` result ``got``, ``c`` covering every key, against the
    reference on the same host inputs: the same index shape and counts, valid, the forced units kept,
    and every freely chosen key of at least the attention mass of every key left (each query head's
    ``softmax_mass`` of its scaled scores over every key, the mean over the group when shared), up to
    ``rel_tol * (1 + that mass)`` (float32 masses on the device; ties may break either way)."""
    from sparsecore import reference as ref

    want = ref.select_topk(q, kv, k, sink=sink, window=window, shared=shared, candidates=10**9, scale=scale)
    ind, cnt = _host_index(got, want, kv)
    for b in range(q.shape[0]):
        mass, forced, n = _sequence_masses(q, kv, b, shared, scale, sink, window)
        for g in range(ind.shape[1]):
            _check_row(ind[b, g, :cnt[b, g]], mass[g], n, forced, lambda hi: rel_tol * (1 + hi), (b, g))


def _sequence_masses(q: np.ndarray, kv: Any, b: int, shared: bool, scale: float | None, sink: int,
                     window: int) -> tuple[np.ndarray, set[int], int]:
    """``(mass[G, n], forced units, n)`` of sequence b: each query head's ``softmax_mass`` of its
    scaled scores over the sequence's n keys (float64, the reference's), the mean over the group
    when shared."""
    from sparsecore.reference.attention import forced_positions, head_scores, sequence_kv, softmax_mass

    group = q.shape[1] // kv.num_kv_heads
    sc = 1.0 / np.sqrt(q.shape[2]) if scale is None else scale
    keys, _ = sequence_kv(kv, b)
    n = int(kv.lengths[b])
    mass = softmax_mass(sc * head_scores(q[b], keys, group)) if n else np.zeros((q.shape[1], 0))
    if shared:
        mass = mass.reshape(mass.shape[0] // group, group, n).mean(axis=1)
    return mass, set(forced_positions(n, sink, window, None).tolist()), n


def check_adaptive_against_reference(got: Any, q: np.ndarray, kv: Any, k: int, *, top_p: float, k_min: int,
                                     sink: int, window: int, shared: bool, scale: float | None,
                                     tol: float = 1e-5) -> None:
    """A device adaptive selection (``select_topk(top_p=...)``) against the meaning of the reference
    (``top_p_count`` over the float64 masses), allowing float32's rounding of the masses and of
    their running sum: per row the forced units kept; the freely chosen ones a top-n by mass; ``n``
    within ``[min(k_min, k'), k']`` (``k' = min(k, free units)``); the kept mass reaching ``top_p``
    unless ``n`` is ``k'``; and dropping the smallest chosen mass falling short of it unless ``n``
    is ``k_min`` (both up to ``tol``)."""
    from sparsecore import reference as ref

    want = ref.select_topk(q, kv, k, sink=sink, window=window, shared=shared, top_p=top_p, k_min=k_min, scale=scale)
    ind, cnt = _host_index(got, want, kv, counts=False)
    for b in range(q.shape[0]):
        mass, forced, n_len = _sequence_masses(q, kv, b, shared, scale, sink, window)
        for g in range(ind.shape[1]):
            where = (b, g)
            _check_row(ind[b, g, :cnt[b, g]], mass[g], n_len, forced, lambda hi: tol * (1 + hi), where)
            chosen = sorted(set(ind[b, g, :cnt[b, g]].tolist()) - forced)
            n, cap = len(chosen), min(k, n_len - len(forced))
            assert min(k_min, cap) <= n <= cap, f"row {where}: {n} chosen, allowed [{min(k_min, cap)}, {cap}]"
            kept = float(mass[g, sorted(forced)].sum() + mass[g, chosen].sum())
            if n < cap and n > k_min:
                assert kept >= top_p - tol, f"row {where}: kept mass {kept} < top_p {top_p} with {n} < {cap} chosen"
            if n > k_min:
                less = kept - float(mass[g, chosen].min())
                assert less < top_p + tol, f"row {where}: {n} chosen, but {n - 1} already keep {less} >= {top_p}"
