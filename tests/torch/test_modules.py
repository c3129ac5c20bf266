"""SparseGatedMLP and TopKDecode (through transformers' attention registry) against transformers' dense
LLaMA layers (CPU, tiny shapes)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRotaryEmbedding  # noqa: E402

import sparsecore as sc  # noqa: E402
from sparsecore.torch.attention import TopKDecode, register_attention  # noqa: E402
from sparsecore.torch.modules import SparseGatedMLP, ffn_sparsity_stats, total_l1  # noqa: E402


def _config(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, hidden_act="relu")
    base.update(kw)
    return LlamaConfig(**base)


def _dense_mlp(seed: int = 0, **kw) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(_config(**kw))
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.2)
    return mlp


# ---------------------------------------------------------------- SparseGatedMLP


def test_state_dict_matches_llama_mlp() -> None:
    dense = _dense_mlp()
    sparse = SparseGatedMLP(64, 160)
    assert {k: tuple(v.shape) for k, v in sparse.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile, capacity", [(256, None), (16, 1)], ids=["default", "overflowing"])
def test_forward_matches_dense_relu_mlp(tile: int, capacity: int | None) -> None:
    dense = _dense_mlp()
    sparse = SparseGatedMLP.from_dense(dense, tile=tile, capacity=capacity)
    assert sparse.gate_proj is dense.gate_proj  # shared, not copied
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sparse(x[0, 0]), dense(x[0, 0]), atol=1e-5, rtol=1e-5)  # [D] input


def test_backward_matches_dense_autograd() -> None:
    dense = _dense_mlp(1)
    sparse = SparseGatedMLP(64, 160)
    sparse.load_state_dict(dense.state_dict())
    x1 = torch.randn(6, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    dy = torch.randn(6, 64)
    (dense(x1) * dy).sum().backward()
    (sparse(x2) * dy).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-4, rtol=1e-4)
    for name in ("gate_proj", "up_proj", "down_proj"):
        torch.testing.assert_close(getattr(sparse, name).weight.grad, getattr(dense, name).weight.grad,
                                   atol=1e-4, rtol=1e-4)


def test_l1_penalty_is_exposed_and_differentiable() -> None:
    sparse = SparseGatedMLP.from_dense(_dense_mlp(2))
    x = torch.randn(4, 64)
    assert sparse.last_l1 is None
    sparse(x)
    l1 = sparse.last_l1
    assert l1.requires_grad and l1.dim() == 0 and float(l1.detach()) > 0
    total_l1(sparse).backward()
    g = sparse.gate_proj.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    # the penalty pushes the pre-activations of active units down: d l1 / d gate.weight has the sign of x
    h = x @ sparse.gate_proj.weight.detach().T
    dead = (h <= 0).all(0)
    assert torch.all(g[dead] == 0)


def test_sparsity_statistics() -> None:
    sparse = SparseGatedMLP.from_dense(_dense_mlp(3), tile=16, capacity=2)
    xa, xb = torch.randn(3, 64), torch.randn(5, 2, 64)
    with torch.no_grad():
        sparse(xa)
        da = (xa @ sparse.gate_proj.weight.T > 0).double().mean()
        assert float(sparse.last_density) == pytest.approx(float(da))
        sparse(xb)
        db = (xb.reshape(-1, 64) @ sparse.gate_proj.weight.T > 0).double().mean()
        assert float(sparse.last_density) == pytest.approx(float(db))
        assert float(sparse.density) == pytest.approx(float((3 * da + 10 * db) / 13))
        assert float(sparse.sparsity) == pytest.approx(1 - float(sparse.density))
    stats = ffn_sparsity_stats(torch.nn.Sequential(sparse))
    assert list(stats) == ["0"] and stats["0"]["density"] == pytest.approx(float(sparse.density))
    sparse.reset_stats()
    assert float(sparse.density) == 0 and sparse.last_density is None


def test_threshold_drops_small_activations() -> None:
    dense = _dense_mlp(4)
    sparse = SparseGatedMLP.from_dense(dense, threshold=0.5)
    x = torch.randn(5, 64)
    with torch.no_grad():
        g = torch.relu(x @ dense.gate_proj.weight.T)
        g = torch.where(g > 0.5, g, 0)
        want = (g * (x @ dense.up_proj.weight.T)) @ dense.down_proj.weight.T
        torch.testing.assert_close(sparse(x), want, atol=1e-5, rtol=1e-5)
        assert float(sparse.last_density) == pytest.approx(float((g > 0).double().mean()))


def test_cached_down_weight_follows_updates() -> None:
    dense = _dense_mlp(5)
    sparse = SparseGatedMLP.from_dense(dense)
    x = torch.randn(2, 64)
    with torch.no_grad():
        sparse(x)
        dense.down_proj.weight.mul_(2)  # an optimizer step in place
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


def test_from_dense_rejects_bias_and_non_mlps() -> None:
    with pytest.raises(ValueError, match=r"^SparseGatedMLP.from_dense: mlp.gate_proj has a bias"):
        SparseGatedMLP.from_dense(LlamaMLP(_config(mlp_bias=True)))
    with pytest.raises(TypeError, match=r"^SparseGatedMLP.from_dense: mlp.gate_proj is NoneType"):
        SparseGatedMLP.from_dense(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^SparseGatedMLP: x has shape \(2, 3\); expected \[..., 64\]"):
        SparseGatedMLP(64, 32)(torch.randn(2, 3))


def test_total_l1_needs_a_forward() -> None:
    with pytest.raises(ValueError, match="^total_l1: the model has no SparseGatedMLP with a forward behind it"):
        total_l1(SparseGatedMLP(8, 8))


# ---------------------------------------------------------------- TopKDecode (attention registry)


def _attention(seed: int = 0) -> tuple[LlamaAttention, LlamaRotaryEmbedding]:
    torch.manual_seed(seed)
    cfg = _config(attn_implementation="sdpa")
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)  # peaked attention, so the choice of keys matters
    return attn, LlamaRotaryEmbedding(cfg)


def _topk(attn: LlamaAttention, fallback: str = "sdpa", **opts: Any) -> tuple[LlamaAttention, TopKDecode]:
    """A copy of ``attn`` (same weights) whose config selects sparsecore's registered attention over
    ``fallback`` and whose decode steps run ``TopKDecode(**opts)``."""
    new = copy.deepcopy(attn)
    new.config = _config(attn_implementation=register_attention(fallback))
    new.sparsecore_decode = TopKDecode(**opts)
    return new, new.sparsecore_decode


def _run(attn: torch.nn.Module, rope: LlamaRotaryEmbedding, xs: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Prefill ``xs[:, :prefill]`` then decode the rest one token at a time; the outputs of each call."""
    cache = DynamicCache()
    outs = []
    pos = torch.arange(xs.shape[1])[None]
    with torch.no_grad():
        for lo, hi in [(0, prefill)] + [(t, t + 1) for t in range(prefill, xs.shape[1])]:
            cos, sin = rope(xs, pos[:, lo:hi])
            out, _ = attn(xs[:, lo:hi], (cos, sin), None, cache)  # the cache by position: its name changed in 5.x
            outs.append(out)
    return outs


def _reference_topk(attn: LlamaAttention, rope: LlamaRotaryEmbedding, xs: torch.Tensor, sel_fn) -> torch.Tensor:
    """Output of the last token of ``xs`` attending to the keys ``sel_fn(q, kv)`` picks, in plain torch."""
    b, s, _ = xs.shape
    hd, hq, hkv = attn.head_dim, 4, 2
    with torch.no_grad():
        q = attn.q_proj(xs).view(b, s, hq, hd).transpose(1, 2)
        k = attn.k_proj(xs).view(b, s, hkv, hd).transpose(1, 2)
        v = attn.v_proj(xs).view(b, s, hkv, hd).transpose(1, 2)
        cos, sin = rope(xs, torch.arange(s)[None])
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q_last = q[:, :, -1].contiguous()
        kv = sc.DenseKV(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
                        torch.full((b,), s, dtype=torch.int32))
        idx = sel_fn(q_last, kv)
        out = torch.empty(b, hq, hd)
        for bi in range(b):
            for h in range(hq):
                g = h // 2 if idx.groups == hkv else h
                rows = idx.indices[bi, g, : idx.counts[bi, g]].long()
                if idx.granularity == "page":
                    ps = idx.page_size
                    rows = (rows[:, None] * ps + torch.arange(ps)[None]).reshape(-1)
                    rows = rows[rows < s]
                sc_ = (k[bi, h // 2, rows] @ q_last[bi, h]) * attn.scaling
                out[bi, h] = torch.softmax(sc_, 0) @ v[bi, h // 2, rows]
        return attn.o_proj(out.reshape(b, 1, -1))


def test_attention_keeps_state_dict_and_prefill() -> None:
    attn, rope = _attention()
    wrapped, state = _topk(attn, k=4)
    assert list(wrapped.state_dict()) == list(attn.state_dict())
    xs = torch.randn(2, 9, 64)
    for a, b in zip(_run(attn, rope, xs, 9), _run(wrapped, rope, xs, 9)):
        torch.testing.assert_close(a, b)  # prefill runs the fallback (sdpa)
    assert state.decode_steps == 0


@pytest.mark.parametrize("method, shared", [("exact", True), ("exact", False), ("quest", True)])
def test_decode_with_every_key_equals_dense(method: str, shared: bool) -> None:
    attn, rope = _attention(1)
    opts = dict(page_size=4) if method == "quest" else {}
    wrapped, state = _topk(attn, k=10_000, method=method, shared=shared, **opts)
    xs = torch.randn(2, 14, 64)
    dense, sparse = _run(attn, rope, xs, 6), _run(wrapped, rope, xs, 6)
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)
    assert state.decode_steps == 8 and state.read_fraction == pytest.approx(1.0)
    # a host plan counts on the host from its NumPy counts (no tensor ops per step); a device plan
    # would count on the device and read the sum on demand
    assert state._keys_read is None and state._keys_read_host > 0


@pytest.mark.parametrize("method, k, sink, window, shared", [
    ("exact", 3, 1, 2, True), ("exact", 2, 0, 0, False), ("quest", 1, 1, 3, True)])
def test_decode_with_few_keys_matches_topk_reference(method: str, k: int, sink: int, window: int,
                                                     shared: bool) -> None:
    attn, rope = _attention(2)
    opts = dict(method=method, sink=sink, window=window, shared=shared)
    if method == "quest":
        opts["page_size"] = 4
    wrapped, state = _topk(attn, k=k, **opts)
    xs = torch.randn(2, 17, 64)
    got = _run(wrapped, rope, xs, 16)[-1]
    want = _reference_topk(attn, rope, xs, lambda q, kv: sc.select_topk(q, kv, k, backend="reference", **opts))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    dense = _run(attn, rope, xs, 16)[-1]
    assert not torch.allclose(got, dense, atol=1e-3)  # few keys: really sparse
    assert state.read_fraction < 1


def test_decode_with_top_p_matches_topk_reference() -> None:
    """The adaptive budget through TopKDecode: the layer's own scale estimates the mass."""
    attn, rope = _attention(2)
    wrapped, state = _topk(attn, k=6, top_p=0.5, k_min=1, sink=1)
    xs = torch.randn(2, 17, 64)
    got = _run(wrapped, rope, xs, 16)[-1]
    want = _reference_topk(attn, rope, xs, lambda q, kv: sc.select_topk(
        q, kv, 6, top_p=0.5, k_min=1, sink=1, scale=attn.scaling, backend="reference"))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert state.read_fraction < 1
    with pytest.raises(ValueError, match="TopKDecode: top_p = 2"):
        _topk(attn, k=6, top_p=2)
    with pytest.raises(ValueError, match="TopKDecode: k_min = 7"):
        _topk(attn, k=6, top_p=0.5, k_min=7)


def test_decode_with_int8_codes_matches_topk_reference_and_keeps_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """method='int8' through TopKDecode: each step after the first quantises its new key only, and
    the output equals the reference selection over codes built afresh."""
    attn, rope = _attention(2)
    wrapped, state = _topk(attn, k=3, method="int8", rescore=6, sink=1)
    calls = []
    real = sc.quantize_keys
    monkeypatch.setattr(sc, "quantize_keys", lambda kv, **kw: calls.append(kw.get("start")) or real(kv, **kw))
    xs = torch.randn(2, 17, 64)
    got = _run(wrapped, rope, xs, 12)[-1]
    assert calls[0] is None and all(c is not None for c in calls[1:]) and len(calls) == 5
    want = _reference_topk(attn, rope, xs, lambda q, kv: sc.select_topk(
        q, kv, 3, method="int8", codes=real(kv), rescore=6, sink=1, backend="reference"))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert state.read_fraction < 1
    with pytest.raises(ValueError, match="TopKDecode: rescore = 4"):
        _topk(attn, k=3, rescore=4)


def test_decode_with_int8_on_another_device_says_what_to_use_instead() -> None:
    """The int8 copy of the keys is kept on the CPU or a CUDA device: a cache anywhere else (a "meta"
    tensor here) gets an error that names the device and the method to use there."""
    state = TopKDecode(k=3, method="int8", candidates=64)
    q, keys = torch.randn(1, 4, 8, device="meta"), torch.randn(1, 2, 16, 8, device="meta")
    with pytest.raises(NotImplementedError, match=r"method='int8' keeps an int8 copy of the keys on the cache's "
                                                  r"device, CPU or CUDA; this cache is on meta: use method='exact'"):
        state.attend(q, keys, keys, 16)


def test_decode_with_int8_top_p_matches_topk_reference() -> None:
    """The adaptive budget over the int8 codes through TopKDecode (codes kept and updated per step):
    equal to the reference selection over codes built afresh, with the layer's own scale."""
    attn, rope = _attention(2)
    wrapped, state = _topk(attn, k=6, method="int8", top_p=0.5, k_min=1, sink=1)
    xs = torch.randn(2, 17, 64)
    got = _run(wrapped, rope, xs, 12)[-1]
    want = _reference_topk(attn, rope, xs, lambda q, kv: sc.select_topk(
        q, kv, 6, method="int8", codes=sc.quantize_keys(kv), top_p=0.5, k_min=1, sink=1, scale=attn.scaling,
        backend="reference"))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert state.read_fraction < 1
    with pytest.raises(ValueError, match="TopKDecode: rescore = 8"):
        _topk(attn, k=6, method="int8", top_p=0.5, rescore=8)


@pytest.mark.parametrize("method", ["exact", "int8"])
def test_decode_with_candidates_matches_topk_reference(method: str) -> None:
    """candidates through TopKDecode: the best by the shared ranking, ranked again by their mass and
    cut by top_p, equal to the reference selection (int8: over codes built afresh)."""
    attn, rope = _attention(2)
    wrapped, state = _topk(attn, k=8, method=method, top_p=0.5, k_min=1, sink=1, candidates=11, tail_sample=2)
    xs = torch.randn(2, 17, 64)
    got = _run(wrapped, rope, xs, 12)[-1]
    want = _reference_topk(attn, rope, xs, lambda q, kv: sc.select_topk(
        q, kv, 8, method=method, top_p=0.5, k_min=1, sink=1, scale=attn.scaling, candidates=11, tail_sample=2,
        backend="reference",
        **({"codes": sc.quantize_keys(kv)} if method == "int8" else {})))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert state.read_fraction < 1
    with pytest.raises(ValueError, match="TopKDecode: candidates = 5"):
        _topk(attn, k=6, method=method, candidates=5)


@pytest.mark.parametrize("method", ["exact", "int8"])
def test_decode_ranking_every_key_by_mass_keeps_one_plan(method: str) -> None:
    """candidates above the cache's length (a model's context): every key ranked by its mass, equal
    to the reference; the growing (dynamic) cache keeps one plan, not one per step."""
    attn, rope = _attention(2)
    wrapped, state = _topk(attn, k=5, method=method, candidates=4096)
    xs = torch.randn(2, 17, 64)
    got = _run(wrapped, rope, xs, 12)[-1]
    want = _reference_topk(attn, rope, xs, lambda q, kv: sc.select_topk(
        q, kv, 5, method=method, scale=attn.scaling, candidates=4096, backend="reference",
        **({"codes": sc.quantize_keys(kv)} if method == "int8" else {})))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert len(state._plans) == 1, list(state._plans)
    with pytest.raises(ValueError, match="TopKDecode: tail_sample = 4"):
        _topk(attn, k=6, method=method, top_p=0.5, tail_sample=4)


def test_attend_follows_a_cache_tensor_moved_in_place() -> None:
    """TopKDecode.attend on the same cache tensors step after step (a static cache) equals the public
    ops each step, also after a cache tensor is re-pointed in place (``set_``): the step reads the new
    memory; and the layer keeps no reference to the cache between steps (it is freed with its owner)."""
    import gc
    import weakref

    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    q = torch.randn(2, 4, 8, generator=g)
    state = TopKDecode(k=5, sink=1, window=2)

    def want(n: int) -> torch.Tensor:
        kv = sc.DenseKV(keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous(),
                        torch.tensor([n, n], dtype=torch.int32))
        out, _ = sc.sparse_decode(q, kv, sc.select_topk(q, kv, 5, sink=1, window=2, backend="reference"),
                                  scale=0.3, backend="reference")
        return out

    for n in (30, 31, 32):
        with torch.no_grad():
            got = state.attend(q, keys, values, n, scaling=0.3)
        torch.testing.assert_close(got, want(n), atol=2e-5, rtol=2e-5)
    keys.set_(torch.randn(2, 2, 40, 8, generator=g))  # new memory, same shape
    with torch.no_grad():
        got = state.attend(q, keys, values, 33, scaling=0.3)
    torch.testing.assert_close(got, want(33), atol=2e-5, rtol=2e-5)
    k2, v2 = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    with torch.no_grad():
        state.attend(q, k2, v2, 30, scaling=0.3)
    gone = weakref.ref(k2)
    del k2, v2
    gc.collect()
    assert gone() is None


def test_quest_keeps_page_bounds_across_decode_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decode step after the first updates the previous step's bounds from the new token only
    (``out`` + ``start``), and every step's output equals the one from bounds computed afresh; a new
    prefill on the same cache starts the bounds again."""
    attn, rope = _attention(4)
    kept, _ = _topk(attn, k=1, method="quest", sink=1, window=2, page_size=3)
    calls: list[bool] = []  # False: bounds built for the whole cache; True: updated from the new token
    real, real_run = sc.page_bounds, sc.DecodePlan.run

    def spy(*args: Any, **kwargs: Any) -> sc.PageBounds:
        calls.append(kwargs.get("out") is not None)
        return real(*args, **kwargs)

    def spy_run(self: sc.DecodePlan, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("update_from") is not None:  # the update runs inside the plan's step
            calls.append(True)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(sc, "page_bounds", spy)
    monkeypatch.setattr(sc.DecodePlan, "run", spy_run)
    xs = torch.randn(2, 16, 64) * 2
    got = _run(kept, rope, xs, 5)
    assert calls == [False] + [True] * 10  # 11 decode steps: one build, then updates (past 2 page growths)
    fresh, fresh_state = _topk(attn, k=1, method="quest", sink=1, window=2, page_size=3)
    fresh_state._quest_bounds = lambda kv, unit, lens: (real(kv, unit), None)  # type: ignore[method-assign]
    want = _run(fresh, rope, xs, 5)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step}")
    cache = DynamicCache()
    pos = torch.arange(16)[None]
    calls.clear()
    with torch.no_grad():
        for lo, hi in [(0, 4), (4, 5), (5, 6), (0, 3), (3, 4)]:  # a second prefill on the same cache object
            if lo == 0:
                cache.crop(0)
            kept(xs[:, lo:hi], rope(xs, pos[:, lo:hi]), None, cache)
    assert calls == [False, True, False]


def test_decode_falls_back_to_dense_for_masked_keys() -> None:
    attn, rope = _attention(3)
    wrapped, state = _topk(attn, k=1)
    xs = torch.randn(1, 6, 64)
    outs = []
    for layer in (attn, wrapped):
        cache = DynamicCache()
        with torch.no_grad():
            pos = torch.arange(6)[None]
            layer(xs[:, :5], rope(xs, pos[:, :5]), None, cache)
            mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
            mask[..., 0] = False  # left padding hides key 0
            outs.append(layer(xs[:, 5:], rope(xs, pos[:, 5:]), mask, cache)[0])
    torch.testing.assert_close(outs[1], outs[0])
    assert state.dense_fallbacks == 1 and state.decode_steps == 0


def test_decode_with_a_static_prefix_mask_reads_only_the_visible_keys() -> None:
    """A mask that shows a prefix of the keys (a static cache past its length) becomes per-sequence
    lengths; the hidden tail (NaN here) is never read."""
    from transformers import AttentionInterface

    attn, _ = _attention(5)
    wrapped, state = _topk(attn, k=10_000)
    torch.manual_seed(5)
    k, v, q = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 4, 1, 16)
    tail = torch.full((2, 2, 3, 16), float("nan"))
    static_k, static_v = torch.cat([k, tail], 2), torch.cat([v, tail], 2)
    mask = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    mask[..., :6] = True
    fn = AttentionInterface()[wrapped.config._attn_implementation]
    with torch.no_grad():
        got, _ = fn(wrapped, q, static_k, static_v, mask, scaling=attn.scaling)
        want, _ = AttentionInterface()["sdpa"](attn, q, k, v, None, scaling=attn.scaling)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert state.decode_steps == 1 and state.keys_total == 2 * 2 * 6  # (B * Hkv) groups x 6 visible keys


def test_attention_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"^TopKDecode: method = 'topp'; allowed: exact, quest"):
        TopKDecode(k=4, method="topp")
    with pytest.raises(ValueError, match=r"^TopKDecode: k = -1; must be an int >= 0"):
        TopKDecode(k=-1)
    with pytest.raises(ValueError, match=r"^TopKDecode: window = -2; must be an int >= 0"):
        TopKDecode(k=4, window=-2)
    with pytest.raises(ValueError, match=r"^TopKDecode: page_size = 4 is for method='quest' only"):
        TopKDecode(k=4, page_size=4)
    with pytest.raises(ValueError, match=r"^register_attention: fallback = 'nope' is not registered"):
        register_attention("nope")
    with pytest.raises(ValueError, match=r"^TopKDecode.attend: lengths = 30; expected an int or 2 ints in \[1, 21\]"):
        TopKDecode(k=4).attend(torch.randn(2, 4, 16), torch.randn(2, 2, 21, 16), torch.randn(2, 2, 21, 16), 30)


@pytest.mark.parametrize("backend", ["numba_cpu", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_host_backends_read_a_transposed_cache(backend: str, dtype: str) -> None:
    """transformers' cache is [B, Hkv, S, D]; DenseKV wants [B, S, Hkv, D]: a transposed view, no copy."""
    if backend == "numba_cpu":
        pytest.importorskip("numba")
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 24, 16, dtype=dt), torch.randn(2, 2, 24, 16, dtype=dt)
    q = torch.randn(2, 4, 16, dtype=dt)
    lengths = torch.tensor([24, 19], dtype=torch.int32)
    view = sc.DenseKV(k.transpose(1, 2), v.transpose(1, 2), lengths)
    copy = sc.DenseKV(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), lengths)
    assert not view.k.is_contiguous()
    iv = sc.select_topk(q, view, 5, sink=1, window=2, backend=backend)
    ic = sc.select_topk(q, copy, 5, sink=1, window=2, backend=backend)
    assert torch.equal(iv.counts, ic.counts)
    for b in range(2):
        for g in range(2):
            n = int(iv.counts[b, g])
            assert set(iv.indices[b, g, :n].tolist()) == set(ic.indices[b, g, :n].tolist())
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == "bfloat16" else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sc.sparse_decode(q, view, ic, backend=backend)[0],
                               sc.sparse_decode(q, copy, ic, backend=backend)[0], **tol)
    torch.testing.assert_close(sc.dense_decode(q, view, backend=backend)[0],
                               sc.dense_decode(q, copy, backend=backend)[0], **tol)


@pytest.mark.parametrize("method, shared", [("exact", True), ("exact", False), ("quest", True)])
def test_attend_reads_contiguous_and_strided_caches_alike(method: str, shared: bool) -> None:
    """A contiguous cache is read as B * Hkv one-head sequences, any other through the [B, S, Hkv, D]
    view; both mean the same selection and the same output."""
    attn, _ = _attention()
    state = TopKDecode(k=2, method=method, sink=1, window=2, shared=shared,
                       **({"page_size": 4} if method == "quest" else {}))
    torch.manual_seed(1)
    nhd_k, nhd_v = torch.randn(2, 21, 2, 16), torch.randn(2, 21, 2, 16)  # [B, S, Hkv, D]
    q = torch.randn(2, 4, 16) * 3
    strided = state.attend(q, nhd_k.transpose(1, 2), nhd_v.transpose(1, 2), 19, scaling=attn.scaling)
    contiguous = state.attend(q, nhd_k.transpose(1, 2).contiguous(), nhd_v.transpose(1, 2).contiguous(), 19,
                              scaling=attn.scaling)
    torch.testing.assert_close(contiguous, strided, atol=1e-5, rtol=1e-5)
    kv = sc.DenseKV(nhd_k, nhd_v, torch.tensor([19, 19], dtype=torch.int32))
    opts = dict(method=method, sink=1, window=2, shared=shared, **({"page_size": 4} if method == "quest" else {}))
    want, _ = sc.sparse_decode(q, kv, sc.select_topk(q, kv, 2, backend="reference", **opts), scale=attn.scaling,
                               backend="reference")
    torch.testing.assert_close(contiguous, want, atol=1e-5, rtol=1e-5)
    assert state.decode_steps == 2 and state.read_fraction < 1


@pytest.mark.parametrize("method", ["exact", "quest"])
def test_decode_step_compiles_without_graph_breaks(method: str) -> None:
    """Under torch.compile the registered attention runs the custom ops (with their fakes): one
    graph (fullgraph=True), the same output as eager."""
    from transformers import AttentionInterface

    fn = AttentionInterface()[register_attention("sdpa")]
    layer = torch.nn.Module().eval()
    layer.sparsecore_decode = TopKDecode(k=4, method=method, sink=1, window=2)
    torch.manual_seed(7)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(layer, q, k, v, None, scaling=0.25)[0]

    want = step(q, k, v)
    got = torch.compile(step, backend="eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert layer.sparsecore_decode.decode_steps == 2


def test_visible_lengths_reads_prefix_masks_and_rereads_a_mask_written_in_place() -> None:
    """The keys a mask shows each sequence: a prefix gives its length (per sequence), anything else
    False (the fallback), no mask None. The layers of one step share the mask, so it is read once;
    a mask written in place (its version counter moves) and other shapes are read again."""
    from sparsecore.torch.attention import _visible_lengths

    mask = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    mask[0, ..., :5] = True
    mask[1, ..., :3] = True
    assert _visible_lengths(mask, 2, 8) == (5, 3)
    assert _visible_lengths(mask, 2, 8) == (5, 3)  # the memo
    mask[1, ..., 6] = True  # a hole: not a prefix any more
    assert _visible_lengths(mask, 2, 8) is False
    assert _visible_lengths(mask, 2, 9) is False  # another key count: not this mask's shape
    additive = torch.full((1, 1, 2, 8), float("-inf"))
    additive[..., -1, :4] = 0.0  # the last query row shows 4 keys
    assert _visible_lengths(additive, 3, 8) == (4, 4, 4)  # one row of mask for every sequence
    additive[..., -1, 0] = float("-inf")  # left padding
    assert _visible_lengths(additive, 3, 8) is False
    assert _visible_lengths(torch.zeros(1, 1, 1, 8, dtype=torch.bool), 1, 8) is False  # nothing visible
    assert _visible_lengths(None, 1, 8) is None
    rng = np.random.default_rng(0)
    for _ in range(50):  # against a plain reading of the definition
        b, s = int(rng.integers(1, 4)), int(rng.integers(1, 12))
        m = torch.from_numpy(rng.random((b, 1, 1, s)) < 0.8)
        if rng.random() < 0.5:
            n = rng.integers(0, s + 1, b)
            m = torch.from_numpy(np.arange(s)[None, None, None] < n[:, None, None, None])
        rows = m[:, 0, -1].numpy()
        lens = rows.sum(-1)
        prefix = all(r[:k].all() and not r[k:].any() for r, k in zip(rows, lens))
        want = tuple(int(k) for k in lens) if prefix and lens.min() > 0 else False
        assert _visible_lengths(m, b, s) == want


def test_a_decode_step_that_may_be_differentiated_runs_dense_with_its_gradient() -> None:
    """Eval mode with grad mode on and weights that require grad: the step runs the fallback (counted)
    and the weights get the dense step's gradient; under no_grad the same step is sparse."""
    attn, rope = _attention(7)
    wrapped, state = _topk(attn, k=1)
    xs = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    grads = []
    for layer in (attn, wrapped):
        cache = DynamicCache()
        with torch.no_grad():
            layer(xs[:, :5], rope(xs, pos[:, :5]), None, cache)
        layer.zero_grad()
        layer(xs[:, 5:], rope(xs, pos[:, 5:]), None, cache)[0].square().sum().backward()
        grads.append(layer.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
    assert state.dense_fallbacks == 1 and state.decode_steps == 0
    with torch.no_grad():
        cache = DynamicCache()
        wrapped(xs[:, :5], rope(xs, pos[:, :5]), None, cache)
        wrapped(xs[:, 5:], rope(xs, pos[:, 5:]), None, cache)
    assert state.decode_steps == 1
