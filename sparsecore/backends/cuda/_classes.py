"""The dispatcher classes of the CUDA C ops, made once for each launcher by :func:`make_classes`.

A launcher gives its name, a function that says why it cannot run here (empty when it can), a
function that makes a :class:`~sparsecore.backends.cuda._ops.Runtime` for a call;
it gets back one :class:`BackendOp` subclass per op to register. Imports no GPU library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ..._arrays import dtype_name
from ...formats.kv import PagedKV
from ...ops.dispatcher import OPS, BackendOp
from . import MAX_HEAD_DIM
from . import _arrays as A
from . import _ops as ops

RuntimeFactory = Callable[[Any], Any]


def _attention_reasons(name: str, q: Any, kv: Any) -> list[str]:
    d = int(q.shape[2])
    if not 1 <= d <= MAX_HEAD_DIM:
        return [f"head_dim = {d}; {name} supports 1 <= head_dim <= {MAX_HEAD_DIM}"]
    if isinstance(kv, PagedKV) and kv.batch > 65535:
        return [f"batch = {kv.batch}; {name} supports at most 65535 sequences per call"]
    return []


def _input_reasons(name: str, op: str, inp: Any, kinds: tuple[str, ...]) -> list[str]:
    reasons: list[str] = []
    kind = inp.kind
    if kind not in kinds:
        reasons.append(f"takes {', '.join(kinds)} arrays, the inputs are {kind}")
    if op in ("spmm", "spmm_t", "unpack"):
        reasons += ops.index_reasons(inp.a)
    elif op == "sddmm":
        reasons += ops.index_reasons(inp.pattern)
    elif op == "gated_ffn":
        reasons += ops.index_reasons(inp.gate)
    elif op in ("select_topk", "sparse_decode", "dense_decode"):
        reasons += _attention_reasons(name, inp.q, inp.kv)
        if int(inp.q.shape[0]) > 65535:
            reasons.append(f"batch = {int(inp.q.shape[0])}; {name} supports at most 65535 sequences per call")
        if op == "select_topk" and inp.candidates and inp.candidates < inp.kv.max_len:
            reasons.append(f"candidates = {inp.candidates} below the cache's capacity {inp.kv.max_len} (a pool ranked "
                           f"by attention mass) is not implemented in {name} yet; candidates >= the capacity ranks "
                           "every key by its mass")
    elif op == "page_bounds":
        if inp.kv.batch > 65535:
            reasons.append(f"batch = {inp.kv.batch}; {name} supports at most 65535 sequences per call")
        if inp.out is not None and not all(A.is_contiguous(x) for x in (inp.out.kmin, inp.out.kmax)):
            reasons.append(f"out.kmin / out.kmax are not C-contiguous; {name} writes them in place through their "
                           "pointers (pass contiguous buffers, e.g. from an earlier page_bounds call)")
    elif op == "merge_attention":
        if dtype_name(inp.lse1) != dtype_name(inp.lse2):
            reasons.append(f"lse1 is {dtype_name(inp.lse1)} but lse2 is {dtype_name(inp.lse2)}; {name} needs one "
                           "lse dtype")
    return reasons


def make_classes(backend: str, availability: Callable[[], list[str]], runtime: RuntimeFactory,
                 kinds: tuple[str, ...]) -> list[type[BackendOp]]:
    """One class per op for ``backend``; the caller registers them."""

    class _Base(BackendOp):
        NAME: ClassVar[str] = backend
        BACKEND: ClassVar[str] = backend
        DEVICE: ClassVar[str] = "cuda"
        DTYPES: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")
        MAX_HEAD_DIM: ClassVar[int] = MAX_HEAD_DIM

        @classmethod
        def availability_reasons(cls) -> list[str]:
            return list(availability())

        @classmethod
        def not_supported_reasons(cls, inp: Any) -> list[str]:
            # host inputs are refused before any GPU library is imported or the driver probed
            if inp.device != cls.DEVICE:
                return [f"runs on {cls.DEVICE} arrays, the inputs are on {inp.device}"]
            return super().not_supported_reasons(inp)

        @classmethod
        def input_reasons(cls, inp: Any) -> list[str]:
            return _input_reasons(cls.NAME, cls.OP, inp, kinds)

        @classmethod
        def run(cls, inp: Any) -> Any:
            with runtime(next(iter(inp.named_arrays().values()))) as rt:
                return getattr(ops, cls.OP)(rt, inp)

    out: list[type[BackendOp]] = []
    for op in OPS:
        if not hasattr(ops, op):  # an op without CUDA C kernels yet: nothing to register
            continue
        camel = "".join(w.capitalize() for w in op.split("_"))
        cls = type(f"{camel}Op", (_Base,), {"OP": op, "__doc__": f"{op} as CUDA C kernels launched by {backend}.",
                                     "__module__": f"sparsecore.backends.{backend}"})
        out.append(cls)
    return out

