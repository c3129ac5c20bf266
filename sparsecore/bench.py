"""``sparsecore bench``: where sparsecore wins and where it loses, beside what a user would pick instead.

Two suites, one runner:

- ``main`` (the default): the shapes users run. FFN down projections ``A[M, K] @ W[K, N]`` of
  SmolLM2-135M (K 1536, N 576) and of a 2B model (K 5632, N 2048) at decode sizes M = 1, 4, 16 and a
  prefill M = 512, at 1 %, 5 % and 50 % density, beside torch dense matmul, torch sparse CSR, SciPy
  CSR and NumPy dense; decode attention over 4K-32K tokens at 50x sparsity (SmolLM2: Hq 9, Hkv 3,
  D 64; and Hq 32, Hkv 8, D 128), beside torch gather of the same selected keys + SDPA and dense SDPA,
  with the public calls and a planned ``DecodePlan.run``.
- ``ops``: every op on every available backend beside a dense NumPy baseline (small shapes).

Every implementation is called once (warm-up, compile, and the result checked against a reference),
then timed ``repeats`` times; a row shows min, median and max. A block is one configuration; its
rows compare each peer with sparsecore's main row (and sparsecore's end-to-end rows with the
strongest fitting peer): the speedup is the peer's median over sparsecore's, and a row where
sparsecore is slower says so.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import formats as F
from . import ops
from ._arrays import to_host
from ._env import git_commit, gpus, host, library_versions
from ._progress import Progress
from .ops import inputs as I


@dataclass
class Case:
    op: str
    shape: str
    inputs: I.OpInputs
    baseline_name: str
    baseline: Callable[[], Any]
    #: bytes a kernel must move at least and its flops, for GB/s and GFLOP/s
    bytes: float = 0.0
    flops: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _sparse(rng: np.random.Generator, m: int, k: int, density: float, dtype: Any) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(dtype)
    x[rng.random((m, k)) >= density] = 0
    return x


def _np_dense_decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Vectorised float32 dense decode in NumPy: the host baseline for the decode ops."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    out = np.empty((b, hq, d), np.float32)
    for i in range(b):
        n = int(lengths[i])
        qg = q[i].astype(np.float32).reshape(hkv, hq // hkv, d)
        s = np.einsum("hgd,thd->hgt", qg, k[i, :n].astype(np.float32)) / np.sqrt(d)
        p = np.exp(s - s.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        out[i] = np.einsum("hgt,thd->hgd", p, v[i, :n].astype(np.float32)).reshape(hq, d)
    return out


def default_suite(scale: str = "small", seed: int = 0) -> list[Case]:
    """Host cases (NumPy float32). ``scale="small"`` runs in seconds even on the reference."""
    rng = np.random.default_rng(seed)
    big = scale == "large"
    m, k, n = (512, 5632, 2048) if big else (256, 2048, 512)
    dens = 0.01
    f32 = np.float32
    cases: list[Case] = []

    x = _sparse(rng, m, k, dens, f32)
    a = F.tiled_ell_from_dense(x)
    w = rng.standard_normal((k, n)).astype(f32)
    nnz = int((x != 0).sum())
    cases.append(Case("pack", f"M={m} K={k} density={dens:.0%}", I.PackInputs(x), "numpy nonzero",
                      lambda: np.nonzero(x), bytes=x.nbytes + nnz * 6, flops=0))
    gate_in = rng.standard_normal((m, k)).astype(f32) - 2.3  # relu keeps about 1 %
    up_in = rng.standard_normal((m, k)).astype(f32)
    cases.append(Case("gated_pack", f"M={m} K={k} relu(gate) * up, about 1 % kept",
                      I.GatedPackInputs(gate_in, up_in), "numpy relu, product and nonzero",
                      lambda: np.nonzero(np.maximum(gate_in, 0) * up_in), bytes=2 * x.nbytes + nnz * 6,
                      flops=m * k))
    cases.append(Case("spmm", f"M={m} K={k} N={n} density={dens:.0%}", I.SpmmInputs(a, w), "numpy dense matmul",
                      lambda: x @ w, bytes=nnz * 6 + nnz * n * 4 + m * n * 4, flops=2.0 * nnz * n))
    try:
        import scipy.sparse as sp

        xs = sp.csr_matrix(x)
        cases.append(Case("spmm", f"M={m} K={k} N={n} density={dens:.0%} (vs scipy)", I.SpmmInputs(a, w),
                          "scipy csr @ dense", lambda: xs @ w, bytes=nnz * 6 + nnz * n * 4 + m * n * 4,
                          flops=2.0 * nnz * n))
    except ImportError:
        pass
    xd = rng.standard_normal((m, n)).astype(f32)
    cases.append(Case("sddmm", f"M={m} K={k} D={n} density={dens:.0%}", I.SddmmInputs(xd, w, a),
                      "numpy dense x @ w.T, masked", lambda: (xd @ w.T) * (x != 0),
                      bytes=nnz * (6 + n * 4), flops=2.0 * nnz * n))
    cases.append(Case("spmm_t", f"M={m} K={k} N={n} density={dens:.0%}", I.SpmmTInputs(a, xd),
                      "numpy dense A.T @ dy", lambda: x.T @ xd, bytes=nnz * 6 + nnz * n * 4 + k * n * 4,
                      flops=2.0 * nnz * n))
    d = n
    w_up = (rng.standard_normal((k, d)) / np.sqrt(d)).astype(f32)
    w_down = (rng.standard_normal((k, d)) / np.sqrt(k)).astype(f32)
    xg = rng.standard_normal((m, d)).astype(f32)
    cases.append(Case("gated_ffn", f"M={m} D={d} K={k} density={dens:.0%}", I.GatedFfnInputs(xg, a, w_up, w_down),
                      "numpy dense gated FFN", lambda: (x * (xg @ w_up.T)) @ w_down,
                      bytes=nnz * 2 * d * 4, flops=4.0 * nnz * d))

    b, hq, hkv, hd, s = (4, 32, 8, 128, 32768) if big else (2, 8, 2, 64, 4096)
    sparsity = 50
    kk = rng.standard_normal((b, s, hkv, hd)).astype(f32)
    vv = rng.standard_normal((b, s, hkv, hd)).astype(f32)
    lengths = np.full(b, s, np.int32)
    kv = F.DenseKV(kk, vv, lengths)
    q = rng.standard_normal((b, hq, hd)).astype(f32)
    topk = s // sparsity
    index = ops.select_topk(q, kv, topk, backend="reference")
    kv_bytes = 2.0 * b * s * hkv * hd * 4
    dd = lambda: _np_dense_decode(q, kk, vv, lengths)
    shape = f"B={b} Hq={hq} Hkv={hkv} D={hd} S={s}"
    cases.append(Case("select_topk", f"{shape} k={topk} exact", I.SelectTopkInputs(q, kv, topk),
                      "numpy dense decode", dd, bytes=kv_bytes / 2, flops=2.0 * b * hq * s * hd))
    cases.append(Case("select_topk", f"{shape} k={topk // 16} quest", I.SelectTopkInputs(q, kv, topk // 16,
                      method="quest", page_size=16), "numpy dense decode", dd, bytes=kv_bytes / 2))
    ps = 16
    bounds = ops.page_bounds(kv, ps, backend="reference")
    pages = -(-s // ps)
    kp = np.pad(kk, ((0, 0), (0, pages * ps - s), (0, 0), (0, 0)), mode="edge").reshape(b, pages, ps, hkv, hd)
    cases.append(Case("page_bounds", f"B={b} Hkv={hkv} D={hd} S={s} page={ps} build", I.PageBoundsInputs(kv, ps),
                      "numpy min/max", lambda: (kp.min(axis=2), kp.max(axis=2)), bytes=kv_bytes / 2))
    last = lengths - 1  # a decode step: the page of the newest token of each sequence

    def np_last_page() -> Any:
        return [(kk[i, t // ps * ps:t + 1].min(axis=0), kk[i, t // ps * ps:t + 1].max(axis=0))
                for i, t in enumerate(last)]

    cases.append(Case("page_bounds", f"B={b} Hkv={hkv} D={hd} S={s} page={ps} decode step",
                      I.PageBoundsInputs(kv, None, bounds, last.astype(np.int32)), "numpy min/max of that page",
                      np_last_page, bytes=b * ps * hkv * hd * 4.0))
    cases.append(Case("select_topk", f"{shape} k={topk // 16} quest stored bounds",
                      I.SelectTopkInputs(q, kv, topk // 16, method="quest", bounds=bounds), "numpy dense decode", dd,
                      bytes=2.0 * b * pages * hkv * hd * 4))
    sel_bytes = 2.0 * b * topk * hkv * hd * 4
    cases.append(Case("sparse_decode", f"{shape} {sparsity}x sparse, shared", I.SparseDecodeInputs(q, kv, index),
                      "numpy dense decode", dd, bytes=sel_bytes, flops=4.0 * b * hq * topk * hd))
    cases.append(Case("dense_decode", shape, I.DenseDecodeInputs(q, kv), "numpy dense decode", dd,
                      bytes=kv_bytes, flops=4.0 * b * hq * s * hd))
    o1 = rng.standard_normal((b, hq, hd)).astype(f32)
    o2 = rng.standard_normal((b, hq, hd)).astype(f32)
    l1 = rng.standard_normal((b, hq)).astype(f32)
    l2 = rng.standard_normal((b, hq)).astype(f32)

    def np_merge() -> Any:
        lse = np.logaddexp(l1, l2)
        return o1 * np.exp(l1 - lse)[..., None] + o2 * np.exp(l2 - lse)[..., None], lse

    cases.append(Case("merge_attention", f"B={b} H={hq} D={hd}", I.MergeAttentionInputs(o1, l1, o2, l2),
                      "numpy formula", np_merge, bytes=3.0 * o1.nbytes + 3 * l1.nbytes))
    from .ops.table import TABLE

    for row in TABLE:  # ops declared with an example call and a NumPy peer (their @op row)
        if row.example is not None and row.baseline is not None:
            inp = row.example(rng, "float32")
            name, call = row.baseline(inp)
            shape = ", ".join(f"{n}{list(a.shape)}" for n, a in inp.named_arrays().items())
            cases.append(Case(row.name, f"{shape} (its example call)", inp, name, call,
                              bytes=float(sum(a.nbytes for a in inp.named_arrays().values()))))
    return cases


def _flat(out: Any) -> list[np.ndarray]:
    """Every array of a result, as float64 host arrays (formats: their values in stored order)."""
    if isinstance(out, tuple):
        return [a for o in out for a in _flat(o)]
    if isinstance(out, F.TiledELL | F.CSR):
        return [F.tiled_ell_to_dense(out).astype(np.float64) if isinstance(out, F.TiledELL)
                else F.csr_to_dense(out).astype(np.float64)]
    if isinstance(out, F.TopKIndex):
        return [to_host(out.counts).astype(np.float64)]
    if isinstance(out, F.PageBounds):
        return [to_host(out.kmin).astype(np.float64), to_host(out.kmax).astype(np.float64)]
    return [to_host(out).astype(np.float64)]


def max_error(out: Any, ref: Any) -> float:
    errs = []
    for a, b in zip(_flat(out), _flat(ref)):
        fin = np.isfinite(b)
        errs.append(float(np.max(np.abs(a[fin] - b[fin]), initial=0.0)) if a.shape == b.shape else float("inf"))
    return max(errs, default=0.0)


def check_reference(cases: list[Case]) -> list[str]:
    """The reference against the dense baselines where they compute the same thing."""
    problems = []
    for case in cases:
        if case.op in ("spmm", "spmm_t", "gated_ffn", "dense_decode", "merge_attention", "sddmm"):
            ref_out = ops.select(case.inputs, "reference").apply(case.inputs)
            base = case.baseline()
            ref_first = ref_out[0] if isinstance(ref_out, tuple) else ref_out
            base_first = base[0] if isinstance(base, tuple) else base
            if isinstance(base_first, tuple):
                continue
            err = max_error(ref_first, base_first)
            if not err <= 1e-3 * max(1.0, float(np.max(np.abs(base_first)))):
                problems.append(f"{case.op} {case.shape}: reference differs from {case.baseline_name} by {err:.3g}")
    return problems




# ------------------------------------------------------------------------------------------------
# blocks: one configuration, its implementations


@dataclass
class Impl:
    """One timed implementation of a block. ``against``: the row whose median this row's speedup is
    computed with (default: the block's sparsecore main row, for a peer; none for the main row)."""

    name: str
    fn: Callable[[], Any]
    ours: bool
    check: Callable[[Any], float] | None = None  # result -> max error relative to the reference's scale
    against: str | None = None
    skip: str | None = None  # why it is not timed here (a library missing)


@dataclass
class Block:
    """One configuration. ``make()`` builds its arrays and implementations when the block runs (and
    they are freed after it); ``names`` lists them beforehand, for the progress count."""

    title: str
    params: dict[str, Any]
    names: list[str]
    main: str
    make: Callable[[], list[Impl]]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def _as_f64(out: Any) -> np.ndarray:
    out = _first(out)
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    if hasattr(out, "toarray"):
        out = out.toarray()
    if hasattr(out, "to_dense") and not isinstance(out, np.ndarray):
        out = out.to_dense()
    return np.asarray(to_host(out) if not isinstance(out, np.ndarray) else out, dtype=np.float64)


def rel_error(out: Any, ref: np.ndarray) -> float:
    """max |out - ref| / max(1, max |ref|) over the finite entries of ``ref`` (inf if shapes differ)."""
    a = _as_f64(out).reshape(-1)
    b = np.asarray(ref, np.float64).reshape(-1)
    if a.shape != b.shape:
        return float("inf")
    fin = np.isfinite(b)
    scale = max(1.0, float(np.max(np.abs(b[fin]), initial=0.0)))
    return float(np.max(np.abs(a[fin] - b[fin]), initial=0.0)) / scale


def _checker(ref: np.ndarray) -> Callable[[Any], float]:
    return lambda out: rel_error(out, ref)


#: FFN shapes: (name, K = d_ff, N = d_model): the down projection of a ReLU-gated FFN
FFN_SHAPES: dict[str, tuple[int, int]] = {"SmolLM2-135M": (1536, 576), "2B": (5632, 2048)}
#: decode shapes: (name, B, Hq, Hkv, D)
DECODE_SHAPES: dict[str, tuple[int, int, int, int]] = {"SmolLM2-135M": (1, 9, 3, 64), "Hq32-Hkv8-D128": (1, 32, 8, 128)}
FFN_NAMES = ["sparsecore spmm", "torch dense matmul", "torch sparse CSR @ dense", "SciPy CSR @ dense",
             "NumPy dense matmul", "sparsecore pack + spmm (from dense activations)",
             "sparsecore OpPlan.run (spmm, planned)"]
DECODE_NAMES = ["sparsecore sparse_decode (given the top-k)", "torch gather + SDPA (same keys)", "torch dense SDPA",
                "NumPy dense decode", "sparsecore select_topk exact + sparse_decode",
                "sparsecore select_topk quest + sparse_decode", "sparsecore DecodePlan.run (quest)"]


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _scipy_sparse() -> Any:
    try:
        import scipy.sparse as sp
    except ImportError:
        return None
    return sp


def _ffn_block(shape: str, m: int, density: float, seed: int) -> Block:
    k, n = FFN_SHAPES[shape]
    title = f"spmm {shape} FFN down (K {k}, N {n}), M {m}, density {density:.0%}"

    def make() -> list[Impl]:
        rng = np.random.default_rng([seed, k, m, int(density * 1000)])
        x = _sparse(rng, m, k, density, np.float32)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        a = F.tiled_ell_from_dense(x)
        ref = x.astype(np.float64) @ w.astype(np.float64)
        chk = _checker(ref)
        main = f"sparsecore spmm ({ops.select(I.SpmmInputs(a, w)).NAME})"
        impls = [Impl(main, lambda: ops.spmm(a, w), True, chk)]
        torch, sp = _torch(), _scipy_sparse()
        if torch is not None:
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            xs = xt.to_sparse_csr()
            impls += [Impl(FFN_NAMES[1], lambda: xt @ wt, False, chk),
                      Impl(FFN_NAMES[2], lambda: xs @ wt, False, chk)]
        else:
            impls += [Impl(n_, lambda: None, False, skip="torch is not installed") for n_ in FFN_NAMES[1:3]]
        if sp is not None:
            xc = sp.csr_matrix(x)
            impls.append(Impl(FFN_NAMES[3], lambda: xc @ w, False, chk))
        else:
            impls.append(Impl(FFN_NAMES[3], lambda: None, False, skip="scipy is not installed"))
        impls.append(Impl(FFN_NAMES[4], lambda: x @ w, False, chk))
        against = FFN_NAMES[1] if torch is not None else FFN_NAMES[4]
        impls.append(Impl(FFN_NAMES[5], lambda: ops.spmm(ops.pack(x), w), True, chk, against=against))
        plan = ops.OpPlan("spmm", a, w)  # the decode loop's call: planned once, run per step
        impls.append(Impl(FFN_NAMES[6], lambda: plan.run(a, w), True, chk,
                          against=FFN_NAMES[3] if sp is not None else against))
        return impls

    params = {"family": "ffn", "op": "spmm", "shape": shape, "M": m, "K": k, "N": n, "density": density}
    return Block(title, params, list(FFN_NAMES), "sparsecore spmm", make)


def _decode_block(shape: str, s: int, sparsity: int, seed: int) -> Block:
    b, hq, hkv, d = DECODE_SHAPES[shape]
    k_sel = max(1, s // sparsity)
    title = f"decode {shape} (B {b}, Hq {hq}, Hkv {hkv}, D {d}), context {s}, {sparsity}x sparse (k {k_sel})"

    def make() -> list[Impl]:
        rng = np.random.default_rng([seed, s, hq, d])
        kk = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
        vv = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
        lengths = np.full(b, s, np.int32)
        kv = F.DenseKV(kk, vv, lengths)
        q = rng.standard_normal((b, hq, d)).astype(np.float32)
        index = ops.select_topk(q, kv, k_sel)
        ref_sparse = ops.sparse_decode(q, kv, index, backend="reference")[0]
        ref_dense = _np_dense_decode(q, kk, vv, lengths)
        ps = 16
        bounds = ops.page_bounds(kv, ps)
        k_pages = max(1, k_sel // ps)  # the same token budget, in pages
        q_index = ops.select_topk(q, kv, k_pages, method="quest", bounds=bounds)
        ref_quest = ops.sparse_decode(q, kv, q_index, backend="reference")[0]
        plan = ops.DecodePlan(q, kv, k_pages, method="quest", bounds=bounds)
        main = f"sparsecore sparse_decode ({ops.select(I.SparseDecodeInputs(q, kv, index)).NAME}, given the top-k)"
        impls = [Impl(main, lambda: ops.sparse_decode(q, kv, index), True, _checker(ref_sparse))]
        torch = _torch()
        dense_peer = DECODE_NAMES[2] if torch is not None else DECODE_NAMES[3]
        if torch is not None:
            import torch.nn.functional as tf

            qt = torch.from_numpy(q)[:, :, None, :]
            kt = torch.from_numpy(kk).permute(0, 2, 1, 3).contiguous()  # [B, Hkv, S, D]: torch's layout
            vt = torch.from_numpy(vv).permute(0, 2, 1, 3).contiguous()
            ix = torch.from_numpy(index.indices).long()[..., None].expand(-1, -1, -1, d)

            def sdpa(qq: Any, kk_: Any, vv_: Any) -> Any:
                try:
                    return tf.scaled_dot_product_attention(qq, kk_, vv_, enable_gqa=True)
                except TypeError:  # torch < 2.5: repeat the KV heads
                    g = hq // hkv
                    return tf.scaled_dot_product_attention(qq, kk_.repeat_interleave(g, 1), vv_.repeat_interleave(g, 1))

            impls += [Impl(DECODE_NAMES[1], lambda: sdpa(qt, kt.gather(2, ix), vt.gather(2, ix)), False,
                           _checker(ref_sparse)),
                      Impl(DECODE_NAMES[2], lambda: sdpa(qt, kt, vt), False, _checker(ref_dense))]
        else:
            impls += [Impl(n_, lambda: None, False, skip="torch is not installed") for n_ in DECODE_NAMES[1:3]]
        impls.append(Impl(DECODE_NAMES[3], lambda: _np_dense_decode(q, kk, vv, lengths), False, _checker(ref_dense)))
        impls.append(Impl(DECODE_NAMES[4], lambda: ops.sparse_decode(q, kv, ops.select_topk(q, kv, k_sel)), True,
                          _checker(ref_sparse), against=dense_peer))
        impls.append(Impl(DECODE_NAMES[5], lambda: ops.sparse_decode(
            q, kv, ops.select_topk(q, kv, k_pages, method="quest", bounds=bounds)), True, _checker(ref_quest),
            against=dense_peer))
        impls.append(Impl(DECODE_NAMES[6], lambda: plan.run(q, kv, bounds=bounds), True, _checker(ref_quest),
                          against=dense_peer))
        return impls

    params = {"family": "decode", "op": "sparse_decode", "shape": shape, "B": b, "Hq": hq, "Hkv": hkv, "D": d,
              "context": s, "sparsity": sparsity, "k": k_sel}
    return Block(title, params, list(DECODE_NAMES), "sparsecore sparse_decode", make)


def main_suite(quick: bool = False, families: Sequence[str] = ("ffn", "decode"), seed: int = 0) -> list[Block]:
    """The default suite (see the module docstring); ``quick``: a few blocks of the same kinds, for tests."""
    blocks: list[Block] = []
    ffn_shapes = ["SmolLM2-135M"] if quick else list(FFN_SHAPES)
    ms = (1, 16) if quick else (1, 4, 16, 512)
    densities = (0.01, 0.5) if quick else (0.01, 0.05, 0.5)
    if "ffn" in families:
        blocks += [_ffn_block(sh, m, dens, seed) for sh in ffn_shapes for m in ms for dens in densities]
    dec_shapes = ["SmolLM2-135M"] if quick else list(DECODE_SHAPES)
    contexts = (1024, 2048) if quick else (4096, 8192, 16384, 32768)
    if "decode" in families:
        blocks += [_decode_block(sh, s, 50, seed) for sh in dec_shapes for s in contexts]
    return blocks


def ops_suite(scale: str = "small", backends: Sequence[str] | None = None) -> list[Block]:
    """Every op on every available backend of the inputs' device beside its dense NumPy baseline."""
    blocks = []
    for case in default_suite(scale):
        classes = [c for c in ops.implementations(case.op) if c.DEVICE == case.inputs.device
                   and (not backends or c.NAME in backends or c.BACKEND in backends)]
        if not classes:
            continue
        default = ops.select(case.inputs).NAME
        main_cls = next((c for c in classes if c.NAME == default), classes[0])
        main = f"sparsecore {case.op} ({main_cls.NAME})"
        names = [main, case.baseline_name] + [f"sparsecore {case.op} ({c.NAME})" for c in classes if c is not main_cls]

        def make(case: Case = case, classes: list = classes, main_cls: type = main_cls) -> list[Impl]:
            ref_out = ops.select(case.inputs, "reference").apply(case.inputs)
            chk = lambda out: max_error(out, ref_out)  # noqa: E731
            impls = []
            for c in [main_cls] + [c for c in classes if c is not main_cls]:
                reasons = c.not_supported_reasons(case.inputs)
                impls.append(Impl(f"sparsecore {case.op} ({c.NAME})", lambda c=c: ops.dispatch(case.inputs, c.NAME),
                                  True, None if c.BACKEND == "reference" else chk,
                                  against=None if c is main_cls else case.baseline_name,
                                  skip="; ".join(reasons) or None))
                if c is main_cls:
                    impls.append(Impl(case.baseline_name, case.baseline, False))
            return impls

        params = {"family": "ops", "op": case.op, "shape": case.shape}
        blocks.append(Block(f"{case.op} {case.shape}", params, names, main, make))
    return blocks


# ------------------------------------------------------------------------------------------------
# timing and the table


def repeat(fn: Callable[[], Any], *, min_time: float, min_repeat: int, max_repeat: int) -> list[float]:
    """Seconds of each of at least ``min_repeat`` calls, more until ``min_time`` has passed (at most
    ``max_repeat``)."""
    times: list[float] = []
    min_repeat = max(1, min(min_repeat, max_repeat))
    t_end = time.perf_counter() + min_time
    while len(times) < min_repeat or (time.perf_counter() < t_end and len(times) < max_repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timeit(fn: Callable[[], Any], *, min_time: float = 0.2, max_repeat: int = 50) -> tuple[float, Any]:
    """Median seconds of ``fn`` after one warm-up call (which also returns the result)."""
    out = fn()
    times = repeat(fn, min_time=min_time, min_repeat=3, max_repeat=max_repeat)
    return sorted(times)[len(times) // 2], out


#: a row's relative error above this is a mismatch (float32 accumulation against a float64 reference)
TOLERANCE = 1e-3


def _speed_text(r: dict[str, Any]) -> str:
    s = r.get("speedup")
    if s is None:
        return "sparsecore's row the others are compared with" if r.get("main") else ""
    word = "faster" if s >= 1 else "SLOWER"
    who = "sparsecore" if not r["ours"] else "this"
    text = f"{s:.2f}x: {who} {word}" + (f" than {r['vs']}" if r["ours"] else "")
    if r.get("overlap"):
        text += " (min-max spreads overlap: within noise)"
    return text


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def format_row(r: dict[str, Any], width: int) -> str:
    if "skipped" in r:
        return f"  {r['impl']:<{width}}  skipped: {r['skipped']}"
    if "error" in r:
        return f"  {r['impl']:<{width}}  FAILED: {r['error']}"
    err = "" if r.get("max_err") is None else f"  err {r['max_err']:.1e}" + ("" if r["ok"] else " MISMATCH")
    return (f"  {r['impl']:<{width}}  {_fmt_ms(r['min_ms']):>9} {_fmt_ms(r['median_ms']):>9} "
            f"{_fmt_ms(r['max_ms']):>9}  x{r['repeats']:<3} {_speed_text(r)}{err}")


def block_header(b: Block, width: int) -> str:
    return (f"\n{b.title}\n  {'implementation':<{width}}  {'min ms':>9} {'median ms':>9} {'max ms':>9}  "
            f"{'n':<4} sparsecore speedup (peer median / sparsecore median)")


def run_blocks(blocks: list[Block], *, min_time: float = 0.2, max_repeat: int = 50,
               out: Any = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every block; print each row on ``out`` (stdout) as it finishes, a progress line on stderr."""
    out = out if out is not None else sys.stdout
    total = sum(len(b.names) for b in blocks)
    p = Progress(total, "bench", enabled=progress)
    rows: list[dict[str, Any]] = []
    for bi, b in enumerate(blocks):
        width = max(len(n) for n in b.names) + 12
        p.status(f"block {bi + 1}/{len(blocks)}: preparing the inputs of {b.title}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            impls = b.make()
        width = max([width] + [len(i.name) for i in impls])
        p.clear()
        print(block_header(b, width), file=out, flush=True)
        medians: dict[str, float] = {}
        spans: dict[str, tuple[float, float]] = {}
        main_name = impls[0].name
        for impl in impls:
            p.step(f"{b.title}: {impl.name}")
            row: dict[str, Any] = {**b.params, "block": b.title, "impl": impl.name, "ours": impl.ours,
                                   "main": impl.name == main_name}
            if impl.skip:
                row["skipped"] = impl.skip
            else:
                try:
                    t0 = time.perf_counter()
                    result = impl.fn()  # warm-up: compiles, fills caches; the result is checked
                    first = time.perf_counter() - t0
                    err = impl.check(result) if impl.check else None
                    times = repeat(impl.fn, min_time=min_time, min_repeat=5 if first < 0.25 else 3,
                                   max_repeat=max_repeat)
                except Exception as e:  # noqa: BLE001 - a peer failing on a shape is a row, not the end
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                else:
                    ts = sorted(times)
                    row.update(min_ms=ts[0] * 1e3, median_ms=ts[len(ts) // 2] * 1e3, max_ms=ts[-1] * 1e3,
                               repeats=len(ts), first_call_ms=first * 1e3, max_err=err,
                               ok=err is None or err <= TOLERANCE)
                    medians[impl.name] = row["median_ms"]
                    spans[impl.name] = (row["min_ms"], row["max_ms"])
                    vs = impl.against or (None if impl.name == main_name else main_name)
                    if vs in medians:
                        ours, peer = (impl.name, vs) if impl.ours else (vs, impl.name)
                        row.update(vs=vs, speedup=medians[peer] / medians[ours], slower=medians[peer] < medians[ours],
                                   overlap=spans[ours][0] <= spans[peer][1] and spans[peer][0] <= spans[ours][1])
            rows.append(row)
            p.clear()
            print(format_row(row, width), file=out, flush=True)
    p.done(f"{len(rows)} rows in {len(blocks)} blocks")
    return rows


# ------------------------------------------------------------------------------------------------
# keeping the rows: JSON, CSV, plots

CSV_COLUMNS = ["family", "op", "shape", "M", "K", "N", "density", "B", "Hq", "Hkv", "D", "context", "sparsity", "k",
               "block", "impl", "ours", "main", "min_ms", "median_ms", "max_ms", "repeats", "first_call_ms", "vs",
               "speedup", "slower", "overlap", "max_err", "ok", "skipped", "error"]


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _peer_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a speedup: peers against sparsecore's main row, sparsecore's other rows against a peer."""
    return [r for r in rows if r.get("speedup") is not None]


def _legend_below(fig: Any, axes: Any) -> None:
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(labels) + 1) // 2), 1, 0.95))


def plot(rows: list[dict[str, Any]], outdir: str | Path) -> list[Path]:
    """``speedup_vs_density.png`` (FFN blocks) and ``speedup_vs_context.png`` (decode blocks) in ``outdir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sp = _peer_speedups(rows)

    def label(r: dict[str, Any]) -> str:
        return f"{r['impl']} vs {r['vs']}" if r["ours"] else f"vs {r['impl']}"

    ffn = [r for r in sp if r.get("family") == "ffn"]
    if ffn:
        panels = sorted({(r["shape"], r["M"]) for r in ffn}, key=lambda t: (t[0], t[1]))
        cols = len({m for _, m in panels})
        nrows = len({s for s, _ in panels})
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
        shapes = sorted({s for s, _ in panels})
        msz = sorted({m for _, m in panels})
        for (shape, m) in panels:
            ax = axes[shapes.index(shape)][msz.index(m)]
            for lab in sorted({label(r) for r in ffn}):
                pts = sorted((r["density"], r["speedup"]) for r in ffn if r["shape"] == shape and r["M"] == m
                             and label(r) == lab)
                if pts:
                    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=lab)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{shape}, M {m}", fontsize=9)
            ax.set_xlabel("density of A (%)")
            ax.set_ylabel("sparsecore speedup (> 1: faster)")
        _legend_below(fig, axes)
        fig.suptitle("spmm: sparsecore speedup over each peer versus density", fontsize=10)
        path = outdir / "speedup_vs_density.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    dec = [r for r in sp if r.get("family") == "decode"]
    if dec:
        shapes = sorted({r["shape"] for r in dec})
        fig, axes = plt.subplots(1, len(shapes), figsize=(6.0 * len(shapes), 4.0), squeeze=False, sharey=True)
        for j, shape in enumerate(shapes):
            ax = axes[0][j]
            for lab in sorted({label(r) for r in dec}):
                pts = sorted((r["context"], r["speedup"]) for r in dec if r["shape"] == shape and label(r) == lab)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(shape, fontsize=9)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("sparsecore speedup (> 1: faster)")
        _legend_below(fig, axes)
        fig.suptitle("decode at 50x sparsity: sparsecore speedup versus context", fontsize=10)
        path = outdir / "speedup_vs_context.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"host": host(), "gpus": gpus(), "versions": library_versions(), "commit": git_commit(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
    numba = sys.modules.get("numba")
    if numba is not None:
        env["numba_threads"] = numba.get_num_threads()
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Lines: per family, how many comparisons sparsecore wins and loses (by median)."""
    lines = []
    for fam in ("ffn", "decode", "ops"):
        sp = [r for r in _peer_speedups(rows) if r.get("family") == fam]
        if not sp:
            continue
        wins = sum(not r["slower"] for r in sp)
        noisy = sum(bool(r.get("overlap")) for r in sp)
        lines.append(f"{fam}: sparsecore faster in {wins} of {len(sp)} comparisons, slower in {len(sp) - wins} "
                     f"({noisy} within noise: min-max spreads overlap)")
    return lines


def main(suite: str = "main", *, quick: bool = False, scale: str = "small", json_path: str | None = None,
         csv_path: str | None = None, plot_dir: str | None = None, backends: list[str] | None = None,
         families: Sequence[str] = ("ffn", "decode"), min_time: float | None = None, max_repeat: int = 50,
         progress: bool = True) -> int:
    t_start = time.perf_counter()
    if min_time is None:
        min_time = 0.02 if quick else 0.2
    if quick:
        max_repeat = min(max_repeat, 5)
    if suite not in ("main", "ops"):
        raise ValueError(f"bench: suite = {suite!r} is not allowed; allowed: main, ops")
    blocks = main_suite(quick, families) if suite == "main" else ops_suite("small" if quick else scale, backends)
    n = sum(len(b.names) for b in blocks)
    if progress:
        print(f"bench: {suite} suite{' (quick)' if quick else ''}: {n} rows in {len(blocks)} blocks; rows print on "
              "stdout as they finish, progress here", file=sys.stderr, flush=True)
    try:
        from .warmup import install_compile_notice

        install_compile_notice()  # a first call that compiles says so
    except Exception:  # noqa: BLE001 - the notice is a courtesy
        pass
    problems = check_reference(default_suite(scale)) if suite == "ops" else []
    h = host()
    print(f"sparsecore bench, {suite} suite{' (quick)' if quick else ''}, on {h['cpu']}, {h['cores']} cores; GPUs: "
          f"{', '.join(gpus()) or 'none'}. Medians of repeated calls with their min and max; on a loaded machine "
          "compare the spreads, not one number.", flush=True)
    rows = run_blocks(blocks, min_time=min_time, max_repeat=max_repeat, progress=progress)
    env = environment()
    for r in rows:
        if r.get("ok") is False:
            problems.append(f"{r['block']}: {r['impl']}: relative error {r['max_err']:.3g} against the reference")
    print()
    for line in summary(rows):
        print(line)
    for pr in problems:
        print("MISMATCH:", pr)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"environment": env, "suite": suite, "quick": quick, "min_time": min_time, "rows": rows,
                       "problems": problems}, f, indent=1, default=float)
        print(f"wrote {json_path}")
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    if plot_dir:
        for path in plot(rows, plot_dir):
            print(f"wrote {path}")
    print(f"bench: {time.perf_counter() - t_start:.1f} s", file=sys.stderr)
    return 1 if problems else 0


__all__ = ["Case", "Block", "Impl", "default_suite", "main_suite", "ops_suite", "run_blocks", "main", "timeit",
           "repeat", "plot", "write_csv", "rel_error"]
