"""Limits of the numba_cuda kernels, importable without numba (the op classes report them)."""

#: head_dim of decode and select_topk: the query heads of a group are staged in shared memory.
MAX_HEAD_DIM = 256
#: query heads per KV head (Hq / Hkv) staged together by select_topk, dense_decode and a shared
#: sparse_decode.
MAX_GROUP = 16
#: the size of the shared-memory sort of a row of the adaptive budget (top_p): rows of more units
#: (k + sink + window, or k rounded up to a power of two) sort in a global-memory workspace instead
CUT_CAP = 2048
