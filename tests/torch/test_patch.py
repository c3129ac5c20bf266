"""patch_model on a tiny transformers LLaMA built from a config (no downloads): generation through
``model.generate``, token equality with the dense model when k covers the context, closeness below."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from sparsecore import models  # noqa: E402
from sparsecore.torch.attention import TopKDecode, topk_decode_layers  # noqa: E402
from sparsecore.torch.modules import SparseGatedMLP, total_l1  # noqa: E402
from sparsecore.torch.patch import patch_model  # noqa: E402


def _model(act: str = "relu", attn: str = "sdpa", qk_scale: float = 1.0, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, hidden_act=act,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    if qk_scale != 1.0:  # peaked attention, as in a trained model, so that a few keys carry the mass
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model


def test_cache_kwargs_decode_step_without_deprecated_arguments() -> None:
    """``models.cache_kwargs`` / ``output_cache`` pass a KV cache by the installed transformers' public
    keyword: a decode step warns of nothing deprecated (``past_key_values`` goes in transformers 5.40)
    and equals the full forward's last logits."""
    import warnings

    model = _model()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cache = models.output_cache(model(ids[:, :-1], use_cache=True))
        step = model(ids[:, -1:], use_cache=True, **models.cache_kwargs(model, cache)).logits[0, -1]
        full = model(ids).logits[0, -1]
    deprecated = [str(w.message) for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and ("past_key_values" in str(w.message) or "cache" in str(w.message).lower())]
    assert not deprecated, deprecated
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def _generate(model: LlamaForCausalLM, ids: torch.Tensor, n: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def _decode_logits(model: LlamaForCausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of the last ``n`` positions, each computed by a one-token decode step (teacher forced)."""
    cache = models.cache_kwargs(model, DynamicCache())  # ``cache`` or ``past_key_values``, by version
    with torch.no_grad():
        model(ids[:, :-n], use_cache=True, **cache)
        return torch.stack([model(ids[:, t:t + 1], use_cache=True, **cache).logits[:, -1]
                            for t in range(ids.shape[1] - n, ids.shape[1])])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_k_over_context_equals_dense(attn: str) -> None:
    dense = _model(attn=attn)
    patched = patch_model(copy.deepcopy(dense), ffn=True, decode=dict(k=64, sink=2, window=4))
    ids = torch.randint(1, 128, (2, 20))
    want, got = _generate(dense, ids), _generate(patched, ids)
    assert got.shape == (2, 32) and torch.equal(got, want)
    layer = patched.model.layers[0]
    assert isinstance(layer.mlp, SparseGatedMLP) and isinstance(layer.self_attn.sparsecore_decode, TopKDecode)
    assert type(layer.self_attn) is type(dense.model.layers[0].self_attn)  # the module is not replaced
    assert patched.config._attn_implementation == f"sparsecore_{attn}"
    state = layer.self_attn.sparsecore_decode
    assert state.decode_steps == 11 and state.dense_fallbacks == 0
    assert state.read_fraction == pytest.approx(1.0)
    assert 0 < float(layer.mlp.density) < 1
    assert list(topk_decode_layers(patched)) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.mark.parametrize("method", ["exact", "quest"])
def test_generate_decode_only_patch(method: str) -> None:
    dense = _model(act="silu")  # decode patch alone keeps the model's own MLP
    opts = dict(page_size=4) if method == "quest" else {}
    patched = patch_model(copy.deepcopy(dense), decode=dict(k=1000, method=method, **opts))
    assert patched.config.hidden_act == "silu" and patched.sparsecore_patch["ffn"] == []
    ids = torch.randint(1, 128, (1, 9))
    assert torch.equal(_generate(patched, ids), _generate(dense, ids))


def test_ffn_patch_refuses_to_change_a_silu_model_silently() -> None:
    silu = _model(act="silu")
    with pytest.raises(ValueError, match=r"^patch_model: hidden_act = 'silu'; ffn=True keeps a model's function only "
                                         r"when hidden_act is 'relu'.*ffn=dict\(act='relu'\)"):
        patch_model(silu, ffn=True, decode=dict(k=4))
    with pytest.raises(ValueError, match=r"^patch_model: ffn act = 'gelu'; allowed: relu"):
        patch_model(silu, ffn=dict(act="gelu"))
    assert silu.config.hidden_act == "silu" and silu.config._attn_implementation == "sdpa"  # nothing changed
    assert not isinstance(silu.model.layers[0].mlp, SparseGatedMLP)
    assert not hasattr(silu.model.layers[0].self_attn, "sparsecore_decode")


def test_ffn_patch_with_explicit_relu_equals_relu_twin_of_a_silu_model() -> None:
    silu = _model(act="silu")
    relu = copy.deepcopy(silu)
    for layer in relu.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    patched = patch_model(copy.deepcopy(silu), ffn=dict(tile=64, capacity=4, act="relu"))
    assert patched.config.hidden_act == "relu"
    assert patched.sparsecore_patch["ffn"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    ids = torch.randint(1, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, relu(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(_generate(patched, ids, 6), _generate(relu, ids, 6))


def test_smaller_k_stays_close_and_reads_fewer_keys() -> None:
    dense = _model(qk_scale=16.0)
    patched = patch_model(copy.deepcopy(dense), decode=dict(k=16, sink=4, window=8, shared=False))
    ids = torch.randint(1, 128, (2, 112))
    want, got = _decode_logits(dense, ids, 8), _decode_logits(patched, ids, 8)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.05, rel
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9
    assert patched.model.layers[1].self_attn.sparsecore_decode.read_fraction < 0.3  # 28 of about 108 keys
    out = _generate(patched, ids[:, :40], 6)  # and generate runs with a k below the context
    assert out.shape == (2, 46)


def test_patched_model_keeps_state_dict_and_trains() -> None:
    dense = _model()
    patched = patch_model(copy.deepcopy(dense), ffn=True, decode=dict(k=4))
    assert list(patched.state_dict()) == list(dense.state_dict())
    patched.load_state_dict(dense.state_dict())
    patched.train()
    ids = torch.randint(1, 128, (2, 10))
    out = patched(ids, labels=ids)
    loss = out.loss + 1e-3 * total_l1(patched)
    loss.backward()
    assert patched.model.layers[0].mlp.gate_proj.weight.grad is not None
    assert patched.model.layers[0].self_attn.sparsecore_decode.decode_steps == 0  # training runs the dense attention


def test_left_padded_batch_falls_back_to_dense_and_matches() -> None:
    """Left padding hides keys: those decode steps run the fallback (counted), tokens equal dense."""
    dense = _model(attn="eager")
    patched = patch_model(copy.deepcopy(dense), decode=dict(k=2))
    ids = torch.randint(1, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        want = dense.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        got = patched.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    state = patched.model.layers[0].self_attn.sparsecore_decode
    assert state.dense_fallbacks == 3 and state.decode_steps == 0


def test_static_cache_generation_with_k_over_context_equals_dense() -> None:
    """A static cache hands the attention its whole buffer with a mask showing the filled prefix:
    the decode steps read only that prefix."""
    dense = _model()
    patched = patch_model(copy.deepcopy(dense), decode=dict(k=1000, method="quest", page_size=4))
    ids = torch.randint(1, 128, (1, 9))
    with torch.no_grad():
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
        want, got = dense.generate(ids, **kw), patched.generate(ids, **kw)
    assert torch.equal(got, want)
    state = patched.model.layers[0].self_attn.sparsecore_decode
    assert state.decode_steps + state.dense_fallbacks == 4 and state.decode_steps > 0


def test_patch_model_argument_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"^patch_model: nothing to do"):
        patch_model(model)
    with pytest.raises(ValueError, match=r"^patch_model: decode needs k"):
        patch_model(model, decode=dict(method="quest"))
    with pytest.raises(ValueError, match=r"^patch_model: ffn has unknown keys \['tiles'\]"):
        patch_model(model, ffn=dict(tiles=4))
    with pytest.raises(TypeError, match=r"^patch_model: decode = 8; expected True, False, None or a dict"):
        patch_model(model, decode=8)
    with pytest.raises(ValueError, match=r"^patch_model: ffn was requested but Sequential has no LLaMA-style MLP"):
        patch_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), ffn=True)
    assert isinstance(model.model.layers[0].mlp, transformers.models.llama.modeling_llama.LlamaMLP)  # untouched


def test_generation_speed_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "generate_patched.py"
    monkeypatch.setattr("sys.argv", [str(script), "--hidden", "64", "--intermediate", "256", "--layers", "1",
                                     "--heads", "4", "--kv-heads", "2", "--vocab", "128", "--context", "40",
                                     "--new-tokens", "3", "--k", "8", "--repeat", "1"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "dense    prefill" in out and "patched  prefill" in out and "tokens/s" in out and "speedup" in out
