"""The NumPy reference as a backend: always available, host arrays, every value dtype, float64
accumulation. Last in priority: the fallback and the oracle."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ... import reference as ref
from ...ops import inputs as I
from ...ops.dispatcher import BackendOp, register


class _Reference(BackendOp):
    NAME: ClassVar[str] = "reference"
    BACKEND: ClassVar[str] = "reference"
    DEVICE: ClassVar[str] = "host"
    DTYPES: ClassVar[tuple[str, ...]] = ("float64", "float32", "float16", "bfloat16")
    VERSION: ClassVar[str] = f"numpy {np.__version__}"


@register
class Pack(_Reference):
    OP = "pack"

    @classmethod
    def run(cls, inp: I.PackInputs) -> Any:
        return ref.pack(inp.x, threshold=inp.threshold, activation=inp.activation, tile=inp.tile,
                        capacity=inp.capacity)


@register
class Unpack(_Reference):
    OP = "unpack"

    @classmethod
    def run(cls, inp: I.UnpackInputs) -> Any:
        return ref.unpack(inp.a)


@register
class Spmm(_Reference):
    OP = "spmm"

    @classmethod
    def run(cls, inp: I.SpmmInputs) -> Any:
        return ref.spmm(inp.a, inp.w)


@register
class Sddmm(_Reference):
    OP = "sddmm"

    @classmethod
    def run(cls, inp: I.SddmmInputs) -> Any:
        return ref.sddmm(inp.x, inp.w, inp.pattern)


@register
class SpmmT(_Reference):
    OP = "spmm_t"

    @classmethod
    def run(cls, inp: I.SpmmTInputs) -> Any:
        return ref.spmm_t(inp.a, inp.dy)


@register
class GatedFfn(_Reference):
    OP = "gated_ffn"

    @classmethod
    def run(cls, inp: I.GatedFfnInputs) -> Any:
        return ref.gated_ffn(inp.x, inp.gate, inp.w_up, inp.w_down)


@register
class PageBounds(_Reference):
    OP = "page_bounds"

    @classmethod
    def run(cls, inp: I.PageBoundsInputs) -> Any:
        return ref.page_bounds(inp.kv, inp.unit_page_size, out=inp.out, start=inp.start)


@register
class SelectTopk(_Reference):
    OP = "select_topk"

    @classmethod
    def run(cls, inp: I.SelectTopkInputs) -> Any:
        return ref.select_topk(inp.q, inp.kv, inp.k, method=inp.method, sink=inp.sink, window=inp.window,
                               shared=inp.shared, page_size=inp.unit_page_size, bounds=inp.bounds)


@register
class SparseDecode(_Reference):
    OP = "sparse_decode"

    @classmethod
    def run(cls, inp: I.SparseDecodeInputs) -> Any:
        return ref.sparse_decode(inp.q, inp.kv, inp.index, scale=inp.scale)


@register
class DenseDecode(_Reference):
    OP = "dense_decode"

    @classmethod
    def run(cls, inp: I.DenseDecodeInputs) -> Any:
        return ref.dense_decode(inp.q, inp.kv, scale=inp.scale)


@register
class MergeAttention(_Reference):
    OP = "merge_attention"

    @classmethod
    def run(cls, inp: I.MergeAttentionInputs) -> Any:
        return ref.merge_attention(inp.o1, inp.lse1, inp.o2, inp.lse2)
