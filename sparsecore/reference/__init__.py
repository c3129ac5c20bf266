"""The NumPy reference: the definition of what every sparsecore op means (float64 accumulation)."""

from .attention import (
                        TAIL_SAMPLE,
                        dense_decode,
                        merge_attention,
                        page_bounds,
                        page_key_bounds,
                        quest_bounds,
                        select_topk,
                        sequence_kv,
                        sparse_decode,
)
from .ffn import gated_ffn, pack, sddmm, spmm, spmm_t, unpack

__all__ = ["pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn", "page_bounds", "select_topk", "sparse_decode",
           "dense_decode", "merge_attention", "page_key_bounds", "quest_bounds", "sequence_kv", "TAIL_SAMPLE"]
