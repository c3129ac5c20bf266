"""The op table: every op declared once, with its arguments (an ``Inputs`` class of
:mod:`sparsecore.ops.inputs`), its meaning (the NumPy reference, run on those arguments) and what it
returns. The dispatcher's registry, the reference backend, ``python -m sparsecore info``, the
benchmarks and the tests' parametrisation read this table; a new op is a row here, an ``Inputs``
class, a reference function and a public function (``docs/op_flow.md`` walks one call through).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import reference as ref
from . import inputs as I
from .base import OpInputs

__all__ = ["OpSpec", "TABLE", "OPS", "SPECS", "spec"]


@dataclass(frozen=True)
class OpSpec:
    """One op: ``name`` (the public function's), ``inputs`` (its arguments' dataclass), ``reference``
    (its meaning: the NumPy reference called on a validated ``inputs``), ``family`` (``"ffn"`` or
    ``"decode"``) and ``returns`` (what it gives back, in words)."""

    name: str
    inputs: type[OpInputs]
    reference: Callable[[Any], Any]
    family: str
    returns: str


TABLE: tuple[OpSpec, ...] = (
    OpSpec("pack", I.PackInputs,
           lambda i: ref.pack(i.x, threshold=i.threshold, activation=i.activation, tile=i.tile, capacity=i.capacity),
           "ffn", "TiledELL [M, K]"),
    OpSpec("gated_pack", I.GatedPackInputs,
           lambda i: ref.ffn.gated_pack(i.gate, i.up, threshold=i.threshold, activation=i.activation, tile=i.tile,
                                        capacity=i.capacity),
           "ffn", "TiledELL [M, K]"),
    OpSpec("unpack", I.UnpackInputs, lambda i: ref.unpack(i.a), "ffn", "dense [M, K]"),
    OpSpec("spmm", I.SpmmInputs, lambda i: ref.spmm(i.a, i.w), "ffn", "dense [M, N]"),
    OpSpec("sddmm", I.SddmmInputs, lambda i: ref.sddmm(i.x, i.w, i.pattern), "ffn", "the pattern's format [M, K]"),
    OpSpec("spmm_t", I.SpmmTInputs, lambda i: ref.spmm_t(i.a, i.dy), "ffn", "dense [K, N]"),
    OpSpec("gated_ffn", I.GatedFfnInputs, lambda i: ref.gated_ffn(i.x, i.gate, i.w_up, i.w_down), "ffn",
           "dense [M, N]"),
    OpSpec("page_bounds", I.PageBoundsInputs,
           lambda i: ref.page_bounds(i.kv, i.unit_page_size, out=i.out, start=i.start), "decode",
           "PageBounds [B, P, Hkv, D]"),
    OpSpec("select_topk", I.SelectTopkInputs,
           lambda i: ref.select_topk(i.q, i.kv, i.k, method=i.method, sink=i.sink, window=i.window, shared=i.shared,
                                     page_size=i.unit_page_size, bounds=i.bounds, top_p=i.top_p, k_min=i.k_min,
                                     scale=i.scale, codes=i.codes, rescore=i.rescore),
           "decode", "TopKIndex [B, G, k_max]"),
    OpSpec("sparse_decode", I.SparseDecodeInputs, lambda i: ref.sparse_decode(i.q, i.kv, i.index, scale=i.scale),
           "decode", "(out [B, Hq, D], lse [B, Hq])"),
    OpSpec("dense_decode", I.DenseDecodeInputs, lambda i: ref.dense_decode(i.q, i.kv, scale=i.scale), "decode",
           "(out [B, Hq, D], lse [B, Hq])"),
    OpSpec("merge_attention", I.MergeAttentionInputs, lambda i: ref.merge_attention(i.o1, i.lse1, i.o2, i.lse2),
           "decode", "(out [..., D], lse [...])"),
)

#: the op names, in table order
OPS: tuple[str, ...] = tuple(s.name for s in TABLE)
SPECS: dict[str, OpSpec] = {s.name: s for s in TABLE}

for _s in TABLE:
    if _s.inputs.OP != _s.name:
        raise RuntimeError(f"op table: {_s.name} has inputs {_s.inputs.__name__} of op {_s.inputs.OP!r}")


def spec(name: str) -> OpSpec:
    """The table row of op ``name``."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"spec: op = {name!r} is unknown; ops: {', '.join(OPS)}") from None
