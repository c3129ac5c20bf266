"""Execution plans: run the last position's decode step on only the units a probe found, with sparsecore's ops.

An :class:`ExecutionPlan` keeps, for the decode step of the LAST prompt position, a subset of

- attention heads ``heads_kept[L, H]``: a dropped head outputs 0 (as if its gate were 0);
- FFN channel blocks ``ffn_blocks_kept[L, nb]`` of ``ffn_block_size`` hidden channels: a dropped block's
  gate rows are never computed and its channels contribute nothing;
- prompt tokens ``tokens_kept[T]``: the kept heads attend to the kept tokens only (the last token is always
  kept). Unlike the Tracer's token gate (which zeroes weights after the softmax without renormalising),
  the sparse kernel renormalises the softmax over the kept tokens: that is what a sparse decode computes.

:func:`run_plan` runs positions ``0 .. T-2`` densely with the Hugging Face model (``use_cache=True``) to get
the KV cache, then computes the last position's step itself, layer by layer, from the model's own weights,
norms and rotary embedding::

    h = embed(ids[T-1])
    for each layer:
        a = input_layernorm(h); q, k, v = rope(q_proj(a), k_proj(a)), v_proj(a)
        K, V = cat(cache_k, k), cat(cache_v, v)                          # [Hkv, T, D]
        index[h] = tokens_kept if heads_kept[l, h] else {}                # TopKIndex, one row per query head
        o = sparse_decode(q, DenseKV(K, V), index, scale=attn.scaling)   # an empty row gives o = 0
        h = h + o_proj(o)
        b = post_attention_layernorm(h); C = kept channels
        g = pack(b @ W_gate[C].T, activation="relu")                     # TiledELL of the ReLU gate
        h = h + gated_ffn(b, g, W_up[C], W_down[:, C].T)
    logits = lm_head(norm(h))

The model must be LLaMA-style with a ReLU-gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``
ReLU, no biases); anything else is refused with a message. The "full plan" (everything kept) must
reproduce the Hugging Face model's next-token distribution within float tolerance: it checks the decode
step, and :func:`run_plan` reports its TV distance.

Timings are medians over repeats of one decode step each: the Hugging Face model with its cache, the full
plan and the given plan. Be careful reading them on a tiny CPU model: there each step is a few dozen small
calls and the time is dominated by per-call overhead (Python, dispatch, argument checks, format
construction), not by the arithmetic the plan removes; a plan only pays off where the skipped work is large
(wide FFNs, long contexts) and on the backends the ops are built for.

A trap on a small CPU box: once numba_cpu has run a parallel kernel under its OpenMP threading layer, its
worker threads busy-wait after each kernel and compete with torch for the cores; on a 2-core machine the
Hugging Face step then measured ~30x slower (1 ms -> 30 ms) and the torch parts of the plans slow down too.
Start the process with ``OMP_WAIT_POLICY=PASSIVE`` (or ``NUMBA_THREADING_LAYER=workqueue``) for timings
that mean something; :func:`run_plan` adds a ``"timing_note"`` to its result when it sees that setup.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import sparsecore as sc

from .._checks import fail
from ..models import cache_kwargs, output_cache
from .hooks import layers_of, model_dims
from .probe import ProbeResult

__all__ = ["ExecutionPlan", "run_plan", "run_plans", "next_token_compare"]


@dataclass
class ExecutionPlan:
    """Which units the last position's decode step runs (see the module docstring)."""

    heads_kept: np.ndarray          # [L, H] bool
    ffn_blocks_kept: np.ndarray     # [L, nb] bool
    tokens_kept: np.ndarray         # [T] bool (the last token is always kept)
    ffn_block_size: int

    def __post_init__(self) -> None:
        w = "ExecutionPlan"
        self.heads_kept = np.asarray(self.heads_kept, dtype=bool)
        self.ffn_blocks_kept = np.asarray(self.ffn_blocks_kept, dtype=bool)
        self.tokens_kept = np.asarray(self.tokens_kept, dtype=bool).copy()
        if self.heads_kept.ndim != 2:
            fail(w, f"heads_kept has shape {self.heads_kept.shape}; expected [layers, heads]")
        if self.ffn_blocks_kept.ndim != 2 or self.ffn_blocks_kept.shape[0] != self.heads_kept.shape[0]:
            fail(w, f"ffn_blocks_kept has shape {self.ffn_blocks_kept.shape}; expected [layers = "
                    f"{self.heads_kept.shape[0]}, n_blocks]")
        if self.tokens_kept.ndim != 1 or self.tokens_kept.size < 1:
            fail(w, f"tokens_kept has shape {self.tokens_kept.shape}; expected [T] with T >= 1")
        if isinstance(self.ffn_block_size, bool) or not isinstance(self.ffn_block_size, (int, np.integer)) \
                or self.ffn_block_size < 1:
            fail(w, f"ffn_block_size = {self.ffn_block_size!r}; must be an int >= 1")
        self.tokens_kept[-1] = True

    @classmethod
    def full(cls, model: Any, n_tokens: int, ffn_block_size: int = 64) -> ExecutionPlan:
        """Everything kept: must reproduce the model."""
        d = model_dims(model)
        return cls(np.ones((d["layers"], d["heads"]), bool), np.ones((d["layers"], _n_blocks(d, ffn_block_size)), bool),
                   np.ones(n_tokens, bool), ffn_block_size)

    @classmethod
    def empty(cls, model: Any, n_tokens: int, ffn_block_size: int = 64) -> ExecutionPlan:
        """Nothing kept but the last token (every head and FFN block dropped): embeddings straight to the head."""
        d = model_dims(model)
        return cls(np.zeros((d["layers"], d["heads"]), bool),
                   np.zeros((d["layers"], _n_blocks(d, ffn_block_size)), bool), np.zeros(n_tokens, bool),
                   ffn_block_size)

    @classmethod
    def from_probe(cls, result: ProbeResult, *, count: int | dict[str, int] | None = None,
                   mass: float | None = None, which: str = "x", sink: int = 0) -> ExecutionPlan:
        """Keep the top units of each probed kind by ``|x|`` (``which="gradient"`` or ``"knockout"``: by that
        vector instead). Exactly one of:

        - ``count``: keep that many per kind (an int for every kind, or ``{kind: n}``; ``n`` is clamped to
          the kind's size; ties go to the lower index);
        - ``mass``: ``0 <= mass <= 1``, keep per kind the fewest units whose ``|x|`` sum reaches ``mass`` of
          the kind's total (none when the total is 0).

        Kinds the probe did not cover are kept whole. The last token is always kept, and so are the first
        ``sink`` tokens (the attention sink: the probe's token gate scales attention weights without
        renormalising, where the sink's small values make its gate look unimportant, but the plan's sparse
        decode renormalises over the kept tokens, where dropping the sink moves most of the attention).
        """
        w = "ExecutionPlan.from_probe"
        if (count is None) == (mass is None):
            fail(w, f"give exactly one of count and mass; got count = {count!r}, mass = {mass!r}")
        if mass is not None and (isinstance(mass, bool) or not isinstance(mass, (int, float))
                                 or not 0.0 <= float(mass) <= 1.0):
            fail(w, f"mass = {mass!r}; must be a fraction 0 <= mass <= 1")
        if which not in ("x", "gradient", "knockout"):
            fail(w, f"which = {which!r}; allowed: 'x', 'gradient', 'knockout'")
        d = result.dims
        shapes = {"head": (d["layers"], d["heads"]), "ffn_block": (d["layers"], d["n_blocks"]), "token": (d["tokens"],)}
        kept = {kind: np.ones(shape, bool) for kind, shape in shapes.items()}
        for kind in dict.fromkeys(result.kinds):
            score = np.abs(result.values(kind, which)).reshape(-1)
            order = np.argsort(-score, kind="stable")
            if count is not None:
                n = count.get(kind, score.size) if isinstance(count, dict) else count
                if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                    fail(w, f"count for {kind!r} = {n!r}; must be an int >= 0")
                n = min(int(n), score.size)
            else:
                total = float(score.sum())
                if total <= 0 or mass == 0:
                    n = 0
                else:
                    csum = np.cumsum(score[order])
                    n = int(np.searchsorted(csum, float(mass) * total * (1 - 1e-12)) + 1)
                    n = min(n, score.size)
            k = np.zeros(score.size, bool)
            k[order[:n]] = True
            kept[kind] = k.reshape(shapes[kind])
        if isinstance(sink, bool) or not isinstance(sink, (int, np.integer)) or sink < 0:
            fail(w, f"sink = {sink!r}; must be an int >= 0")
        kept["token"][:int(sink)] = True
        return cls(kept["head"], kept["ffn_block"], kept["token"], int(d["ffn_block_size"]))

    def fractions(self) -> dict[str, float]:
        return {"heads": float(self.heads_kept.mean()), "ffn_blocks": float(self.ffn_blocks_kept.mean()),
                "tokens": float(self.tokens_kept.mean())}

    def to_json(self) -> dict[str, Any]:
        return {"heads_kept": self.heads_kept.tolist(), "ffn_blocks_kept": self.ffn_blocks_kept.tolist(),
                "tokens_kept": self.tokens_kept.tolist(), "ffn_block_size": int(self.ffn_block_size),
                "fractions": self.fractions()}


def _n_blocks(d: dict[str, int], bs: int) -> int:
    if d["ffn"] <= 0 or d["ffn"] % bs:
        fail("ExecutionPlan", f"ffn_block_size = {bs} does not divide the FFN width {d['ffn']}")
    return d["ffn"] // bs


# --------------------------------------------------------------------------------------------------
# the decode step
# --------------------------------------------------------------------------------------------------

def _is_silu(act: Any) -> bool:
    """torch's SiLU or transformers' own SiLU module (``hidden_act="silu"`` builds the latter)."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _check_relu_mlp(model: Any) -> None:
    for i, layer in enumerate(layers_of(model)):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name, None)
            if not isinstance(lin, torch.nn.Linear):
                fail("run_plan", f"layer {i}'s mlp ({type(mlp).__name__}) has no nn.Linear {name}; only a "
                                 "LLaMA-style gated MLP (gate_proj, up_proj, down_proj) can run on gated_ffn")
            if lin.bias is not None:
                fail("run_plan", f"layer {i}'s mlp.{name} has a bias; only bias-free MLPs are supported")
        if not (isinstance(getattr(mlp, "act_fn", None), torch.nn.ReLU) or _is_silu(getattr(mlp, "act_fn", None))):
            fail("run_plan", f"layer {i}'s mlp.act_fn is {type(getattr(mlp, 'act_fn', None)).__name__}; run_plan "
                             "needs a ReLU- or SiLU-gated MLP (hidden_act 'relu' or 'silu')")
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
            if not hasattr(attn, name):
                fail("run_plan", f"layer {i}'s self_attn has no {name}; expected a LLaMA-style attention layer")
        if hasattr(attn, "q_norm") or getattr(attn.q_proj, "bias", None) is not None:
            fail("run_plan", f"layer {i}'s attention has q/k norms or projection biases; only LLaMA-style "
                             "attention (bias-free projections, no q/k norms) is supported")


class _Step:
    """The last position's decode step under one plan, with the plan's weight slices prepared once."""

    def __init__(self, model: Any, plan: ExecutionPlan, n_tokens: int, tile: int) -> None:
        self.model = model
        self.layers = layers_of(model)
        d = model_dims(model)
        self.h, self.hkv, self.dh = d["heads"], d["kv_heads"], d["head_dim"]
        self.group = self.h // self.hkv
        self.n_tokens = n_tokens
        self.tile = tile
        dev = model.lm_head.weight.device
        toks = np.flatnonzero(plan.tokens_kept).astype(np.int32)
        bs = plan.ffn_block_size
        self.attn_idx: list[Any] = []
        self.head_w: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        self.ffn_w: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None] = []
        for i, layer in enumerate(self.layers):
            heads = plan.heads_kept[i]
            if not heads.any():
                self.attn_idx.append(None)
            else:
                # the cache is read as Hkv sequences of one KV head each; row (g, j) is query head g * group + j
                idx = np.full((self.hkv, self.group, toks.size), -1, np.int32)
                cnt = np.zeros((self.hkv, self.group), np.int32)
                hk = heads.reshape(self.hkv, self.group)
                idx[hk] = toks
                cnt[hk] = toks.size
                self.attn_idx.append(sc.TopKIndex(torch.from_numpy(idx).to(dev), torch.from_numpy(cnt).to(dev)))
            # the kept heads' rows of q_proj and columns of o_proj (a dropped head's query and output are
            # never computed); None: every head is kept, use the layer's own projections
            if heads.any() and not heads.all():
                at = layer.self_attn
                hsel = torch.from_numpy(np.flatnonzero(heads)).to(dev)
                with torch.no_grad():
                    wq = at.q_proj.weight.view(self.h, self.dh, -1)[hsel].reshape(-1, at.q_proj.weight.shape[1])
                    wo = at.o_proj.weight.view(at.o_proj.weight.shape[0], self.h, self.dh)[:, hsel]
                    self.head_w.append((hsel, wq.contiguous(), wo.reshape(wo.shape[0], -1).contiguous()))
            else:
                self.head_w.append(None)
            blocks = plan.ffn_blocks_kept[i]
            if not blocks.any():
                self.ffn_w.append(None)
                continue
            ch = torch.from_numpy(np.flatnonzero(np.repeat(blocks, bs))).to(dev)
            mlp = layer.mlp
            with torch.no_grad():
                if _is_silu(mlp.act_fn):
                    # gate and up rows of the kept channels stacked: one matmul for both
                    self.ffn_w.append((torch.cat([mlp.gate_proj.weight[ch], mlp.up_proj.weight[ch]]).contiguous(),
                                       None, mlp.down_proj.weight[:, ch].contiguous()))
                else:
                    self.ffn_w.append((mlp.gate_proj.weight[ch].contiguous(), mlp.up_proj.weight[ch].contiguous(),
                                       mlp.down_proj.weight[:, ch].t().contiguous()))
        self.rope: list[Callable[..., Any]] = [sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
                                               for layer in self.layers]

    @torch.no_grad()
    def __call__(self, cache: Any, last_id: torch.Tensor) -> torch.Tensor:
        """Logits [V] (float32) of the last position from the prefill cache (not modified)."""
        model = self.model
        inner = model.model
        h = inner.embed_tokens(last_id.reshape(1, 1))                              # [1, 1, d]
        pos = torch.full((1, 1), self.n_tokens - 1, dtype=torch.long, device=h.device)
        cos, sin = inner.rotary_emb(h, pos)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            index = self.attn_idx[i]
            if index is not None:
                a = layer.input_layernorm(h)
                hw = self.head_w[i]
                if hw is None:
                    q = attn.q_proj(a).view(1, 1, self.h, self.dh).transpose(1, 2)
                else:
                    q = a.new_zeros(1, self.h, 1, self.dh)
                    q[0, hw[0], 0] = torch.nn.functional.linear(a, hw[1]).view(-1, self.dh)
                k = attn.k_proj(a).view(1, 1, self.hkv, self.dh).transpose(1, 2)
                v = attn.v_proj(a).view(1, 1, self.hkv, self.dh).transpose(1, 2)
                q, k = self.rope[i](q, k, cos, sin)
                lay = cache.layers[i]
                keys = torch.cat([lay.keys[:1], k], dim=2)                         # [1, Hkv, T, D], contiguous
                vals = torch.cat([lay.values[:1], v], dim=2)
                kv = sc.DenseKV(keys.reshape(self.hkv, self.n_tokens, 1, self.dh),
                                vals.reshape(self.hkv, self.n_tokens, 1, self.dh),
                                torch.full((self.hkv,), self.n_tokens, dtype=torch.int32, device=h.device))
                qq = q.reshape(self.hkv, self.group, self.dh).contiguous()
                out, _ = sc.sparse_decode(qq, kv, index, scale=attn.scaling)       # [Hkv, group, D]
                if hw is None:
                    h = h + attn.o_proj(out.reshape(1, 1, self.h * self.dh))
                else:
                    h = h + torch.nn.functional.linear(out.reshape(self.h, self.dh)[hw[0]].reshape(1, 1, -1), hw[2])
            wts = self.ffn_w[i]
            if wts is not None:
                b = layer.post_attention_layernorm(h).reshape(1, -1)
                w_gate, w_up, w_down = wts
                if w_up is None:
                    # SiLU has no zeros to skip: the plan's sparsity is the channel slice itself (dense
                    # matmuls on the kept rows / columns of the weights)
                    gu = torch.nn.functional.linear(b, w_gate)
                    g, u = gu.chunk(2, dim=-1)
                    h = h + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w_down).reshape(1, 1, -1)
                else:
                    gate = sc.pack(b @ w_gate.t(), activation="relu", tile=self.tile)
                    h = h + sc.gated_ffn(b, gate, w_up, w_down).reshape(1, 1, -1)
        return model.lm_head(inner.norm(h))[0, 0].float()


def next_token_compare(logits_ref: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """``{"tv": 0.5 * sum|p - p_ref|, "top1": argmax agrees}`` of two next-token logit vectors ``[V]``."""
    p_ref = torch.softmax(logits_ref.double(), -1)
    p = torch.softmax(logits.double(), -1)
    return {"tv": float(0.5 * (p - p_ref).abs().sum()), "top1": float(int(p.argmax()) == int(p_ref.argmax()))}


def _timing_note() -> str | None:
    """A warning when numba's OpenMP workers may be spinning against torch (see the module docstring)."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return None
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    try:
        layer = numba.threading_layer()
    except Exception:                                        # no parallel numba kernel has run
        return None
    if layer != "omp":
        return None
    return ("numba's OpenMP threading layer is active without OMP_WAIT_POLICY=PASSIVE: its spinning workers can "
            "slow torch (the HF step most) on few cores; rerun with OMP_WAIT_POLICY=PASSIVE for fair timings")


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()                                                     # warm-up (first-call dispatch, allocations)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def run_plan(model: Any, input_ids: torch.Tensor, plan: ExecutionPlan, *, repeats: int = 5,
             tile: int | None = None) -> dict[str, Any]:
    """Run ``plan`` for the last position of ``input_ids`` (``[T]`` or ``[1, T]``, ``T >= 2``) and compare it
    with the model; see the module docstring. ``tile``: the TiledELL tile of the packed gate (default: the
    smallest power of two >= the FFN width, at most 256).

    Returns ``{"tv", "top1"}`` of the plan and ``{"full_tv", "full_top1"}`` of the full plan against the
    model's own next-token distribution (a full forward without cache), ``"time_hf_s"`` (the model's decode
    step with its cache), ``"time_full_s"``, ``"time_plan_s"`` (medians of ``repeats``), ``"kept"`` (fractions
    of heads, FFN blocks and tokens), ``"predicted"`` (the model's top-1), ``"plan_predicted"`` and
    ``"timing_note"`` (None, or why the timings may be distorted; see the module docstring).
    """
    w = "run_plan"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        fail(w, f"input_ids must be an integer torch tensor [T] or [1, T], got {type(input_ids).__name__}")
    if input_ids.ndim not in (1, 2) or (input_ids.ndim == 2 and input_ids.shape[0] != 1):
        fail(w, f"input_ids has shape {tuple(input_ids.shape)}; expected [T] or [1, T] (one prompt)")
    if not isinstance(plan, ExecutionPlan):
        fail(w, f"plan must be an ExecutionPlan, got {type(plan).__name__}", TypeError)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        fail(w, f"repeats = {repeats!r}; must be an int >= 1")
    ids = input_ids.reshape(1, -1).long()
    n = int(ids.shape[1])
    if n < 2:
        fail(w, f"input_ids has {n} token; the plan runs the last position's decode step after a prefill of the "
                "others, so T >= 2")
    _check_relu_mlp(model)
    d = model_dims(model)
    if plan.heads_kept.shape != (d["layers"], d["heads"]):
        fail(w, f"plan.heads_kept has shape {plan.heads_kept.shape}; the model has {(d['layers'], d['heads'])}")
    if d["ffn"] != plan.ffn_blocks_kept.shape[1] * plan.ffn_block_size:
        fail(w, f"plan.ffn_blocks_kept has {plan.ffn_blocks_kept.shape[1]} blocks of {plan.ffn_block_size}; the "
                f"model's FFN has {d['ffn']} channels")
    if plan.tokens_kept.shape != (n,):
        fail(w, f"plan.tokens_kept has shape {plan.tokens_kept.shape}; input_ids has {n} tokens")
    if tile is None:
        tile = min(256, 1 << max(1, (d["ffn"] - 1).bit_length()))
    was_training = model.training
    model.eval()
    try:
        ref, cache, last, hf_step = _reference_and_step(model, ids)

        full_step = _Step(model, ExecutionPlan.full(model, n, plan.ffn_block_size), n, tile)
        step = _Step(model, plan, n, tile)
        hf_logits = hf_step()
        full_logits = full_step(cache, last)
        plan_logits = step(cache, last)
        t_hf = _median_time(hf_step, repeats)
        t_full = _median_time(lambda: full_step(cache, last), repeats)
        t_plan = _median_time(lambda: step(cache, last), repeats)
    finally:
        model.train(was_training)
    full = next_token_compare(ref, full_logits)
    sparse = next_token_compare(ref, plan_logits)
    return {"tv": sparse["tv"], "top1": sparse["top1"], "full_tv": full["tv"], "full_top1": full["top1"],
            "hf_cache_tv": next_token_compare(ref, hf_logits)["tv"], "time_hf_s": t_hf, "time_full_s": t_full,
            "time_plan_s": t_plan, "kept": plan.fractions(), "predicted": int(ref.argmax()),
            "plan_predicted": int(plan_logits.argmax()), "repeats": repeats, "timing_note": _timing_note()}


def _reference_and_step(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor, Any]:
    """``(ref, cache, last, hf_step)``: the full forward's last logits, the prefill cache of all but the
    last token, that token, and transformers' own decode step of it (which drops the step it appended)."""
    ref = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    cache = output_cache(model(input_ids=ids[:, :-1], use_cache=True))
    last = ids[:, -1:]

    def hf_step() -> torch.Tensor:
        out = model(input_ids=last, use_cache=True, **cache_kwargs(model, cache)).logits[0, -1].float()
        cache.crop(-1)  # drop the step just appended
        return out

    return ref, cache, last, hf_step


@torch.no_grad()
def run_plans(model: Any, input_ids: torch.Tensor, plans: list[ExecutionPlan], *, target: int | None = None,
              repeats: int = 5, tile: int | None = None) -> dict[str, Any]:
    """:func:`run_plan` for several plans of one prompt, sharing the reference forward, the prefill cache and
    the dense timings. ``target``: the text's real next token; each result then has ``"loss"`` (``-log p`` of
    it under the plan) and the reference has ``"loss"`` under the model.

    Returns ``{"ref": {"time_hf_s", "time_full_s", "full_tv", "predicted", "loss"?, "timing_note"},
    "plans": [{"tv", "top1", "time_plan_s", "kept", "plan_predicted", "loss"?}, ...]}``.
    """
    w = "run_plans"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        fail(w, f"input_ids must be an integer torch tensor [T] or [1, T], got {type(input_ids).__name__}")
    ids = input_ids.reshape(1, -1).long()
    n = int(ids.shape[1])
    if n < 2:
        fail(w, f"input_ids has {n} token; T >= 2 is needed (prefill, then the decode step)")
    if not isinstance(plans, list) or not all(isinstance(p, ExecutionPlan) for p in plans):
        fail(w, "plans must be a list of ExecutionPlan", TypeError)
    _check_relu_mlp(model)
    d = model_dims(model)
    for p in plans:
        if p.heads_kept.shape != (d["layers"], d["heads"]) or p.tokens_kept.shape != (n,) \
                or d["ffn"] != p.ffn_blocks_kept.shape[1] * p.ffn_block_size:
            fail(w, "a plan's shapes do not match the model and the prompt")
    if tile is None:
        tile = min(256, 1 << max(1, (d["ffn"] - 1).bit_length()))
    bs = plans[0].ffn_block_size if plans else d["ffn"]
    was_training = model.training
    model.eval()

    def loss(logits: torch.Tensor) -> float:
        return float(-torch.log_softmax(logits.double(), -1)[int(target)])

    try:
        ref, cache, last, hf_step = _reference_and_step(model, ids)

        full_step = _Step(model, ExecutionPlan.full(model, n, bs), n, tile)
        full_logits = full_step(cache, last)
        out_ref: dict[str, Any] = {"time_hf_s": _median_time(hf_step, repeats),
                                   "time_full_s": _median_time(lambda: full_step(cache, last), repeats),
                                   "full_tv": next_token_compare(ref, full_logits)["tv"],
                                   "predicted": int(ref.argmax()), "repeats": repeats, "timing_note": _timing_note()}
        if target is not None:
            out_ref["loss"] = loss(ref)
        results = []
        for p in plans:
            step = _Step(model, p, n, tile)
            logits = step(cache, last)
            r = next_token_compare(ref, logits)
            r.update(time_plan_s=_median_time(lambda step=step: step(cache, last), repeats), kept=p.fractions(),
                     plan_predicted=int(logits.argmax()))
            if target is not None:
                r["loss"] = loss(logits)
            results.append(r)
    finally:
        model.train(was_training)
    return {"ref": out_ref, "plans": results}
