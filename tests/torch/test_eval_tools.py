"""The measuring tools of examples/eval_selection.py and examples/eval_smollm2.py on a tiny LLaMA
built from a config (no downloads): the dense-attention oracle selections, sparsifying some layers
only, and the decode step's time breakdown (its timers fire, add up and are removed after)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402

from sparsecore import models  # noqa: E402
from sparsecore.torch.patch import patch_model  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked attention, so that a small k changes the output
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@torch.no_grad()
def _decode_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    out = model(ids[:, :-steps], use_cache=True)
    cache, logits = models.output_cache(out), []
    for t in range(ids.shape[1] - steps, ids.shape[1]):
        out = model(ids[:, t:t + 1], use_cache=True, **models.cache_kwargs(model, cache))
        cache = models.output_cache(out)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("criterion", ["mass", "max mass", "value-weighted mass", "per-head mass"])
def test_oracle_covering_every_key_is_dense_and_a_small_one_is_not(criterion: str) -> None:
    ev = _load("eval_selection")
    model = _model()
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    dense = _decode_logits(model, ids, 4)
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    states = ev.set_decode(patched, dict(k=64), oracle=criterion)
    assert len(states) == 3 and all(isinstance(s, ev.Oracle) for s in states)
    torch.testing.assert_close(_decode_logits(patched, ids, 4), dense, rtol=1e-4, atol=1e-4)
    assert all(s.decode_steps == 4 and s.mass == pytest.approx(1.0) for s in states)
    states = ev.set_decode(patched, dict(k=3), oracle=criterion)
    small = _decode_logits(patched, ids, 4)
    assert not torch.allclose(small, dense, atol=1e-3)
    rows = 6 if criterion == "per-head mass" else 2  # query heads, or KV groups
    # 3 keys per row and sequence at each of the 4 steps; the cache holds 44 + step keys
    assert all(s.keys_read == 4 * 2 * rows * 3 for s in states)
    assert all(s.keys_total == 2 * rows * sum(44 + i for i in range(1, 5)) for s in states)
    assert all(0 < s.mass < 1 for s in states)


def test_oracle_mass_keeps_the_most_mass_of_any_shared_choice() -> None:
    ev = _load("eval_selection")
    model = _model(seed=3)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    kept = {}
    for criterion in ("mass", "max mass", "value-weighted mass"):
        # the first layer sparse and one step: every criterion sees the same queries and keys
        states = ev.set_decode(patched, dict(k=4), oracle=criterion, layers={0})
        _decode_logits(patched, ids, 1)
        kept[criterion] = states[0].mass
    # the group-mean mass ranking maximises the mean kept mass over the group's heads, by construction
    assert kept["mass"] >= kept["max mass"] - 1e-6 and kept["mass"] >= kept["value-weighted mass"] - 1e-6


def test_set_decode_layers_sparsifies_only_those() -> None:
    ev = _load("eval_selection")
    model = _model()
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    states = ev.set_decode(patched, dict(k=2), layers={1})
    assert len(states) == 1
    _decode_logits(patched, ids, 2)
    layers = [m.sparsecore_decode for m in patched.modules() if hasattr(m, "sparsecore_decode")]
    assert [s.enabled for s in layers] == [False, True, False]
    assert [s.decode_steps for s in layers] == [0, 2, 0]


def test_oracle_tail_mean_is_dense_over_every_key_and_differs_from_renormalising() -> None:
    ev = _load("eval_selection")
    model = _model()
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(6))
    dense = _decode_logits(model, ids, 3)
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    ev.set_decode(patched, dict(k=64), oracle="mass" + ev.TAIL)
    torch.testing.assert_close(_decode_logits(patched, ids, 3), dense, rtol=1e-4, atol=1e-4)
    ev.set_decode(patched, dict(k=3), oracle="mass" + ev.TAIL)
    tail = _decode_logits(patched, ids, 3)
    ev.set_decode(patched, dict(k=3), oracle="mass")
    renorm = _decode_logits(patched, ids, 3)
    assert not torch.allclose(tail, dense, atol=1e-3) and not torch.allclose(tail, renorm, atol=1e-3)


def test_mass_curve_decodes_densely_and_records_sorted_masses() -> None:
    ev = _load("eval_selection")
    model = _model(seed=5)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(7))
    dense = _decode_logits(model, ids, 3)
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    curves = []
    for m in patched.modules():
        if hasattr(m, "sparsecore_decode"):
            m.sparsecore_decode = ev.MassCurve(64)
            curves.append(m.sparsecore_decode)
    torch.testing.assert_close(_decode_logits(patched, ids, 3), dense, rtol=1e-4, atol=1e-4)
    for mc in curves:
        assert mc.rows == 3 * 2 * 2  # steps x sequences x KV groups
        c = mc.curve / mc.rows
        assert (c[:-1] >= c[1:] - 1e-12).all() and float(c.sum()) == pytest.approx(1.0)  # every key: all mass
        assert float(c[40:].abs().max()) == 0.0  # at most 37 + 3 keys in the cache


@pytest.mark.parametrize("rule", ["greedy", "cover"])
def test_layer_budgets_keep_the_mean_and_bounds(rule: str) -> None:
    ev = _load("eval_selection")
    model = _model(seed=2)
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(8))
    budgets = ev.layer_budgets(model, ids, 6, 4, 24, 2, rule)
    assert len(budgets) == 3 and all(2 <= k <= 24 for k in budgets)
    assert sum(budgets) <= 3 * 6 and (rule == "cover" or sum(budgets) == 3 * 6)
    assert len(set(budgets)) > 1  # the layers' attention differs: so do their budgets
    patched = patch_model(copy.deepcopy(model), decode=dict(k=1))
    states = ev.set_decode(patched, dict(k=6), budgets=budgets)
    assert [s.k for s in states] == budgets


@pytest.mark.parametrize("variant", ["dense", "decode", "both"])
def test_step_breakdown_times_every_part_and_removes_its_timers(variant: str) -> None:
    from sparsecore.torch.modules import calibrate_thresholds

    ev = _load("eval_smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      hidden_act="silu", attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    if variant == "decode":
        model = patch_model(model, decode=dict(k=8))
    elif variant == "both":
        cal = calibrate_thresholds(model, ids[:, :32], 0.5)
        model = patch_model(model, decode=dict(k=8), ffn=dict(mode="threshold", thresholds=cal))
    linear, mlp_type = torch.nn.Linear.forward, type(model.model.layers[0].mlp)
    mlp_forward, attn = mlp_type.forward, AttentionInterface()[model.config._attn_implementation]
    with torch.no_grad():
        cache = models.output_cache(model(ids[:, :-1], use_cache=True))
        expect = _decode_logits(model, ids, 3)
    ms = ev.step_breakdown(model, cache, ids[:, -1:], 3, warmup=1)
    assert set(ms) == {"linear", "mlp", "attention", "other", "total"}
    assert all(ms[p] > 0 for p in ("linear", "mlp", "attention", "total"))
    assert ms["other"] == pytest.approx(ms["total"] - ms["linear"] - ms["mlp"] - ms["attention"])
    assert ms["linear"] + ms["mlp"] + ms["attention"] <= ms["total"]
    # the timers are gone: the same methods and attention function as before, the same outputs
    assert torch.nn.Linear.forward is linear and mlp_type.forward is mlp_forward
    assert AttentionInterface()[model.config._attn_implementation] is attn
    torch.testing.assert_close(_decode_logits(model, ids, 3), expect)
