"""sparsecore: fast kernels for activation-sparse FFNs and context-sparse decode attention.

The public face: the formats and the ops. Everything else (backends, reference, adapters) lives in
sub-packages.
"""

from . import ops
from .formats import (
                      CSR,
                      DenseKV,
                      KeyCodes,
                      PageBounds,
                      PagedKV,
                      TiledELL,
                      TopKIndex,
                      csr_from_dense,
                      csr_from_scipy,
                      csr_from_torch,
                      csr_to_dense,
                      csr_to_scipy,
                      csr_to_tiled_ell,
                      csr_to_torch,
                      quantize_keys,
                      tiled_ell_from_dense,
                      tiled_ell_to_csr,
                      tiled_ell_to_dense,
)
from .ops import *  # noqa: F403 - every op's public function and the plans (ops.__all__)
from .ops.explain import SlowPathWarning, SparsecoreWarning, explain

__version__ = "0.1.0"

__all__ = [
    "CSR", "TiledELL", "DenseKV", "PagedKV", "PageBounds", "KeyCodes", "TopKIndex", "quantize_keys",
    "tiled_ell_from_dense", "tiled_ell_to_dense", "tiled_ell_to_csr", "csr_to_tiled_ell",
    "csr_from_dense", "csr_to_dense", "csr_to_scipy", "csr_from_scipy", "csr_to_torch", "csr_from_torch",
    "explain", "SparsecoreWarning", "SlowPathWarning",
]
__all__ += ops.__all__  # the ops, declared once there
