"""Every op's declaration: its arguments, as a dataclass whose ``validate()`` rejects what no backend
could take, under its ``@op`` row of the op table (:mod:`sparsecore.ops.table`: its meaning, the NumPy
reference called on the validated arguments, and what it returns).

Messages start with the op's name, name the argument, show the bad value and say what is allowed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import reference as ref
from .._arrays import VALUE_DTYPES, dtype_name, to_host
from .._checks import check_array, check_choice, check_dtype, check_int, check_ndim, check_real, check_same_dtype, fail
from ..formats import _fastcheck
from ..formats.codes import KeyCodes
from ..formats.csr import CSR
from ..formats.kv import DenseKV, PageBounds, PagedKV
from ..formats.tiled_ell import TiledELL, check_tile_capacity
from ..formats.topk import TopKIndex, topk_capacity
from .base import OpInputs, Out, op

SPARSE = (TiledELL, CSR)


def _check_sparse(op: str, name: str, a: Any) -> None:
    if not isinstance(a, SPARSE):
        fail(op, f"{name} must be a TiledELL or a CSR, got {type(a).__name__}; convert a dense matrix "
                 "with sparsecore.pack", TypeError)


def _check_kv(op: str, kv: Any) -> None:
    if not isinstance(kv, (DenseKV, PagedKV)):
        fail(op, f"kv must be a DenseKV or a PagedKV, got {type(kv).__name__}", TypeError)


def _check_query(op: str, q: Any, kv: DenseKV | PagedKV) -> None:
    check_ndim(op, "q", q, 3, "[B, Hq, D]")
    check_dtype(op, "q", q, VALUE_DTYPES)
    b, hq, d = (int(s) for s in q.shape)
    if b != kv.batch:
        fail(op, f"q has batch {b} but kv has batch {kv.batch}; they must match")
    if d != kv.head_dim:
        fail(op, f"q has head_dim {d} but kv has head_dim {kv.head_dim}; they must match")
    if kv.num_kv_heads == 0 or hq == 0 or hq % kv.num_kv_heads:
        fail(op, f"q has Hq = {hq} query heads, kv has Hkv = {kv.num_kv_heads}; Hq must be a positive "
                 "multiple of Hkv (GQA)")
    if dtype_name(q) != kv.dtype:
        fail(op, f"q has dtype {dtype_name(q)} but kv has {kv.dtype}; they must match", TypeError)


#: the range of ``scale``: positive normal float32 numbers, because every float32 backend multiplies by
#: ``float32(scale)`` (1e39 would become inf, 1e-39 a subnormal or 0).
SCALE_MIN = float(np.finfo(np.float32).tiny)
SCALE_MAX = float(np.finfo(np.float32).max)

#: token positions and page numbers are int32: ``sink`` and ``window`` (tokens) are at most this.
MAX_TOKENS = 2**31 - 1


def _check_scale(op: str, scale: Any) -> float | None:
    if scale is None:
        return None
    f = check_real(op, "scale", scale, allowed="a finite float > 0 (or None for 1 / sqrt(D))", positive=True)
    if not SCALE_MIN <= f <= SCALE_MAX:
        fail(op, f"scale = {scale!r}; must be between {SCALE_MIN:.9g} and {SCALE_MAX:.9g}, float32's normal range "
                 "(the scores are scaled in float32)")
    return f


def threshold_f32(threshold: float) -> float:
    """The largest float32 ``<= threshold``. For every float32 (and so every float16 and bfloat16)
    magnitude ``a``, ``a <= threshold`` (float64, the reference's comparison) equals
    ``a <= threshold_f32`` (float32): backends that compare in float32 decide exactly as the
    reference. A threshold past the float32 range gives float32's largest finite number, so every
    finite entry is dropped and infinities and NaN are kept, as in float64."""
    t = np.float32(min(threshold, SCALE_MAX))
    if float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


@op(lambda i: ref.pack(i.x, threshold=i.threshold, activation=i.activation, tile=i.tile, capacity=i.capacity),
    "ffn", "TiledELL [M, K]")
@dataclass(frozen=True, eq=False)
class PackInputs(OpInputs):
    OP: ClassVar[str] = "pack"
    x: Any
    threshold: float = 0.0
    activation: str | None = None
    tile: int = 256
    capacity: int | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.x)

    @property
    def threshold_f32(self) -> float:
        """The threshold for a float32 comparison that decides exactly as the reference's float64
        one (see :func:`threshold_f32`); what every float32 backend compares against."""
        return threshold_f32(self.threshold)

    def _validate(self) -> None:
        check_ndim(self.OP, "x", self.x, 2, "[M, K]")
        check_dtype(self.OP, "x", self.x, VALUE_DTYPES)
        self._validate_scalars()

    def _validate_scalars(self) -> None:
        thr = check_real(self.OP, "threshold", self.threshold, allowed="a finite number >= 0")
        check_choice(self.OP, "activation", self.activation, (None, "relu"))
        tile = check_int(self.OP, "tile", self.tile)
        tile, cap = check_tile_capacity(self.OP, tile, max(tile // 8, 1) if self.capacity is None else self.capacity)
        # normalised so that backends see plain Python numbers
        object.__setattr__(self, "threshold", thr)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "capacity", cap)


@op(lambda i: ref.ffn.gated_pack(i.gate, i.up, threshold=i.threshold, activation=i.activation, tile=i.tile,
                                 capacity=i.capacity), "ffn", "TiledELL [M, K]")
@dataclass(frozen=True, eq=False)
class GatedPackInputs(OpInputs):
    OP: ClassVar[str] = "gated_pack"
    gate: Any
    up: Any
    threshold: float = 0.0
    activation: str | None = "relu"
    tile: int = 256
    capacity: int | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.gate)

    threshold_f32 = PackInputs.threshold_f32

    def _validate(self) -> None:
        check_ndim(self.OP, "gate", self.gate, 2, "[M, K]")
        check_dtype(self.OP, "gate", self.gate, VALUE_DTYPES)
        if tuple(self.up.shape) != tuple(self.gate.shape) or dtype_name(self.up) != dtype_name(self.gate):
            fail(self.OP, f"up has shape {tuple(self.up.shape)} {dtype_name(self.up)}; expected "
                          f"{tuple(self.gate.shape)} {dtype_name(self.gate)} like gate")
        PackInputs._validate_scalars(self)  # type: ignore[arg-type]


@op(lambda i: ref.unpack(i.a), "ffn", "dense [M, K]")
@dataclass(frozen=True, eq=False)
class UnpackInputs(OpInputs):
    OP: ClassVar[str] = "unpack"
    a: Any

    @property
    def dtype(self) -> str:
        return self.a.dtype

    def _validate(self) -> None:
        if not isinstance(self.a, TiledELL):
            fail(self.OP, f"a must be a TiledELL, got {type(self.a).__name__}", TypeError)

    def validate_data(self) -> None:
        self.a.validate()


@op(lambda i: ref.spmm(i.a, i.w), "ffn", "dense [M, N]")
@dataclass(frozen=True, eq=False)
class SpmmInputs(OpInputs):
    OP: ClassVar[str] = "spmm"
    a: Any
    w: Any

    @property
    def dtype(self) -> str:
        return dtype_name(self.w)

    def _validate(self) -> None:
        _check_sparse(self.OP, "a", self.a)
        check_ndim(self.OP, "w", self.w, 2, "[K, N]")
        if self.w.shape[0] != self.a.shape[1]:
            fail(self.OP, f"w has shape {tuple(self.w.shape)}; expected w.shape[0] == K = {self.a.shape[1]} "
                          f"(a has shape {self.a.shape})")
        check_dtype(self.OP, "w", self.w, VALUE_DTYPES)
        if self.a.dtype != dtype_name(self.w):
            fail(self.OP, f"a has dtype {self.a.dtype} but w has {dtype_name(self.w)}; they must match", TypeError)

    def validate_data(self) -> None:
        self.a.validate()


def _threshold_spmm_example(rng: np.random.Generator, dtype: str) -> ThresholdSpmmInputs:
    """A decode-size call: 4 rows of SmolLM2's down projection input (K 1536), ~1 % above the threshold."""
    from .._arrays import BFLOAT16

    t = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    return ThresholdSpmmInputs(rng.standard_normal((4, 1536)).astype(t), rng.standard_normal((1536, 576)).astype(t),
                               2.58)


@op(lambda i: ref.ffn.threshold_spmm(i.x, i.w, threshold=i.threshold), "ffn", "dense [M, N]",
    example=_threshold_spmm_example, baseline=lambda i: ("numpy dense matmul", lambda: i.x @ i.w),
    out_shape=lambda i: (i.x.shape[0], i.w.shape[1]))
@dataclass(frozen=True, eq=False)
class ThresholdSpmmInputs(OpInputs):
    OP: ClassVar[str] = "threshold_spmm"
    x: Any
    w: Any
    threshold: float = 0.0

    @property
    def dtype(self) -> str:
        return dtype_name(self.x)

    threshold_f32 = PackInputs.threshold_f32

    def _validate(self) -> None:
        check_ndim(self.OP, "x", self.x, 2, "[M, K]")
        check_dtype(self.OP, "x", self.x, VALUE_DTYPES)
        check_ndim(self.OP, "w", self.w, 2, "[K, N]")
        if self.w.shape[0] != self.x.shape[1]:
            fail(self.OP, f"w has shape {tuple(self.w.shape)}; expected w.shape[0] == K = {self.x.shape[1]} "
                          f"(x has shape {tuple(self.x.shape)})")
        if dtype_name(self.w) != dtype_name(self.x):
            fail(self.OP, f"x has dtype {dtype_name(self.x)} but w has {dtype_name(self.w)}; they must match",
                 TypeError)
        thr = check_real(self.OP, "threshold", self.threshold, allowed="a finite number >= 0")
        object.__setattr__(self, "threshold", thr)


def _threshold_mlp_example(rng: np.random.Generator, dtype: str) -> ThresholdMlpInputs:
    """A decode step of one SmolLM2-135M MLP (D 576, K 1536): 4 rows, about 60 % of the inputs and half
    of the hidden entries kept."""
    from .._arrays import BFLOAT16

    t = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    x = rng.standard_normal((4, 576))
    return ThresholdMlpInputs(x.astype(t), (rng.standard_normal((576, 3072)) / 24).astype(t),
                              (rng.standard_normal((1536, 576)) / 40).astype(t), 0.84, 0.2)


def _threshold_mlp_dense(i: ThresholdMlpInputs) -> Any:
    k = i.w_down.shape[0]
    gu = i.x @ i.w_gate_up
    g = gu[:, :k]
    return ((g / (1 + np.exp(-g)) if i.activation == "silu" else np.maximum(g, 0)) * gu[:, k:]) @ i.w_down


@op(lambda i: ref.ffn.threshold_mlp(i.x, i.w_gate_up, i.w_down, input_threshold=i.input_threshold,
                                    threshold=i.threshold, activation=i.activation, kept=i.kept),
    "ffn", "dense [M, N]", example=_threshold_mlp_example,
    baseline=lambda i: ("numpy dense gated MLP", lambda: _threshold_mlp_dense(i)),
    out_shape=lambda i: (i.x.shape[0], i.w_down.shape[1]))
@dataclass(frozen=True, eq=False)
class ThresholdMlpInputs(OpInputs):
    OP: ClassVar[str] = "threshold_mlp"
    x: Any
    w_gate_up: Any
    w_down: Any
    input_threshold: float = 0.0
    threshold: float = 0.0
    activation: str = "silu"
    kept: Out | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.x)

    @property
    def input_threshold_f32(self) -> float:
        return threshold_f32(self.input_threshold)

    threshold_f32 = PackInputs.threshold_f32

    def _validate(self) -> None:
        check_ndim(self.OP, "x", self.x, 2, "[M, D]")
        check_dtype(self.OP, "x", self.x, VALUE_DTYPES)
        check_ndim(self.OP, "w_gate_up", self.w_gate_up, 2, "[D, 2K]")
        check_ndim(self.OP, "w_down", self.w_down, 2, "[K, N]")
        m, d = self.x.shape
        k = self.w_down.shape[0]
        if tuple(self.w_gate_up.shape) != (d, 2 * k):
            fail(self.OP, f"w_gate_up has shape {tuple(self.w_gate_up.shape)}; expected (D, 2K) = ({d}, {2 * k}) "
                          f"(x has shape {tuple(self.x.shape)}, w_down {tuple(self.w_down.shape)})")
        check_same_dtype(self.OP, {"x": self.x, "w_gate_up": self.w_gate_up, "w_down": self.w_down})
        check_choice(self.OP, "activation", self.activation, ("silu", "relu"))
        for name in ("input_threshold", "threshold"):
            v = check_real(self.OP, name, getattr(self, name), allowed="a finite number >= 0")
            object.__setattr__(self, name, v)
        if self.kept is not None:
            check_ndim(self.OP, "kept", self.kept, 1, "[M]")
            if tuple(self.kept.shape) != (m,):
                fail(self.OP, f"kept has shape {tuple(self.kept.shape)}; expected (M,) = ({m},)")
            if dtype_name(self.kept) != "int64":
                fail(self.OP, f"kept has dtype {dtype_name(self.kept)}; expected int64", TypeError)
            if isinstance(self.kept, np.ndarray) and not (self.kept.flags.writeable and self.kept.flags.c_contiguous):
                fail(self.OP, "kept must be a writeable, C-contiguous array (the counts are written into it)")


@op(lambda i: ref.sddmm(i.x, i.w, i.pattern), "ffn", "the pattern's format [M, K]")
@dataclass(frozen=True, eq=False)
class SddmmInputs(OpInputs):
    OP: ClassVar[str] = "sddmm"
    x: Any
    w: Any
    pattern: Any

    @property
    def dtype(self) -> str:
        return dtype_name(self.x)

    def _validate(self) -> None:
        _check_sparse(self.OP, "pattern", self.pattern)
        check_ndim(self.OP, "x", self.x, 2, "[M, D]")
        check_ndim(self.OP, "w", self.w, 2, "[K, D]")
        m, k = self.pattern.shape
        if self.x.shape[0] != m:
            fail(self.OP, f"x has shape {tuple(self.x.shape)}; expected x.shape[0] == M = {m} (pattern has "
                          f"shape {self.pattern.shape})")
        if self.w.shape[0] != k:
            fail(self.OP, f"w has shape {tuple(self.w.shape)}; expected w.shape[0] == K = {k} (pattern has "
                          f"shape {self.pattern.shape})")
        if self.w.shape[1] != self.x.shape[1]:
            fail(self.OP, f"x has shape {tuple(self.x.shape)} and w has shape {tuple(self.w.shape)}; "
                          "x.shape[1] must equal w.shape[1] (D)")
        check_dtype(self.OP, "x", self.x, VALUE_DTYPES)
        check_same_dtype(self.OP, {"x": self.x, "w": self.w})

    def validate_data(self) -> None:
        self.pattern.validate()


@op(lambda i: ref.spmm_t(i.a, i.dy), "ffn", "dense [K, N]")
@dataclass(frozen=True, eq=False)
class SpmmTInputs(OpInputs):
    OP: ClassVar[str] = "spmm_t"
    a: Any
    dy: Any

    @property
    def dtype(self) -> str:
        return dtype_name(self.dy)

    def _validate(self) -> None:
        _check_sparse(self.OP, "a", self.a)
        check_ndim(self.OP, "dy", self.dy, 2, "[M, N]")
        if self.dy.shape[0] != self.a.shape[0]:
            fail(self.OP, f"dy has shape {tuple(self.dy.shape)}; expected dy.shape[0] == M = {self.a.shape[0]} "
                          f"(a has shape {self.a.shape})")
        check_dtype(self.OP, "dy", self.dy, VALUE_DTYPES)
        if self.a.dtype != dtype_name(self.dy):
            fail(self.OP, f"a has dtype {self.a.dtype} but dy has {dtype_name(self.dy)}; they must match",
                 TypeError)

    def validate_data(self) -> None:
        self.a.validate()


@op(lambda i: ref.gated_ffn(i.x, i.gate, i.w_up, i.w_down), "ffn", "dense [M, N]")
@dataclass(frozen=True, eq=False)
class GatedFfnInputs(OpInputs):
    OP: ClassVar[str] = "gated_ffn"
    x: Any
    gate: Any
    w_up: Any
    w_down: Any

    @property
    def dtype(self) -> str:
        return dtype_name(self.x)

    def _validate(self) -> None:
        _check_sparse(self.OP, "gate", self.gate)
        check_ndim(self.OP, "x", self.x, 2, "[M, D]")
        check_ndim(self.OP, "w_up", self.w_up, 2, "[K, D]")
        check_ndim(self.OP, "w_down", self.w_down, 2, "[K, N]")
        m, k = self.gate.shape
        d = self.x.shape[1]
        if self.x.shape[0] != m:
            fail(self.OP, f"x has shape {tuple(self.x.shape)}; expected x.shape[0] == M = {m} (gate has "
                          f"shape {self.gate.shape})")
        if tuple(self.w_up.shape) != (k, d):
            fail(self.OP, f"w_up has shape {tuple(self.w_up.shape)}; expected (K, D) = {(k, d)}")
        if self.w_down.shape[0] != k:
            fail(self.OP, f"w_down has shape {tuple(self.w_down.shape)}; expected w_down.shape[0] == K = {k}")
        check_dtype(self.OP, "x", self.x, VALUE_DTYPES)
        check_same_dtype(self.OP, {"x": self.x, "w_up": self.w_up, "w_down": self.w_down})
        if self.gate.dtype != dtype_name(self.x):
            fail(self.OP, f"gate has dtype {self.gate.dtype} but x has {dtype_name(self.x)}; they must match",
                 TypeError)

    def validate_data(self) -> None:
        self.gate.validate()


def _default_page_size(kv: DenseKV | PagedKV) -> int:
    return kv.page_size if isinstance(kv, PagedKV) else 16


def _check_bounds(op: str, name: str, bounds: Any, kv: DenseKV | PagedKV) -> None:
    if not isinstance(bounds, PageBounds):
        fail(op, f"{name} must be a PageBounds (from sparsecore.page_bounds), got {type(bounds).__name__}",
             TypeError)
    bounds.check_matches(op, name, kv)


@op(lambda i: ref.page_bounds(i.kv, i.unit_page_size, out=i.out, start=i.start), "decode",
    "PageBounds [B, P, Hkv, D]")
@dataclass(frozen=True, eq=False)
class PageBoundsInputs(OpInputs):
    OP: ClassVar[str] = "page_bounds"
    kv: Any
    page_size: int | None = None
    out: Any = None
    start: Any = None

    @property
    def dtype(self) -> str:
        return self.kv.dtype

    @property
    def unit_page_size(self) -> int:
        """Tokens per logical page: ``out``'s, else ``page_size``, else the cache's default."""
        if self.out is not None:
            return self.out.page_size
        return self.page_size if self.page_size is not None else _default_page_size(self.kv)

    @property
    def num_pages(self) -> int:
        """Pages of the result: ``out``'s, else ``ceil(max_len / page_size)``."""
        return self.out.num_pages if self.out is not None else -(-self.kv.max_len // self.unit_page_size)

    def _validate(self) -> None:
        _check_kv(self.OP, self.kv)
        if self.page_size is not None:
            check_int(self.OP, "page_size", self.page_size, lo=1, hi=MAX_TOKENS)
        if self.out is not None:
            if isinstance(self.out, PageBounds) and self.page_size is not None \
                    and int(self.page_size) != self.out.page_size:
                fail(self.OP, f"page_size = {self.page_size} but out.page_size = {self.out.page_size}; give one "
                              "or make them equal")
            _check_bounds(self.OP, "out", self.out, self.kv)
            for name, a in self.out.arrays().items():
                if isinstance(a, np.ndarray) and not a.flags.writeable:
                    fail(self.OP, f"out.{name} is a read-only NumPy array; the bounds are updated in place")
        if self.start is not None:
            if self.out is None:
                fail(self.OP, "start is given without out; start says which pages of out to recompute")
            check_ndim(self.OP, "start", self.start, 1, "[B]")
            check_dtype(self.OP, "start", self.start, ("int32",))
            if int(self.start.shape[0]) != self.kv.batch:
                fail(self.OP, f"start has shape {tuple(self.start.shape)}; expected ({self.kv.batch},), one per "
                              "sequence")

    def check_bounds(self) -> None:
        self.kv.check_bounds(self.OP, "kv")
        if self.start is not None:
            self._check_start()

    def validate_data(self) -> None:
        self.kv.validate()
        if self.start is not None:
            self._check_start()

    def _check_start(self) -> None:
        st = to_host(self.start).astype(np.int64)
        ln = to_host(self.kv.lengths).astype(np.int64)
        bad = (st < 0) | (st > ln)
        if bad.any():
            b = int(np.argmax(bad))
            fail(self.OP, f"start[{b}] = {st[b]}; allowed 0 <= start[b] <= lengths[{b}] = {ln[b]}")


#: the mass ranking's default sample of the keys outside the candidates (the reference defines it)
TAIL_SAMPLE = ref.TAIL_SAMPLE


@op(lambda i: ref.select_topk(i.q, i.kv, i.k, method=i.method, sink=i.sink, window=i.window, shared=i.shared,
                              page_size=i.unit_page_size, bounds=i.bounds, top_p=i.top_p, k_min=i.k_min,
                              scale=i.scale, codes=i.codes, rescore=i.rescore, candidates=i.candidates,
                              tail_sample=i.tail_sample),
    "decode", "TopKIndex [B, G, k_max]")
@dataclass(frozen=True, eq=False)
class SelectTopkInputs(OpInputs):
    OP: ClassVar[str] = "select_topk"
    q: Any
    kv: Any
    k: int
    method: str = "exact"
    sink: int = 0
    window: int = 0
    shared: bool = True
    page_size: int | None = None
    bounds: Any = None
    top_p: float | None = None
    k_min: int = 0
    scale: float | None = None
    codes: Any = None
    rescore: int = 0
    candidates: int = 0
    tail_sample: int | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.q)

    @property
    def unit_page_size(self) -> int | None:
        """Tokens per selected unit: None for tokens (exact), the Quest page size otherwise."""
        if self.method != "quest":
            return None
        if self.page_size is not None:
            return self.page_size
        if self.bounds is not None:
            return self.bounds.page_size
        return _default_page_size(self.kv)

    @property
    def forced_window(self) -> int:
        """The recent tokens always kept: ``window``, and for page selection at least the newest
        token, so the page being written is always attended (docs/ops.md, ``select_topk``)."""
        return max(int(self.window), 1) if self.method == "quest" else int(self.window)

    @property
    def tail_stride(self) -> int:
        """The mass ranking's sample of the keys outside the candidates: every ``tail_stride``-th
        (0: none); ``tail_sample``, 16 when not given."""
        return TAIL_SAMPLE if self.tail_sample is None else int(self.tail_sample)

    @property
    def k_max(self) -> int:
        """The index's last axis, from shapes only (:func:`sparsecore.formats.topk.topk_capacity`)."""
        return topk_capacity(int(self.k), int(self.sink), self.forced_window, self.kv.max_len, self.unit_page_size)

    def _validate(self) -> None:
        _check_kv(self.OP, self.kv)
        _check_query(self.OP, self.q, self.kv)
        check_choice(self.OP, "method", self.method, ("exact", "quest", "int8"))
        if not isinstance(self.shared, (bool, np.bool_)):
            fail(self.OP, f"shared = {self.shared!r}; must be True or False", TypeError)
        object.__setattr__(self, "shared", bool(self.shared))
        k = check_int(self.OP, "k", self.k, lo=0)
        check_int(self.OP, "sink", self.sink, lo=0, hi=MAX_TOKENS)
        check_int(self.OP, "window", self.window, lo=0, hi=MAX_TOKENS)
        if self.page_size is not None:
            if self.method != "quest":
                fail(self.OP, f"page_size = {self.page_size!r} is only used by method = 'quest'")
            check_int(self.OP, "page_size", self.page_size, lo=1, hi=MAX_TOKENS)
        if self.bounds is not None:
            if self.method != "quest":
                fail(self.OP, f"bounds are only read by method = 'quest' (method = {self.method!r})")
            _check_bounds(self.OP, "bounds", self.bounds, self.kv)
            if self.page_size is not None and int(self.page_size) != self.bounds.page_size:
                fail(self.OP, f"page_size = {self.page_size} but bounds.page_size = {self.bounds.page_size}; "
                              "they must be equal (or leave page_size out)")
        ps = self.unit_page_size
        if ps is None and k > self.kv.max_len:
            fail(self.OP, f"k = {k} exceeds the cache's capacity of {self.kv.max_len} tokens; "
                          f"allowed 0 <= k <= {self.kv.max_len}")
        if ps is not None and k > -(-self.kv.max_len // ps):
            n = -(-self.kv.max_len // ps)
            fail(self.OP, f"k = {k} exceeds the cache's capacity of {n} page{'s' * (n != 1)} of {ps} tokens; "
                          f"allowed 0 <= k <= {n}")
        self._validate_top_p(k)
        self._validate_codes(k)

    def _validate_codes(self, k: int) -> None:
        """method="int8": ``codes`` (a KeyCodes of this cache) and ``rescore`` (0, or >= k)."""
        if self.method != "int8":
            if self.codes is not None:
                fail(self.OP, f"codes are only read by method = 'int8' (method = {self.method!r})")
            if isinstance(self.rescore, bool) or self.rescore != 0:
                fail(self.OP, f"rescore = {self.rescore!r} is only used by method = 'int8'")
            return
        if self.codes is None:
            fail(self.OP, "method = 'int8' needs codes: the int8 copy of the keys (sparsecore.quantize_keys(kv))")
        if not isinstance(self.codes, KeyCodes):
            fail(self.OP, f"codes must be a KeyCodes (from sparsecore.quantize_keys), got {type(self.codes).__name__}",
                 TypeError)
        self.codes.check_matches(self.OP, "codes", self.kv)
        r = check_int(self.OP, "rescore", self.rescore, lo=0, hi=self.kv.max_len)
        if 0 < r < k:
            fail(self.OP, f"rescore = {r} is below k = {k}; allowed 0 (no re-scoring) or k <= rescore <= "
                          f"{self.kv.max_len} (candidates re-scored from the keys)")

    def _validate_candidates(self, k: int) -> None:
        """Mass ranking over candidates: ``candidates >= k`` (0: off; at least a row's length: every
        key of the row, so a value above the cache's capacity stays valid as the cache grows), exact
        or int8 without rescore; ``tail_sample`` (>= 0) with it only."""
        c = check_int(self.OP, "candidates", self.candidates, lo=0, hi=MAX_TOKENS)
        if self.tail_sample is not None:
            if not c:
                fail(self.OP, f"tail_sample = {self.tail_sample!r} is only used with candidates (the mass ranking "
                              "over candidates); give candidates or leave it out")
            check_int(self.OP, "tail_sample", self.tail_sample, lo=0, hi=MAX_TOKENS)
        if not c:
            return
        if c < k:
            fail(self.OP, f"candidates = {c} is below k = {k}; allowed 0 (off) or an int >= k (the units ranked "
                          "by their estimated attention mass; at least the cache's length: every key)")
        if self.method not in ("exact", "int8"):
            fail(self.OP, f"candidates is only supported with method = 'exact' or 'int8' (method = {self.method!r})")
        if not isinstance(self.rescore, bool) and self.rescore != 0:
            fail(self.OP, f"rescore = {self.rescore!r} is not used with candidates: they are ranked by their "
                          "estimated attention mass; leave rescore at 0")

    def _validate_top_p(self, k: int) -> None:
        """The adaptive budget's arguments: ``top_p`` in (0, 1], ``0 <= k_min <= k``, ``scale``."""
        self._validate_candidates(k)
        if self.top_p is None:
            for name, unused in (("k_min", isinstance(self.k_min, bool) or self.k_min != 0),
                                 ("scale", self.scale is not None and not self.candidates)):
                if unused:
                    fail(self.OP, f"{name} = {getattr(self, name)!r} is only used with top_p (the adaptive budget)"
                                  f"{' or candidates' if name == 'scale' else ''}; give "
                                  f"{'top_p' if name == 'k_min' else 'one'} or leave it out")
            if self.candidates:
                object.__setattr__(self, "scale", _check_scale(self.OP, self.scale))
            return
        allowed = "a float with 0 < top_p <= 1 (the fraction of the estimated attention mass to keep)"
        if isinstance(self.top_p, (bool, np.bool_)) or not isinstance(self.top_p, numbers.Real):
            fail(self.OP, f"top_p = {self.top_p!r} ({type(self.top_p).__name__}); must be {allowed}", TypeError)
        p = float(self.top_p)
        if not (0.0 < p <= 1.0):  # also NaN
            fail(self.OP, f"top_p = {self.top_p!r}; must be {allowed}")
        if self.method not in ("exact", "int8"):
            fail(self.OP, f"top_p is only supported with method = 'exact' or 'int8' (method = {self.method!r}): "
                          "the attention mass is estimated from every key's score")
        if self.method == "int8" and not isinstance(self.rescore, bool) and self.rescore != 0:
            fail(self.OP, f"rescore = {self.rescore!r} is not used with top_p: the int8 scores estimate the "
                          "attention mass themselves; leave rescore at 0")
        k_min = check_int(self.OP, "k_min", self.k_min, lo=0)
        if k_min > k:
            fail(self.OP, f"k_min = {k_min} exceeds k = {k}; allowed 0 <= k_min <= k (k is the most keys "
                          "chosen by score, k_min the fewest)")
        object.__setattr__(self, "top_p", p)
        object.__setattr__(self, "k_min", k_min)
        object.__setattr__(self, "scale", _check_scale(self.OP, self.scale))

    def validate_data(self) -> None:
        self.kv.validate()


@op(lambda i: ref.sparse_decode(i.q, i.kv, i.index, scale=i.scale), "decode", "(out [B, Hq, D], lse [B, Hq])")
@dataclass(frozen=True, eq=False)
class SparseDecodeInputs(OpInputs):
    OP: ClassVar[str] = "sparse_decode"
    q: Any
    kv: Any
    index: Any
    scale: float | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.q)

    @property
    def shared(self) -> bool:
        """True when one selection serves all query heads of a KV group (G == Hkv)."""
        return self.index.groups == self.kv.num_kv_heads

    def _validate(self) -> None:
        _check_kv(self.OP, self.kv)
        _check_query(self.OP, self.q, self.kv)
        if not isinstance(self.index, TopKIndex):
            fail(self.OP, f"index must be a TopKIndex, got {type(self.index).__name__}", TypeError)
        b, hq, _ = self.q.shape
        if self.index.batch != b:
            fail(self.OP, f"index has batch {self.index.batch} but q has batch {b}; they must match")
        if self.index.groups not in (self.kv.num_kv_heads, hq):
            fail(self.OP, f"index has G = {self.index.groups} selection rows per sequence; expected Hkv = "
                          f"{self.kv.num_kv_heads} (shared per KV group) or Hq = {hq} (per query head)")
        object.__setattr__(self, "scale", _check_scale(self.OP, self.scale))

    def check_bounds(self) -> None:
        self.kv.check_bounds(self.OP, "kv")
        self.index.check_bounds(self.OP, "index", self.kv.lengths)

    def validate_data(self) -> None:
        if not self.kv.paged and _fastcheck.dense_kv_topk_ok(self.kv, self.index):
            return  # one compiled pass over both; any doubt runs the checks that name the fault
        self.kv.validate()
        self.index.validate(lengths=self.kv.lengths)


@op(lambda i: ref.dense_decode(i.q, i.kv, scale=i.scale), "decode", "(out [B, Hq, D], lse [B, Hq])")
@dataclass(frozen=True, eq=False)
class DenseDecodeInputs(OpInputs):
    OP: ClassVar[str] = "dense_decode"
    q: Any
    kv: Any
    scale: float | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.q)

    def _validate(self) -> None:
        _check_kv(self.OP, self.kv)
        _check_query(self.OP, self.q, self.kv)
        object.__setattr__(self, "scale", _check_scale(self.OP, self.scale))

    def validate_data(self) -> None:
        self.kv.validate()


@op(lambda i: ref.merge_attention(i.o1, i.lse1, i.o2, i.lse2), "decode", "(out [..., D], lse [...])")
@dataclass(frozen=True, eq=False)
class MergeAttentionInputs(OpInputs):
    OP: ClassVar[str] = "merge_attention"
    o1: Any
    lse1: Any
    o2: Any
    lse2: Any

    @property
    def dtype(self) -> str:
        return dtype_name(self.o1)

    def _validate(self) -> None:
        for n in ("o1", "o2"):
            o = getattr(self, n)
            check_array(self.OP, n, o)
            if len(o.shape) < 1:
                fail(self.OP, f"{n} has shape {tuple(o.shape)}; expected at least 1 dimension [..., D]")
        if tuple(self.o2.shape) != tuple(self.o1.shape):
            fail(self.OP, f"o2 has shape {tuple(self.o2.shape)}; expected {tuple(self.o1.shape)} like o1")
        check_dtype(self.OP, "o1", self.o1, VALUE_DTYPES)
        check_same_dtype(self.OP, {"o1": self.o1, "o2": self.o2})
        want = tuple(self.o1.shape[:-1])
        for n in ("lse1", "lse2"):
            lse = getattr(self, n)
            check_ndim(self.OP, n, lse, len(want), "[...] = o.shape[:-1]")
            if tuple(lse.shape) != want:
                fail(self.OP, f"{n} has shape {tuple(lse.shape)}; expected {want} = o1.shape[:-1]")
            check_dtype(self.OP, n, lse, ("float32", "float64"))
