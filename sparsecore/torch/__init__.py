"""PyTorch adapters: the public ops as ``torch.library`` custom ops (namespace ``sparsecore``),
autograd for sparse FFN training, and torch-side holders of the formats. An op of the table declared
with ``out_shape`` and no custom op written here (``threshold_spmm``, ``threshold_mlp``) gets one made from its row
(``ops.TABLE_OPS``: forward only, traced by ``torch.compile``); any other op is the public function
itself, which takes and returns CPU tensors.

``import sparsecore`` never imports torch; ``import sparsecore.torch`` does. See ``docs/torch.md``.
"""

from . import functional, ops
from .functional import l1_penalty, relu_gated_ffn
from .ops import (
    TorchCSR,
    TorchPageBounds,
    TorchTiledELL,
    TorchTopKIndex,
    dense_decode,
    gated_ffn,
    gated_pack,
    merge_attention,
    pack,
    page_bounds,
    relu_gate,
    sddmm,
    select_topk,
    sparse_decode,
    spmm,
    spmm_t,
    unpack,
)

__all__ = [
    "functional", "ops", "relu_gated_ffn", "l1_penalty",
    "TorchTiledELL", "TorchCSR", "TorchTopKIndex", "TorchPageBounds",
    "pack", "gated_pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn", "relu_gate", "page_bounds",
    "select_topk", "sparse_decode", "dense_decode", "merge_attention",
]


def __getattr__(name: str):  # the modules and model patching live in their own files, imported on use
    import importlib

    if name in ("modules", "patch", "attention"):
        return importlib.import_module(f"{__name__}.{name}")
    for mod in ("modules", "patch", "attention"):
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        if hasattr(m, name):
            return getattr(m, name)
    if name in ops.TABLE_OPS:  # a custom op made from the op table (forward only)
        return ops.TABLE_OPS[name]
    from ..ops.table import OPS

    if name in OPS:  # an op of the table with no custom op: the public function (tensors in, tensors
        import sparsecore  # out, no gradient: a tensor that requires one is refused under grad mode)

        return getattr(sparsecore, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
