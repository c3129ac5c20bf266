"""``nn.Module`` building blocks that run on sparsecore's ops.

- :class:`SparseGatedMLP`: a drop-in for a LLaMA-style MLP (``gate_proj``, ``up_proj``, ``down_proj``
  with the same names and shapes as ``transformers``' ``LlamaMLP``, so state dicts load) with a ReLU
  gate whose activations are packed (TiledELL) and consumed by the fused up+down projection
  :func:`sparsecore.torch.functional.relu_gated_ffn`. It keeps the L1 penalty of its last forward for
  the training loop (``.last_l1``) and running activation-density statistics.
- :class:`TopKDecodeAttention`: wraps a LLaMA-style attention layer; prefill (and anything that is
  not a one-token decode step with a cache) runs the original layer, each decode step selects top-k
  keys with :func:`sparsecore.select_topk` and attends to them only with
  :func:`sparsecore.sparse_decode`, reading the cache in place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sparsecore as sc

__all__ = ["SparseGatedMLP", "TopKDecodeAttention", "total_l1", "ffn_sparsity_stats"]


def _functional() -> Any:
    # imported lazily: sparsecore.torch's __init__ imports this module's package siblings
    from . import functional

    return functional


def _nnz(packed: Any) -> torch.Tensor:
    """Stored entries of a packed TiledELL (slots and overflow), as a 0-d int64 tensor."""
    if hasattr(packed, "nnz"):
        return packed.nnz()
    n = packed.counts.sum(dtype=torch.int64)
    ov = getattr(packed, "overflow", None)
    if ov is not None:
        n = n + ov.indptr[-1].to(torch.int64)
    return n


class SparseGatedMLP(nn.Module):
    """``down_proj(relu(gate_proj(x)) * up_proj(x))`` over the gate's non-zeros only.

    Parameters have LlamaMLP's names and shapes: ``gate_proj.weight[K, D]``, ``up_proj.weight[K, D]``,
    ``down_proj.weight[N, K]`` (``N = D`` for LLaMA); no biases. Inputs are ``[..., D]``.

    After each forward:

    - ``last_l1``: the differentiable L1 penalty of the hidden activations
      (:func:`sparsecore.torch.functional.l1_penalty` of the packed gate); add ``coef * last_l1`` to
      the loss (or use :func:`total_l1` over a model).
    - ``last_density``: the fraction of non-zero hidden activations in that forward (0-d tensor);
      ``density``: its running mean over every token since construction or :meth:`reset_stats`;
      ``sparsity = 1 - density``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, out_size: int | None = None, *, tile: int = 256,
                 capacity: int | None = None, threshold: float = 0.0, device: Any = None, dtype: Any = None
                 ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.out_size = self.hidden_size if out_size is None else int(out_size)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False, **kw)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False, **kw)
        self.down_proj = nn.Linear(self.intermediate_size, self.out_size, bias=False, **kw)
        self.tile = int(tile)
        self.capacity = capacity
        self.threshold = float(threshold)
        self.last_l1: torch.Tensor | None = None
        self.last_density: torch.Tensor | None = None
        self.register_buffer("_nnz_total", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("_slots_total", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self._w_down_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_dense(cls, mlp: nn.Module, *, tile: int = 256, capacity: int | None = None, threshold: float = 0.0
                   ) -> SparseGatedMLP:
        """A SparseGatedMLP that shares ``mlp``'s projection modules (no copy). The activation becomes
        ReLU whatever ``mlp.act_fn`` was: exact for a ReLU-gated model, an approximation to be
        fine-tuned otherwise."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name, None)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"SparseGatedMLP.from_dense: mlp.{name} is {type(lin).__name__}; "
                                "expected an nn.Linear (a LLaMA-style MLP)")
            if lin.bias is not None:
                raise ValueError(f"SparseGatedMLP.from_dense: mlp.{name} has a bias; only bias-free MLPs "
                                 "(mlp_bias=False) are supported")
        w = mlp.gate_proj.weight
        new = cls(mlp.gate_proj.in_features, mlp.gate_proj.out_features, mlp.down_proj.out_features, tile=tile,
                  capacity=capacity, threshold=threshold, device="meta", dtype=w.dtype)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        new._nnz_total = torch.zeros((), dtype=torch.float64, device=w.device)
        new._slots_total = torch.zeros((), dtype=torch.float64, device=w.device)
        return new.train(mlp.training)

    def _w_down(self) -> torch.Tensor:
        """``down_proj.weight.T`` ``[K, N]``: a differentiable view when autograd needs it, otherwise a
        contiguous copy kept until the weight changes (the kernels gather its rows)."""
        w = self.down_proj.weight
        if torch.is_grad_enabled() and w.requires_grad:
            self._w_down_cache = None
            return w.t()
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._w_down_cache is None or self._w_down_cache[0] != key:
            self._w_down_cache = (key, w.detach().t().contiguous())
        return self._w_down_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"SparseGatedMLP: x has shape {tuple(x.shape)}; expected [..., {self.hidden_size}]")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)
        f = _functional()
        out, packed = f.relu_gated_ffn(x2, self.gate_proj.weight, self.up_proj.weight, self._w_down(),
                                       tile=self.tile, capacity=self.capacity, threshold=self.threshold)
        self.last_l1 = f.l1_penalty(packed)
        with torch.no_grad():
            nnz = _nnz(packed).to(torch.float64)
            slots = float(x2.shape[0] * self.intermediate_size)
            self.last_density = nnz / slots if slots else torch.zeros((), dtype=torch.float64)
            self._nnz_total += nnz.to(self._nnz_total.device)
            self._slots_total += slots
        return out.reshape(*lead, self.out_size)

    @property
    def density(self) -> torch.Tensor:
        """Running mean fraction of non-zero hidden activations (token-weighted)."""
        return self._nnz_total / self._slots_total.clamp_min(1.0)

    @property
    def sparsity(self) -> torch.Tensor:
        return 1.0 - self.density

    def reset_stats(self) -> None:
        self._nnz_total.zero_()
        self._slots_total.zero_()
        self.last_density = None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"out_size={self.out_size}, tile={self.tile}, capacity={self.capacity}, threshold={self.threshold}")


def total_l1(model: nn.Module) -> torch.Tensor:
    """Sum of ``last_l1`` over every :class:`SparseGatedMLP` in ``model`` (run a forward first)."""
    terms = [m.last_l1 for m in model.modules() if isinstance(m, SparseGatedMLP) and m.last_l1 is not None]
    if not terms:
        raise ValueError("total_l1: the model has no SparseGatedMLP with a forward behind it")
    return torch.stack([t.reshape(()) for t in terms]).sum()


def ffn_sparsity_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{module name: {"density": running mean, "last_density": last forward}}`` per SparseGatedMLP."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseGatedMLP):
            last = m.last_density
            out[name] = {"density": float(m.density), "last_density": float("nan") if last is None else float(last)}
    return out


_METHODS = ("exact", "quest")


class TopKDecodeAttention(nn.Module):
    """A LLaMA-style attention layer whose decode steps attend to the top ``k`` keys only.

    ``attn`` is a ``transformers`` attention layer (LlamaAttention, or one with the same structure:
    ``q_proj/k_proj/v_proj/o_proj``, ``head_dim``, ``scaling``, ``layer_idx``, optional
    ``q_norm/k_norm``). Its sub-modules and attributes are adopted, so the state dict keys stay the
    same. A forward with more than one query token, without a cache, in training mode, or with an
    attention mask that hides some key (left padding) runs the original layer unchanged. A decode
    step projects and rotates (the original module's ``apply_rotary_pos_emb``) the new token,
    appends it to the cache, then::

        sel = sc.select_topk(q, kv, k, method=..., sink=..., window=..., shared=...)
        out = sc.sparse_decode(q, kv, sel, scale=attn.scaling)

    reading the cache in place (see :meth:`attend` for the layout; nothing is copied). ``k``
    counts tokens (``"exact"``) or pages of ``page_size`` tokens (``"quest"``) chosen by score on top
    of the ``sink`` first and ``window`` last tokens; it is clamped to the cache's length.

    Quest keeps the pages' key bounds between decode steps (:func:`sparsecore.page_bounds`): the
    first decode step after a prefill computes them, each further step of the same cache object
    recomputes only the page of the new token (``start`` = the previous length), and selection reads
    the bounds instead of the keys. A dense forward (prefill), another cache object, another batch
    shape or a length that is not the previous one plus 1 starts them afresh.
    """

    def __init__(self, attn: nn.Module, *, k: int, method: str = "exact", sink: int = 0, window: int = 0,
                 shared: bool = True, page_size: int | None = None) -> None:
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx"):
            if not hasattr(attn, name):
                raise TypeError(f"TopKDecodeAttention: attn ({type(attn).__name__}) has no {name!r}; expected a "
                                "LLaMA-style attention layer")
        if method not in _METHODS:
            raise ValueError(f"TopKDecodeAttention: method = {method!r}; allowed: {', '.join(_METHODS)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"TopKDecodeAttention: k = {k!r}; must be an int >= 0")
        for key, val in vars(attn).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, val)
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.train(attn.training)
        self._dense_forward: Callable[..., Any] = type(attn).forward
        self._rope: Callable[..., Any] = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.wrapped_class = type(attn).__name__
        self.k, self.method, self.sink, self.window = int(k), method, int(sink), int(window)
        self.shared, self.page_size = bool(shared), page_size
        self.sparse_enabled = True
        self.decode_steps = 0
        self.dense_fallbacks = 0
        self.keys_read = 0
        self.keys_total = 0
        self._bounds: Any = None  # Quest: (cache id, view key, length covered, PageBounds) or None

    @property
    def read_fraction(self) -> float:
        """Fraction of the cached keys that the sparse decode steps read (1.0 before any)."""
        return self.keys_read / self.keys_total if self.keys_total else 1.0

    def _masks_a_key(self, mask: Any) -> bool:
        if mask is None or not isinstance(mask, torch.Tensor):
            return False
        last = mask[..., -1, :] if mask.dim() >= 2 else mask
        if last.dtype == torch.bool:
            return not bool(last.all())
        return bool((last < 0).any())

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (not self.sparse_enabled or self.training or past_key_values is None or position_embeddings is None
                or hidden_states.shape[1] != 1 or past_key_values.get_seq_length(self.layer_idx) == 0):
            self._bounds = None  # a prefill (or any dense step) changes the cache in ways bounds do not follow
            return self._dense_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                       **kwargs)
        if self._masks_a_key(attention_mask):
            self._bounds = None
            self.dense_fallbacks += 1
            return self._dense_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                       **kwargs)
        bsz = hidden_states.shape[0]
        shape = (bsz, 1, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):  # Qwen3-style per-head norms before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        length = past_key_values.get_seq_length(self.layer_idx) + 1
        keys, values = past_key_values.update(k, v, self.layer_idx)
        out = self.attend(q[:, :, 0].contiguous(), keys, values, length, cache_id=id(past_key_values))
        return self.o_proj(out.reshape(bsz, 1, -1)), None

    def _quest_bounds(self, kv: sc.DenseKV, unit: int, length: int, cache_id: int | None) -> sc.PageBounds:
        """The pages' key bounds of ``kv`` (every sequence ``length`` long): updated from the previous
        step's when this is the next step of the same cache, else computed afresh."""
        view = (tuple(kv.k.shape[:1]) + tuple(kv.k.shape[2:]), unit, kv.k.dtype, kv.k.device)
        need = -(-kv.max_len // unit)
        prev = self._bounds
        if cache_id is not None and prev is not None and prev[0] == cache_id and prev[1] == view \
                and prev[2] + 1 == length:
            bounds = prev[3]
            if bounds.num_pages < need:  # a growing (dynamic) cache: more pages, amortised doubling
                grown = sc.PageBounds(bounds.kmin.new_zeros((kv.batch, 2 * need) + bounds.kmin.shape[2:]),
                                      bounds.kmax.new_zeros((kv.batch, 2 * need) + bounds.kmax.shape[2:]), unit)
                grown.kmin[:, :bounds.num_pages] = bounds.kmin
                grown.kmax[:, :bounds.num_pages] = bounds.kmax
                bounds = grown
            start = torch.full((kv.batch,), length - 1, dtype=torch.int32, device=kv.k.device)
            bounds = sc.page_bounds(kv, out=bounds, start=start)
        else:
            bounds = sc.page_bounds(kv, unit)
        self._bounds = None if cache_id is None else (cache_id, view, length, bounds)
        return bounds

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
               cache_id: int | None = None) -> torch.Tensor:
        """Top-k decode attention of ``q[B, Hq, D]`` over the first ``length`` positions of a
        ``[B, Hkv, S, D]`` cache; ``[B, Hq, D]``.

        A contiguous cache is read as ``B * Hkv`` sequences of one KV head each (a reshape, no copy;
        the query heads of a group become that sequence's heads), which has the same meaning for a
        selection shared per KV group or per head and keeps the kernels on contiguous rows; any other
        cache is read through the transposed view ``[B, S, Hkv, D]``. ``cache_id`` (what
        :meth:`forward` passes: the cache object's id) lets Quest keep its page bounds from one call
        to the next; without it they are computed afresh."""
        b, hkv, _, d = keys.shape
        hq = q.shape[1]
        if keys.is_contiguous() and values.is_contiguous():
            kv = sc.DenseKV(keys.reshape(b * hkv, -1, 1, d), values.reshape(b * hkv, -1, 1, d),
                            torch.full((b * hkv,), length, dtype=torch.int32, device=keys.device))
            q = q.reshape(b * hkv, hq // hkv, d)
        else:
            kv = sc.DenseKV(keys.transpose(1, 2), values.transpose(1, 2),
                            torch.full((b,), length, dtype=torch.int32, device=keys.device))
        opts: dict[str, Any] = dict(method=self.method, sink=self.sink, window=self.window, shared=self.shared)
        unit = 1
        if self.method == "quest":
            unit = self.page_size or 16
            opts["bounds"] = self._quest_bounds(kv, unit, length, cache_id)
        sel = sc.select_topk(q, kv, min(self.k, -(-kv.max_len // unit)), **opts)
        out, _ = sc.sparse_decode(q, kv, sel, scale=self.scaling)
        rows = sel.counts.numel()  # (sequence, group) pairs, whichever layout
        self.decode_steps += 1
        self.keys_read += min(int(sel.counts.sum()) * unit, rows * length)
        self.keys_total += rows * length
        return out.reshape(b, hq, d)

    def extra_repr(self) -> str:
        return (f"wraps={self.wrapped_class}, k={self.k}, method={self.method!r}, sink={self.sink}, "
                f"window={self.window}, shared={self.shared}, page_size={self.page_size}")
