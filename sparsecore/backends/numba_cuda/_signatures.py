"""Numba signatures of every numba_cuda kernel per value dtype, as the ops launch them with
contiguous arrays: what the compile tier hands to ``numba.cuda.compile_ptx`` (ahead of time, no GPU).

Value arrays are float32, float16, or uint16 for bfloat16 (its bits); scalars are int64 (Python
ints) except the float32 threshold and scale; CSR indices are int32 (int64 compiles the same code).
"""

from __future__ import annotations

from typing import Any

from numba import types as nt


def _a(dt: Any, ndim: int) -> Any:
    return nt.Array(dt, ndim, "C")


VALUE_TYPES = {"float32": nt.float32, "float16": nt.float16, "bfloat16": nt.uint16}


def signatures(dtype: str) -> dict[str, tuple[Any, ...]]:
    """Kernel name (an attribute of ``_kernels.build(dtype)``) -> argument types."""
    v = VALUE_TYPES[dtype]
    i64, f32 = nt.int64, nt.float32
    i32_1, i32_2, i32_3 = _a(nt.int32, 1), _a(nt.int32, 2), _a(nt.int32, 3)
    v1, v2, v3, v4 = _a(v, 1), _a(v, 2), _a(v, 3), _a(v, 4)
    f1, f2, f3, f4 = _a(f32, 1), _a(f32, 2), _a(f32, 3), _a(f32, 4)
    i16_3 = _a(nt.int16, 3)
    ell = (v3, i16_3, i32_2, i64)
    ovf = (i64, i32_1, i32_1, v1)
    kv = (v4, i32_2, i32_1, i64, i64)  # k, page_table, lengths, page_size, dense
    return {
        "pack_tiles": (v2, f32, i64, i64, v3, i16_3, i32_2, i32_1),
        "pack_scan": (i32_1, i64, i64, i32_1, _a(i64, 1)),
        "pack_overflow": (v2, f32, i64, i64, i64, i32_1, _a(i64, 1), i32_1, v1),
        "unpack": (*ell, *ovf, v2),
        "spmm_ell": (*ell, *ovf, v2, v2),
        "spmm_csr": (i32_1, i32_1, v1, v2, v2),
        "sddmm_ell": (v2, v2, i16_3, i32_2, i64, v3),
        "sddmm_csr": (v2, v2, i32_1, i32_1, v1),
        "spmm_t_ell": (*ell, *ovf, v2, f2),
        "spmm_t_csr": (i32_1, i32_1, v1, v2, f2),
        "gated_ell": (v2, *ell, *ovf, v2, v2, v2),
        "gated_csr": (v2, i32_1, i32_1, v1, v2, v2, v2),
        "topk_scores_exact": (v3, *kv, i64, i64, f3),
        "topk_scores_int8": (v3, _a(nt.int8, 4), f3, i32_1, i64, i64, f3),
        "rescore_pool": (v3, *kv, i64, i64, i64, i64, i32_3, i32_2, f3),
        "topk_scores_quest": (v3, *kv, i64, i64, i64, f3),
        "topk_scores_quest_bounds": (v3, v4, v4, i32_1, i64, i64, i64, f3),
        "page_bounds": (*kv, i64, i32_1, i64, i64, v4, v4),
        "decode_split": (v3, v4, v4, i32_2, i32_1, i64, i64, i32_3, i32_2, i64, i64, i64, i64, f32, v3, f2, f4, f3),
        "decode_merge": (f4, f3, v3, f2),
        "merge": (v2, f1, v2, f1, v2, f1),
        "cast_out": (f2, v2),
    }


def common_signatures() -> dict[str, tuple[Any, ...]]:
    """The dtype-free kernels (attributes of ``_kernels``)."""
    i64 = nt.int64
    return {
        "fill": (_a(nt.float32, 1), nt.float32),
        "topk_select": (_a(nt.float32, 3), _a(nt.int32, 1), i64, i64, i64, i64, _a(nt.int32, 3), _a(nt.int32, 2)),
        "mass_of_every_key": (_a(nt.float32, 3), _a(nt.int32, 1), i64, i64, nt.float32, _a(nt.float32, 3)),
        "top_p_cut": (_a(nt.float32, 3), _a(nt.int32, 1), i64, i64, nt.float32, i64, i64, _a(nt.int32, 3),
                      _a(nt.int32, 2), _a(nt.float32, 2), _a(nt.int32, 2), _a(nt.int32, 2), i64),
    }
