"""A small cost model of ``select_topk``: which scoring to use for a shape, from shapes only.

Selection reads a score source for every unit of the context and then picks the best ``k``::

    exact: S keys of D values (2 or 4 bytes each)            -> S * D * key_bytes bytes
    int8:  S int8 code rows and scales, then ``rescore`` keys -> S * (D + 4) + rescore * D * key_bytes
    quest: S / page_size pages of kmin and kmax, plus the new token's page update
                                                              -> 2 * S / page_size * D * key_bytes

and the time of each is modelled per selection row as ``bytes / bandwidth + units * per_unit``
(the arithmetic and the top-k pass), plus a fixed cost per call. The coefficients of
:data:`HOST_CPU` were measured with ``perf/selection_reduced.py`` on the 2-core AMD EPYC VM of
``docs/selection.md`` (one thread, keys cold in memory as in a decode step); measure a machine and
pass its own :class:`Coefficients` for another host.

Quality is not a shape: :func:`choose_method` only considers Quest when ``allow_quest=True``
(on SmolLM2-135M, Quest lost far more quality than exact or int8 ranking at equal budgets,
docs/selection.md), and int8 ranking is taken when it is cheaper than exact scoring by
``margin`` (its ranking agrees with the exact one on nearly every key, but not all).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Coefficients", "HOST_CPU", "estimate_ms", "choose_method"]


@dataclass(frozen=True)
class Coefficients:
    """Per-host costs: ``bandwidth`` (bytes/s streamed by one selection row), the arithmetic per
    scored unit in ns (``exact_ns`` per key of 64 values, ``int8_ns`` per int8 row of 64,
    ``bound_ns`` per Quest page of 64), ``topk_ns`` per unit for the top-k pass, ``gather_ns`` per
    re-scored key (a random row read) and ``call_us`` per call; ``int8_update_us`` and
    ``quest_update_us``: the per-step update of the codes or bounds with the new key, per call."""

    bandwidth: float
    exact_ns: float
    int8_ns: float
    bound_ns: float
    topk_ns: float
    gather_ns: float
    call_us: float
    int8_update_us: float = 0.0
    quest_update_us: float = 0.0


#: measured on the 2-core AMD EPYC VM of docs/selection.md (numba_cpu, one thread): at 8K, 30 calls of
#: 3 rows took 36 ms (exact) and 17-19 ms (Quest, stored bounds) through the public op with torch
#: tensors, of which about 0.4 ms per call is the call itself (views, dispatch, index); the kernels
#: alone over 30 layers' keys from memory (2026-11-30, 20:30 UTC): exact 35 ms,
#: int8 11 ms, i.e. about 15 ns of arithmetic per exact key and 6 per int8 row beyond the bytes. The
#: per-step updates: quantize_keys of the new key 0.03 ms per layer on CPU tensors since its compiled
#: pass (0.39 ms before), page_bounds of its page 0.63 ms per layer
HOST_CPU = Coefficients(bandwidth=8.0e9, exact_ns=15.0, int8_ns=6.0, bound_ns=20.0, topk_ns=2.0, gather_ns=60.0,
                        call_us=400.0, int8_update_us=30.0, quest_update_us=630.0)


def estimate_ms(method: str, *, context: int, rows: int, head_dim: int, k: int, key_bytes: int = 4,
                page_size: int = 16, rescore: int = 0, coeffs: Coefficients = HOST_CPU) -> float:
    """Modelled time in ms of one ``select_topk`` call of ``rows`` selection rows (B x G) over
    ``context`` tokens, for ``method`` in ``"exact"``, ``"int8"``, ``"quest"`` (with stored bounds),
    with the per-step update of the codes or bounds that a decode step needs."""
    if method not in ("exact", "int8", "quest"):
        raise ValueError(f"estimate_ms: method = {method!r}; allowed: 'exact', 'int8', 'quest'")
    for name, v in (("context", context), ("rows", rows), ("head_dim", head_dim), ("k", k), ("key_bytes", key_bytes),
                    ("page_size", page_size), ("rescore", rescore)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name in ("page_size", "key_bytes") else 0):
            raise ValueError(f"estimate_ms: {name} = {v!r}; must be an int >= "
                             f"{1 if name in ('page_size', 'key_bytes') else 0}")
    dim = head_dim / 64
    if method == "exact":
        units, nbytes, arith = context, context * head_dim * key_bytes, context * coeffs.exact_ns * dim
    elif method == "int8":
        units, nbytes = context, context * (head_dim + 4)
        arith = context * coeffs.int8_ns * dim + (rescore * coeffs.gather_ns * dim if rescore > k else 0.0)
    else:
        units = -(-context // page_size)
        nbytes, arith = 2 * units * head_dim * key_bytes, units * coeffs.bound_ns * dim
    per_row_s = nbytes / coeffs.bandwidth + (arith + units * coeffs.topk_ns) * 1e-9
    update_us = {"exact": 0.0, "int8": coeffs.int8_update_us, "quest": coeffs.quest_update_us}[method]
    return 1e3 * rows * per_row_s + (coeffs.call_us + update_us) * 1e-3


def choose_method(*, context: int, rows: int, head_dim: int, k: int, key_bytes: int = 4, page_size: int = 16,
                  rescore: int = 0, allow_quest: bool = False, margin: float = 0.8,
                  coeffs: Coefficients = HOST_CPU) -> str:
    """``"exact"``, ``"int8"`` or ``"quest"``: the modelled cheapest scoring for this shape, taking
    int8 only when it costs at most ``margin`` times exact, and Quest only when ``allow_quest``."""
    kw = dict(context=context, rows=rows, head_dim=head_dim, k=k, key_bytes=key_bytes, page_size=page_size,
              coeffs=coeffs)
    exact = estimate_ms("exact", **kw)
    int8 = estimate_ms("int8", **kw, rescore=rescore)
    best, cost = ("int8", int8) if int8 <= margin * exact else ("exact", exact)
    if allow_quest and estimate_ms("quest", **kw) < cost:
        best = "quest"
    return best
