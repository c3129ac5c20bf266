"""Tensor parallelism on CPU: 2 processes (torch.multiprocessing) joined by torch.distributed gloo
(rendezvous through a file: no port to race for). FFN hidden units and attention heads are split
across the ranks; each rank runs the ops on its shard and the joined result must match the unsharded
one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import sparsecore as sc  # noqa: E402
from sparsecore.torch.distributed import (  # noqa: E402
    ShardedSparseGatedMLP,
    head_shards,
    shard_range,
    tp_relu_gated_ffn,
    tp_sparse_decode,
)
from sparsecore.torch.modules import SparseGatedMLP  # noqa: E402

WORLD = 2


def _ffn_data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    m, d, k, n = 7, 32, 96, 24
    x = torch.randn(m, d, generator=g)
    return x, torch.randn(k, d, generator=g) * 0.3, torch.randn(k, d, generator=g) * 0.3, \
        torch.randn(k, n, generator=g) * 0.3


def _decode_data() -> tuple[torch.Tensor, sc.DenseKV]:
    g = torch.Generator().manual_seed(1)
    b, s, hkv, hq, d = 2, 40, 4, 8, 16
    k = torch.randn(b, hkv, s, d, generator=g)  # transformers' [B, Hkv, S, D], seen through a view
    v = torch.randn(b, hkv, s, d, generator=g)
    q = torch.randn(b, hq, d, generator=g) * 2
    return q, sc.DenseKV(k.transpose(1, 2), v.transpose(1, 2), torch.tensor([40, 29], dtype=torch.int32))


def _worker(rank: int, store: str, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        out: dict[str, float] = {}
        # FFN: hidden units split, all_reduce of the partial outputs
        x, wg, wu, wd = _ffn_data()
        s = shard_range(wg.shape[0], rank, WORLD)
        with torch.no_grad():
            full = sc.gated_ffn(x, sc.pack(x @ wg.T, activation="relu"), wu, wd)
            part = tp_relu_gated_ffn(x, wg[s], wu[s], wd[s], tile=16, capacity=2)
        out["ffn"] = float((part - full).abs().max())
        # the same through autograd: the gradient of x is summed over the shards, of the weights sliced
        xr = x.clone().requires_grad_(True)
        ws = [w[s].clone().requires_grad_(True) for w in (wg, wu, wd)]
        tp_relu_gated_ffn(xr, *ws, tile=16).square().sum().backward()
        dx = xr.grad  # x is replicated: its gradient, summed over the ranks, is the full one
        xf = x.clone().requires_grad_(True)
        wf = [w.clone().requires_grad_(True) for w in (wg, wu, wd)]
        ((torch.relu(xf @ wf[0].T) * (xf @ wf[1].T)) @ wf[2]).square().sum().backward()
        out["ffn_dx"] = float((dx - xf.grad).abs().max())
        out["ffn_dw"] = max(float((a.grad - b.grad[s]).abs().max()) for a, b in zip(ws, wf))
        # the module: a SparseGatedMLP cut into shards
        torch.manual_seed(0)
        mlp = SparseGatedMLP(32, 96, tile=32)
        shard = ShardedSparseGatedMLP.from_full(mlp, rank, WORLD)
        with torch.no_grad():
            out["mlp"] = float((shard(x.reshape(7, 1, 32)) - mlp(x.reshape(7, 1, 32))).abs().max())
        # decode: KV heads (and their query heads) split, all_gather of the head outputs
        q, kv = _decode_data()
        for name, opts in {"exact_shared": dict(k=6, sink=2, window=3),
                           "exact_per_head": dict(k=6, shared=False),
                           "quest": dict(k=2, method="quest", page_size=4, window=4)}.items():
            want, _ = sc.sparse_decode(q, kv, sc.select_topk(q, kv, **opts))
            got = tp_sparse_decode(q, kv, **opts)
            out[f"decode_{name}"] = float((got - want).abs().max())
        qs, ks = head_shards(8, 4, rank, WORLD)
        out["heads"] = float(qs.start * 100 + ks.start)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, float]]:
    store: Path = tmp_path_factory.mktemp("gloo") / "store"  # must not exist yet
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(str(store), shared), nprocs=WORLD, join=True)
        return {int(r): dict(v) for r, v in shared.items()}


def test_ffn_columns_split_match_unsharded(results: dict[int, dict[str, float]]) -> None:
    for rank in range(WORLD):
        assert results[rank]["ffn"] < 1e-5
        assert results[rank]["mlp"] < 1e-5


def test_ffn_gradients_per_shard(results: dict[int, dict[str, float]]) -> None:
    for rank in range(WORLD):
        assert results[rank]["ffn_dx"] < 1e-3
        assert results[rank]["ffn_dw"] < 1e-3


@pytest.mark.parametrize("name", ["exact_shared", "exact_per_head", "quest"])
def test_heads_split_match_unsharded(results: dict[int, dict[str, float]], name: str) -> None:
    for rank in range(WORLD):
        assert results[rank][f"decode_{name}"] < 1e-5
    assert [results[r]["heads"] for r in range(WORLD)] == [0.0, 402.0]  # rank 1: q heads 4.., kv heads 2..


def test_shard_helpers() -> None:
    assert [shard_range(10, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert head_shards(8, 2, 1, 2) == (slice(4, 8), slice(1, 2))
    with pytest.raises(ValueError, match=r"^head_shards: num_kv_heads = 3 does not split over world = 2 ranks"):
        head_shards(6, 3, 0, 2)
    with pytest.raises(ValueError, match=r"^shard_range: rank = 2, world = 2; need 0 <= rank < world"):
        shard_range(4, 2, 2)
