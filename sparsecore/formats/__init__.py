"""Data layouts: cheap constructors (shape and dtype checks) plus an explicit ``validate()``."""

from .codes import KeyCodes, quantize_keys
from .convert import (
                      csr_from_dense,
                      csr_from_scipy,
                      csr_from_torch,
                      csr_to_dense,
                      csr_to_scipy,
                      csr_to_tiled_ell,
                      csr_to_torch,
                      tiled_ell_from_dense,
                      tiled_ell_to_csr,
                      tiled_ell_to_dense,
)
from .csr import CSR
from .kv import DenseKV, PageBounds, PagedKV
from .tiled_ell import TiledELL
from .topk import TopKIndex

__all__ = [
    "CSR", "TiledELL", "DenseKV", "PagedKV", "PageBounds", "KeyCodes", "TopKIndex", "quantize_keys",
    "tiled_ell_from_dense", "tiled_ell_to_dense", "tiled_ell_to_csr", "csr_to_tiled_ell",
    "csr_from_dense", "csr_to_dense", "csr_to_scipy", "csr_from_scipy", "csr_to_torch", "csr_from_torch",
]
