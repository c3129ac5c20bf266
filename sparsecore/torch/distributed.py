"""Tensor parallelism with sparsecore's ops: each rank runs the ops on its shard, ``torch.distributed``
joins the results (any backend; the tests use gloo on CPU).

- FFN: the hidden units (``K``, the columns of the gate) are split across ranks. Rank ``r`` packs its
  own ReLU gate, runs ``gated_ffn`` over its ``K / world`` units and an ``all_reduce`` sums the
  partial outputs: the sum over ``j`` in the FFN's definition splits into a sum over shards.
- Decode attention: the KV heads are split across ranks, and with them the query heads of their
  groups. Rank ``r`` selects top-k keys and runs ``sparse_decode`` for its heads only (a selection
  shared by a KV group never needs another rank's heads) and an ``all_gather`` rebuilds ``[B, Hq, D]``;
  in a model the output projection would instead be row-parallel followed by an ``all_reduce``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import sparsecore as sc

from .modules import SparseGatedMLP

__all__ = ["shard_range", "head_shards", "tp_relu_gated_ffn", "tp_sparse_decode", "ShardedSparseGatedMLP"]


def _world(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(n: int, rank: int, world: int) -> slice:
    """The ``rank``-th of ``world`` contiguous, nearly equal parts of ``range(n)`` (the first ``n % world``
    parts are one longer)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_range: rank = {rank}, world = {world}; need 0 <= rank < world")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


def head_shards(num_q_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[slice, slice]:
    """``(query heads, kv heads)`` of ``rank``: whole KV groups, so each rank attends on its own."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"head_shards: num_q_heads = {num_q_heads} is not a multiple of num_kv_heads = "
                         f"{num_kv_heads}")
    if num_kv_heads % world:
        raise ValueError(f"head_shards: num_kv_heads = {num_kv_heads} does not split over world = {world} ranks")
    kv = shard_range(num_kv_heads, rank, world)
    g = num_q_heads // num_kv_heads
    return slice(kv.start * g, kv.stop * g), kv


class _ReduceFromShards(torch.autograd.Function):
    """Forward: the sum of the ranks' partial outputs. Backward: identity, because every rank holds the
    same (replicated) loss; ``torch.distributed.nn.all_reduce`` would sum the gradients over ranks and
    scale them by the world size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: the gradient is the sum of the ranks'
    contributions, each from its own shard."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReduceFromShards.apply(x, group)
    dist.all_reduce(x, group=group)
    return x


def _copy_in(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _CopyToShards.apply(x, group) if torch.is_grad_enabled() and x.requires_grad else x


def tp_relu_gated_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                      group: Any = None, tile: int = 256, capacity: int | None = None, threshold: float = 0.0
                      ) -> torch.Tensor:
    """The full FFN output from this rank's shard of the hidden units: ``w_gate, w_up[K_r, D]``,
    ``w_down[K_r, N]`` (see :func:`shard_range`), ``x[M, D]`` replicated on every rank.

    Differentiable, with the Megatron convention for a replicated loss: the gradient of ``x`` is summed
    over the ranks (so every rank gets the full one), the weight gradients are each rank's shard."""
    from .functional import relu_gated_ffn

    _, world = _world(group)
    if world > 1:
        x = _copy_in(x, group)
    out, _ = relu_gated_ffn(x, w_gate, w_up, w_down, tile=tile, capacity=capacity, threshold=threshold)
    return _all_reduce(out, group) if world > 1 else out


def tp_sparse_decode(q: torch.Tensor, kv: sc.DenseKV, k: int, *, method: str = "exact", sink: int = 0,
                     window: int = 0, shared: bool = True, page_size: int | None = None, scale: float | None = None,
                     group: Any = None) -> torch.Tensor:
    """Top-k decode attention ``[B, Hq, D]`` with this rank computing only its heads
    (:func:`head_shards`); ``q[B, Hq, D]`` and ``kv`` are the full tensors (in a real deployment each
    rank holds only its heads: pass views, nothing is copied)."""
    rank, world = _world(group)
    qs, ks = head_shards(q.shape[1], kv.num_kv_heads, rank, world)
    local_kv = sc.DenseKV(kv.k[:, :, ks], kv.v[:, :, ks], kv.lengths)
    local_q = q[:, qs].contiguous()
    sel = sc.select_topk(local_q, local_kv, k, method=method, sink=sink, window=window, shared=shared,
                         page_size=page_size)
    out, _ = sc.sparse_decode(local_q, local_kv, sel, scale=scale)
    if world == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class ShardedSparseGatedMLP(SparseGatedMLP):
    """This rank's shard of a :class:`SparseGatedMLP` (hidden units split); its forward returns the
    full output (all-reduced over ``group``)."""

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    @classmethod
    def from_full(cls, mlp: SparseGatedMLP, rank: int, world: int, group: Any = None) -> ShardedSparseGatedMLP:
        """Copies rank ``rank``'s hidden units of ``mlp`` (its parameters are not shared)."""
        s = shard_range(mlp.intermediate_size, rank, world)
        w = mlp.gate_proj.weight
        new = cls(mlp.hidden_size, s.stop - s.start, mlp.out_size, tile=mlp.tile, capacity=mlp.capacity,
                  threshold=mlp.threshold, device=w.device, dtype=w.dtype, group=group)
        with torch.no_grad():
            new.gate_proj.weight.copy_(mlp.gate_proj.weight[s])
            new.up_proj.weight.copy_(mlp.up_proj.weight[s])
            new.down_proj.weight.copy_(mlp.down_proj.weight[:, s])
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, world = _world(self.group)
        if world == 1:
            return super().forward(x)
        return _all_reduce(super().forward(_copy_in(x, self.group)), self.group)
