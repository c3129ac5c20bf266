"""Hypothesis strategies and named factories for the decode side: KV caches (dense and paged), decode
queries and hand-built selections, with the float64 view of what the caches really store.

Every cache is poisoned: positions past a sequence's length and physical pages no sequence uses hold
NaN, so a kernel that reads one row too many returns NaN instead of a plausible wrong number.

A :class:`DecodeCase` carries the cache twice (as built, dense or paged, and as a dense copy of the
same tokens) plus ``keys[b]`` / ``values[b]``: the tokens of sequence ``b`` in order, ``[L_b, Hkv, D]``
float64 of the *rounded* stored values, which is what expected results are computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from sparsecore import DenseKV, PagedKV, TopKIndex

DTYPES: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")
NP_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
#: page sizes drawn for paged caches and page-granular selections.
PAGE_SIZES: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
MAX_LEN = 40


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class DecodeCase:
    name: str
    dtype: str
    q: np.ndarray                      # [B, Hq, D] value dtype
    kv: DenseKV | PagedKV              # as built (NaN-poisoned)
    dense: DenseKV                     # the same tokens in a dense cache with the same max_len
    keys: tuple[np.ndarray, ...]       # per sequence [L_b, Hkv, D] float64 of the stored keys
    values: tuple[np.ndarray, ...]     # per sequence [L_b, Hkv, D] float64 of the stored values

    @property
    def paged(self) -> bool:
        return isinstance(self.kv, PagedKV)

    @property
    def batch(self) -> int:
        return int(self.q.shape[0])

    @property
    def hq(self) -> int:
        return int(self.q.shape[1])

    @property
    def hkv(self) -> int:
        return self.kv.num_kv_heads

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def head_dim(self) -> int:
        return int(self.q.shape[2])

    @property
    def lengths(self) -> np.ndarray:
        return np.array([k.shape[0] for k in self.keys], dtype=np.int64)

    @property
    def q64(self) -> np.ndarray:
        return self.q.astype(np.float64)

    @property
    def page_size(self) -> int | None:
        return self.kv.page_size if self.paged else None

    def __repr__(self) -> str:
        extra = ""
        if self.paged:
            extra = (f", page_size={self.kv.page_size}, P={self.kv.num_pages}, "
                     f"page_table={self.kv.page_table.tolist()}")
        return (f"DecodeCase({self.name!r}, {self.dtype}, B={self.batch}, Hq={self.hq}, Hkv={self.hkv}, "
                f"D={self.head_dim}, max_len={self.kv.max_len}, lengths={self.lengths.tolist()}{extra})")


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, grid: bool, spread: float) -> np.ndarray:
    """Random values stored in ``dtype``. ``grid``: multiples of 1/4 in [-2, 2] (exact in every dtype,
    so scores are exact in float64 and ties are common)."""
    if grid:
        x = rng.integers(-8, 9, size=shape) / 4.0
    else:
        x = rng.standard_normal(shape) * spread
    return x.astype(NP_DTYPES[dtype])


def build_case(lengths: Sequence[int], *, num_kv_heads: int = 1, group: int = 1, head_dim: int = 4,
               dtype: str = "float32", page_size: int | None = None, max_len: int | None = None,
               extra_pages: int = 0, share_prefix: Sequence[int] | None = None, seed: int = 0,
               grid: bool = False, q_spread: float = 1.0, name: str = "") -> DecodeCase:
    """A cache holding ``len(lengths)`` sequences; dense if ``page_size`` is None, else paged.

    ``max_len``: S for a dense cache, ``max_pages * page_size`` rounded up for a paged one (default: just
    enough). ``extra_pages``: unused physical pages (all NaN). ``share_prefix[b]``: sequence ``b`` shares
    its first ``share_prefix[b]`` pages (and their tokens) with sequence 0; those pages must be full in
    sequence 0. Physical page ids are a random permutation.
    """
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in lengths]
    bsz, hkv, d = len(lengths), num_kv_heads, head_dim
    npd = NP_DTYPES[dtype]
    share = list(share_prefix) if share_prefix is not None else [0] * bsz
    keys = [_values(rng, (n, hkv, d), dtype, grid, 1.0) for n in lengths]
    values = [_values(rng, (n, hkv, d), dtype, grid, 1.0) for n in lengths]
    if page_size is not None:
        for b in range(1, bsz):
            m = share[b]
            if m > lengths[0] // page_size or m > cdiv(lengths[b], page_size):
                raise ValueError(f"build_case: share_prefix[{b}] = {m} pages is not a full prefix of sequence 0")
            n = min(m * page_size, lengths[b])
            keys[b][:n] = keys[0][:n]
            values[b][:n] = values[0][:n]
    q = _values(rng, (bsz, hkv * group, d), dtype, grid, q_spread)

    if page_size is None:
        s = max(lengths) if max_len is None else max_len
        kv: DenseKV | PagedKV = _dense(keys, values, s, hkv, d, npd)
        dense = kv
    else:
        ps = page_size
        need = max(cdiv(n, ps) for n in lengths)
        max_pages = need if max_len is None else max(cdiv(max_len, ps), need)
        # logical pages -> allocation slots; shared prefixes point at sequence 0's slots
        slot_of: dict[tuple[int, int], int] = {}
        n_slots = 0
        for b, n in enumerate(lengths):
            for j in range(cdiv(n, ps)):
                if b > 0 and j < share[b]:
                    slot_of[b, j] = slot_of[0, j]
                else:
                    slot_of[b, j] = n_slots
                    n_slots += 1
        n_phys = n_slots + extra_pages
        perm = rng.permutation(n_phys)
        k_pages = np.full((n_phys, ps, hkv, d), np.nan, dtype=npd)
        v_pages = np.full((n_phys, ps, hkv, d), np.nan, dtype=npd)
        table = np.full((bsz, max_pages), -1, dtype=np.int32)
        for (b, j), slot in slot_of.items():
            p = int(perm[slot])
            table[b, j] = p
            rows = slice(j * ps, min((j + 1) * ps, lengths[b]))
            k_pages[p, :rows.stop - rows.start] = keys[b][rows]
            v_pages[p, :rows.stop - rows.start] = values[b][rows]
        kv = PagedKV(k_pages, v_pages, table, np.array(lengths, dtype=np.int32))
        dense = _dense(keys, values, max_pages * ps, hkv, d, npd)
    return DecodeCase(name, dtype, q, kv, dense, tuple(k.astype(np.float64) for k in keys),
                      tuple(v.astype(np.float64) for v in values))


def _dense(keys: list[np.ndarray], values: list[np.ndarray], s: int, hkv: int, d: int, npd: np.dtype) -> DenseKV:
    bsz = len(keys)
    k = np.full((bsz, s, hkv, d), np.nan, dtype=npd)
    v = np.full((bsz, s, hkv, d), np.nan, dtype=npd)
    for b in range(bsz):
        k[b, :keys[b].shape[0]] = keys[b]
        v[b, :values[b].shape[0]] = values[b]
    return DenseKV(k, v, np.array([x.shape[0] for x in keys], dtype=np.int32))


@st.composite
def decode_cases(draw: st.DrawFn, *, paged: bool | None = None, dtypes: Sequence[str] = DTYPES,
                 grid: bool | None = None, max_len: int = MAX_LEN) -> DecodeCase:
    """Valid caches and queries: B <= 3, Hkv <= 2, GQA group 1/2/4 with Hq <= 4, D <= 8, ragged lengths
    (0 allowed), max_len <= ``max_len`` (a paged cache rounds up to whole pages)."""
    dtype = draw(st.sampled_from(list(dtypes)))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4] if hkv == 1 else [1, 2]))
    d = draw(st.sampled_from([1, 2, 3, 4, 8]))
    bsz = draw(st.integers(1, 3))
    is_paged = draw(st.booleans()) if paged is None else paged
    use_grid = draw(st.booleans()) if grid is None else grid
    q_spread = draw(st.sampled_from([1.0, 0.25, 3.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    if not is_paged:
        s = draw(st.integers(1, max_len))
        lengths = draw(st.lists(st.integers(0, s), min_size=bsz, max_size=bsz))
        return build_case(lengths, num_kv_heads=hkv, group=group, head_dim=d, dtype=dtype, max_len=s,
                          seed=seed, grid=use_grid, q_spread=q_spread, name="drawn-dense")
    ps = draw(st.sampled_from(PAGE_SIZES))
    max_pages = draw(st.integers(1, max(max_len // ps, 1)))
    lengths = draw(st.lists(st.integers(0, max_pages * ps), min_size=bsz, max_size=bsz))
    share = [0]
    for b in range(1, bsz):
        hi = min(lengths[0] // ps, cdiv(lengths[b], ps))
        share.append(draw(st.integers(0, hi)) if hi > 0 else 0)
    extra = draw(st.integers(0, 2))
    return build_case(lengths, num_kv_heads=hkv, group=group, head_dim=d, dtype=dtype, page_size=ps,
                      max_len=max_pages * ps, extra_pages=extra, share_prefix=share, seed=seed, grid=use_grid,
                      q_spread=q_spread, name="drawn-paged")


# --- named edge cases: always run, beside the drawn ones ------------------------------------------------

def _edge(name: str, lengths: Sequence[int], **kw: object) -> Callable[[str], DecodeCase]:
    def make(dtype: str) -> DecodeCase:
        return build_case(lengths, dtype=dtype, name=name, seed=len(name), **kw)  # type: ignore[arg-type]

    make.__name__ = name
    return make


#: name -> factory(dtype). Pictures: ``|`` page boundary, ``x`` token, ``.`` NaN row, ``-`` unused slot.
EDGE_CASES: dict[str, Callable[[str], DecodeCase]] = {
    # dense [x x x x x . . .] and [. . . . . . . .]: one empty sequence beside a normal one
    "empty_sequence": _edge("empty_sequence", [0, 5], num_kv_heads=2, group=2, max_len=8),
    # every sequence empty
    "all_empty": _edge("all_empty", [0, 0], num_kv_heads=1, group=2, max_len=3),
    # a single token
    "length_1": _edge("length_1", [1], num_kv_heads=2, group=2, head_dim=8, max_len=4),
    # length == S: no padding row to catch a read past the end, the slice must still stop
    "full_cache": _edge("full_cache", [6, 6], num_kv_heads=1, group=4, head_dim=3, max_len=6),
    # paged |x x x x x . . .|: one partial page
    "one_page": _edge("one_page", [5], num_kv_heads=2, group=1, page_size=8),
    # paged |x x x x|: one full page
    "one_full_page": _edge("one_full_page", [4, 1], num_kv_heads=1, group=2, page_size=4),
    # page_size 1: every token its own page
    "page_size_1": _edge("page_size_1", [3, 6, 0], num_kv_heads=2, group=2, page_size=1, extra_pages=2),
    # lengths that are exact multiples of page_size
    "exact_multiple": _edge("exact_multiple", [8, 12], num_kv_heads=2, group=1, page_size=4),
    # lengths that are not
    "not_multiple": _edge("not_multiple", [9, 3, 13], num_kv_heads=1, group=4, page_size=4, extra_pages=1),
    # prefix sharing: sequences 1 and 2 reuse sequence 0's first pages; sequence 2's second page is
    # partial for it but full (real data) for sequence 0
    "shared_prefix": _edge("shared_prefix", [12, 10, 6], num_kv_heads=2, group=2, page_size=4,
                           share_prefix=[0, 2, 2], extra_pages=1),
    # page_table padded with -1 far past the last page in use, NaN pages nobody uses
    "padded_table": _edge("padded_table", [5, 2], num_kv_heads=1, group=1, page_size=2, max_len=20,
                          extra_pages=3),
    # a long sequence, large group
    "gqa_4_long": _edge("gqa_4_long", [40, 17], num_kv_heads=1, group=4, head_dim=8, page_size=16),
}


# --- selections ----------------------------------------------------------------------------------------

def index_from_rows(rows: list[list[np.ndarray]], *, k_max: int | None = None, granularity: str = "token",
                    page_size: int | None = None) -> TopKIndex:
    """A TopKIndex whose row ``(b, g)`` selects ``rows[b][g]`` in that order, padded with -1."""
    bsz, g = len(rows), len(rows[0])
    widest = max((len(r) for rr in rows for r in rr), default=0)
    k_max = widest if k_max is None else max(k_max, widest)
    indices = np.full((bsz, g, k_max), -1, dtype=np.int32)
    counts = np.zeros((bsz, g), dtype=np.int32)
    for b in range(bsz):
        for j in range(g):
            r = np.asarray(rows[b][j], dtype=np.int32)
            indices[b, j, :len(r)] = r
            counts[b, j] = len(r)
    return TopKIndex(indices, counts, granularity, page_size)


def random_rows(case: DecodeCase, rng: np.random.Generator, *, groups: int, page_size: int | None = None,
                p: float = 0.5) -> list[list[np.ndarray]]:
    """Per (b, g), a random subset (each unit kept with probability ``p``) in random order."""
    rows = []
    for n in case.lengths:
        units = int(n) if page_size is None else cdiv(int(n), page_size)
        rows.append([rng.permutation(np.flatnonzero(rng.random(units) < p)) for _ in range(groups)])
    return rows


def full_rows(case: DecodeCase, *, groups: int, page_size: int | None = None) -> list[list[np.ndarray]]:
    """Every token (or every page) of each sequence."""
    return [[np.arange(int(n) if page_size is None else cdiv(int(n), page_size)) for _ in range(groups)]
            for n in case.lengths]


def expand_pages(units: np.ndarray, page_size: int | None, length: int) -> np.ndarray:
    """Token positions of the selected units (pages -> their tokens below ``length``)."""
    units = np.asarray(units, dtype=np.int64)
    if page_size is None:
        return units
    t = (units[:, None] * page_size + np.arange(page_size)[None, :]).ravel()
    return t[t < length]


def scales() -> st.SearchStrategy[float | None]:
    return st.sampled_from([None, 0.5, 1.7])
