"""PyTorch adapters: every public op as a ``torch.library`` custom op (namespace ``sparsecore``),
autograd for sparse FFN training, and torch-side holders of the formats.

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
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
