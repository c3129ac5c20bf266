"""numba_cuda: ``@cuda.jit`` kernels for every op, on CUDA arrays (torch CUDA tensors, CuPy arrays,
Numba device arrays), zero-copy, float32/float16/bfloat16 values with float32 accumulation.

Importing this package needs neither numba nor a GPU: numba-cuda is imported on the first call (or
by ``availability_reasons()``), and the classes say why they cannot run ("numba-cuda is not
installed", "no CUDA device"). The kernels also run under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), where Numba device arrays made by ``cuda.to_device`` dispatch here.
See ``docs/backends_numba_cuda.md`` for the kernels' design.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ...ops import inputs as I
from ...ops.dispatcher import BackendOp, register
from . import _limits
from ._runtime import availability


def _impl() -> Any:
    import importlib

    return importlib.import_module(f"{__name__}._ops")


class _NumbaCuda(BackendOp):
    NAME: ClassVar[str] = "numba_cuda"
    BACKEND: ClassVar[str] = "numba_cuda"
    DEVICE: ClassVar[str] = "cuda"
    DTYPES: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")
    MAX_HEAD_DIM: ClassVar[int] = _limits.MAX_HEAD_DIM
    MAX_GROUP: ClassVar[int] = _limits.MAX_GROUP

    @classmethod
    def availability_reasons(cls) -> list[str]:
        return list(availability())

    @classmethod
    def not_supported_reasons(cls, inp: Any) -> list[str]:
        # Host inputs are refused before numba-cuda is imported: dispatching a NumPy call never
        # pays for the CUDA target's import or a driver probe.
        if inp.device != cls.DEVICE:
            return [f"runs on {cls.DEVICE} arrays, the inputs are on {inp.device}"]
        return super().not_supported_reasons(inp)

    @classmethod
    def _attention_reasons(cls, q: Any, kv: Any, grouped: bool) -> list[str]:
        reasons = []
        d = int(q.shape[2])
        if not 1 <= d <= cls.MAX_HEAD_DIM:
            reasons.append(f"head_dim = {d}; numba_cuda supports 1 <= head_dim <= {cls.MAX_HEAD_DIM}")
        group = int(q.shape[1]) // max(kv.num_kv_heads, 1)
        if grouped and group > cls.MAX_GROUP:
            reasons.append(f"Hq / Hkv = {group} query heads per KV head; numba_cuda stages at most "
                           f"{cls.MAX_GROUP} per block")
        return reasons


@register
class Pack(_NumbaCuda):
    OP = "pack"

    @classmethod
    def run(cls, inp: I.PackInputs) -> Any:
        return _impl().pack(inp)


@register
class Unpack(_NumbaCuda):
    OP = "unpack"

    @classmethod
    def run(cls, inp: I.UnpackInputs) -> Any:
        return _impl().unpack(inp)


@register
class Spmm(_NumbaCuda):
    OP = "spmm"

    @classmethod
    def run(cls, inp: I.SpmmInputs) -> Any:
        return _impl().spmm(inp)


@register
class Sddmm(_NumbaCuda):
    OP = "sddmm"

    @classmethod
    def run(cls, inp: I.SddmmInputs) -> Any:
        return _impl().sddmm(inp)


@register
class SpmmT(_NumbaCuda):
    OP = "spmm_t"

    @classmethod
    def run(cls, inp: I.SpmmTInputs) -> Any:
        return _impl().spmm_t(inp)


@register
class GatedFfn(_NumbaCuda):
    OP = "gated_ffn"

    @classmethod
    def run(cls, inp: I.GatedFfnInputs) -> Any:
        return _impl().gated_ffn(inp)


@register
class PageBoundsOp(_NumbaCuda):
    OP = "page_bounds"

    @classmethod
    def run(cls, inp: I.PageBoundsInputs) -> Any:
        return _impl().page_bounds(inp)


@register
class SelectTopk(_NumbaCuda):
    OP = "select_topk"

    @classmethod
    def input_reasons(cls, inp: I.SelectTopkInputs) -> list[str]:
        reasons = cls._attention_reasons(inp.q, inp.kv, grouped=True)
        if inp.candidates and inp.candidates < inp.kv.max_len:
            reasons.append(f"candidates = {inp.candidates} below the cache's capacity {inp.kv.max_len} (a pool "
                           "ranked by attention mass) is not implemented in numba_cuda yet; candidates >= the "
                           "capacity ranks every key by its mass")
        return reasons

    @classmethod
    def run(cls, inp: I.SelectTopkInputs) -> Any:
        return _impl().select_topk(inp)


@register
class SparseDecode(_NumbaCuda):
    OP = "sparse_decode"

    @classmethod
    def input_reasons(cls, inp: I.SparseDecodeInputs) -> list[str]:
        return cls._attention_reasons(inp.q, inp.kv, grouped=inp.shared)

    @classmethod
    def run(cls, inp: I.SparseDecodeInputs) -> Any:
        return _impl().sparse_decode(inp)


@register
class DenseDecode(_NumbaCuda):
    OP = "dense_decode"

    @classmethod
    def input_reasons(cls, inp: I.DenseDecodeInputs) -> list[str]:
        return cls._attention_reasons(inp.q, inp.kv, grouped=True)

    @classmethod
    def run(cls, inp: I.DenseDecodeInputs) -> Any:
        return _impl().dense_decode(inp)


@register
class MergeAttention(_NumbaCuda):
    OP = "merge_attention"

    @classmethod
    def run(cls, inp: I.MergeAttentionInputs) -> Any:
        return _impl().merge_attention(inp)


__all__ = ["Pack", "Unpack", "Spmm", "Sddmm", "SpmmT", "GatedFfn", "PageBoundsOp", "SelectTopk", "SparseDecode",
           "DenseDecode", "MergeAttention"]
