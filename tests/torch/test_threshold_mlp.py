"""Training-free threshold sparsity for gated MLPs of any activation: ThresholdSparseMLP,
calibrate_thresholds / save / load, patch_model(ffn=dict(mode="threshold", ...)). Tiny random models;
the real model is in tests/real_model."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

from sparsecore.torch.modules import (  # noqa: E402
    ThresholdSparseMLP,
    calibrate_thresholds,
    ffn_sparsity_stats,
    load_thresholds,
    save_thresholds,
)
from sparsecore.torch.patch import patch_model  # noqa: E402


def _model(act="silu", layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act=act)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("threshold", [0.0, 0.01, 0.05])
@pytest.mark.parametrize("capacity", [None, 4])  # 4: most entries go to the overflow
def test_threshold_mlp_is_the_masked_dense_mlp(act, threshold, capacity):
    torch.manual_seed(1)
    dense = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=160, hidden_act=act))
    mlp = ThresholdSparseMLP.from_dense(dense, threshold=threshold, tile=32, capacity=capacity)
    assert mlp.gate_proj is dense.gate_proj and mlp.act_fn is dense.act_fn  # shared, not copied
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        h = dense.act_fn(dense.gate_proj(x)) * dense.up_proj(x)
        keep = h.abs() > threshold
        want = dense.down_proj(h * keep)
        got = mlp(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(mlp.last_density) == pytest.approx(float(keep.float().mean()))
    density = float(mlp.last_density)  # inference on the host: threshold_spmm, counted apart
    got_packed = mlp(x.clone().requires_grad_())  # the differentiable path: pack, then spmm
    torch.testing.assert_close(got_packed.detach(), got, atol=1e-5, rtol=1e-5)
    assert float(mlp.last_density) == density
    if threshold == 0:
        torch.testing.assert_close(got, dense(x), atol=1e-5, rtol=1e-5)
    else:
        assert float(mlp.sparsity) > 0.05


def test_threshold_mlp_errors():
    dense = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=160, hidden_act="silu"))
    with pytest.raises(ValueError, match=r"ThresholdSparseMLP: threshold = -1; must be a finite number >= 0"):
        ThresholdSparseMLP.from_dense(dense, threshold=-1)
    with pytest.raises(ValueError, match=r"ThresholdSparseMLP: tile = 48; must be a power of two >= 2"):
        ThresholdSparseMLP.from_dense(dense, tile=48)
    with pytest.raises(ValueError, match=r"ThresholdSparseMLP: capacity = 300; must be an int in \[1, tile = 256\]"):
        ThresholdSparseMLP.from_dense(dense, capacity=300)
    mlp = ThresholdSparseMLP.from_dense(dense)
    with pytest.raises(ValueError, match=r"ThresholdSparseMLP: x has shape \(2, 5\); expected \[\.\.\., 32\]"):
        mlp(torch.randn(2, 5))


def test_calibration_hits_the_target_on_its_own_tokens_and_round_trips(tmp_path):
    model = _model()
    ids = torch.randint(0, 96, (3, 40))
    cals = calibrate_thresholds(model, ids, [0.0, 0.3, 0.7])
    assert [c["sparsity"] for c in cals] == [0.0, 0.3, 0.7] and all(c["tokens"] == 120 for c in cals)
    assert set(cals[1]["thresholds"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all(v == 0.0 for v in cals[0]["thresholds"].values())
    assert all(a < b for a, b in zip(cals[1]["thresholds"].values(), cals[2]["thresholds"].values()))
    assert calibrate_thresholds(model, ids, 0.3) == cals[1]  # one pass or several: the same
    save_thresholds(cals[2], tmp_path / "t.json")
    assert load_thresholds(tmp_path / "t.json") == cals[2]
    patched = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", thresholds=tmp_path / "t.json"))
    with torch.no_grad():
        patched(ids)
    stats = ffn_sparsity_stats(patched)
    assert set(stats) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for s in stats.values():  # the calibration tokens themselves: the target, up to ties
        assert 1 - s["density"] == pytest.approx(0.7, abs=0.01)
    assert patched.config.hidden_act == "silu"


def test_patch_threshold_mode_calibrates_inline_and_keeps_state_dict():
    model = _model()
    ids = torch.randint(0, 96, (2, 24))
    keys = list(model.state_dict())
    patched = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", sparsity=0.5, calibration=ids, tile=64))
    assert list(patched.state_dict()) == keys
    assert patched.sparsecore_patch["ffn"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    mlp = patched.model.layers[0].mlp
    assert isinstance(mlp, ThresholdSparseMLP) and mlp.tile == 64 and mlp.expected_sparsity == 0.5
    exact = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", sparsity=0))
    with torch.no_grad():
        torch.testing.assert_close(exact(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # patching twice does not wrap a ThresholdSparseMLP again
    with pytest.raises(ValueError, match=r"ffn was requested but LlamaForCausalLM has no LLaMA-style MLP"):
        patch_model(patched, ffn=dict(mode="threshold", sparsity=0))


def test_patch_threshold_mode_errors(tmp_path):
    model = _model()
    ids = torch.randint(0, 96, (1, 16))
    cal = calibrate_thresholds(model, ids, 0.5)
    cases = [
        (dict(mode="threshold", sparsity=0.5), r"ffn sparsity = 0.5 needs per-layer thresholds"),
        (dict(mode="threshold"), r"ffn mode='threshold' needs thresholds="),
        (dict(mode="threshold", sparsity=1.0), r"ffn sparsity = 1.0; must be a number in \[0, 1\)"),
        (dict(mode="threshold", thresholds=cal, sparsity=0.3),
         r"ffn sparsity = 0.3 but the thresholds were calibrated for sparsity = 0.5"),
        (dict(mode="threshold", thresholds=cal, calibration=ids), r"ffn has both thresholds and calibration"),
        (dict(mode="threshold", thresholds={"model.layers.0.mlp": 0.1}),
         r"ffn thresholds do not match the model's MLPs: missing \['model.layers.1.mlp'\] \(1\), unknown \[\] \(0\)"),
        (dict(mode="threshold", thresholds={"model.layers.0.mlp": -0.1, "model.layers.1.mlp": 0.1}),
         r"thresholds\['model.layers.0.mlp'\]: threshold = -0.1; must be a finite number >= 0"),
        (dict(mode="threshold", threshold=0.1), r"ffn keys \['threshold'\] do not apply to mode = 'threshold'"),
        (dict(mode="relu", sparsity=0.5), r"ffn keys \['sparsity'\] do not apply to mode = 'relu'"),
        (dict(mode="topk"), r"ffn mode = 'topk'; allowed: 'relu', 'threshold'"),
        (dict(mode="threshold", thresholds=3), r"ffn thresholds = int; expected a calibrate_thresholds result"),
    ]
    for ffn, msg in cases:
        m = copy.deepcopy(model)
        with pytest.raises((ValueError, TypeError), match=msg):
            patch_model(m, ffn=ffn)
        assert not any(isinstance(x, ThresholdSparseMLP) for x in m.modules())  # nothing changed
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match=r"load_thresholds\(.*bad.json\): expected a dict with format = "
                                         r"'sparsecore-ffn-thresholds'"):
        patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", thresholds=str(tmp_path / "bad.json")))
    with pytest.raises(ValueError, match=r"calibrate_thresholds: sparsity = 1.5; must be a number in \[0, 1\)"):
        calibrate_thresholds(model, ids, 1.5)
    with pytest.raises(ValueError, match=r"calibrate_thresholds: ids has dtype torch.float32"):
        calibrate_thresholds(model, ids.float(), 0.5)


def test_silu_error_lists_threshold_mode():
    with pytest.raises(ValueError, match=r"hidden_act = 'silu'.*ffn=dict\(mode='threshold', sparsity=s, "
                                         r"thresholds=calibrate_thresholds\(model, ids, s\)\).*ffn=dict\(act='relu'\)"):
        patch_model(_model(), ffn=True)


@pytest.mark.parametrize("input_threshold", [0.3, 0.8])
def test_input_sparsity_is_the_masked_input(input_threshold):
    """TEAL's input sparsity: inference reads only the kept inputs' columns of gate/up (spmm over the
    packed x); it equals the dense MLP of the masked x, and so does the differentiable path."""
    torch.manual_seed(2)
    dense = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=160, hidden_act="silu"))
    mlp = ThresholdSparseMLP.from_dense(dense, threshold=0.01, tile=32, input_threshold=input_threshold,
                                        expected_input_sparsity=0.4)
    x = torch.randn(3, 5, 32)
    x[0, 0, 3] = float("nan")  # NaN is kept, as pack keeps it
    with torch.no_grad():
        xm = torch.where(x.abs() <= input_threshold, torch.zeros(()), x)
        h = dense.act_fn(dense.gate_proj(xm)) * dense.up_proj(xm)
        want = dense.down_proj(h * ~(h.abs() <= 0.01))
        got = mlp(x)
    assert torch.isnan(got[0, 0]).all() and not torch.isnan(got[1:]).any()
    torch.testing.assert_close(got[1:], want[1:], atol=1e-5, rtol=1e-5)
    xg = x[1:].clone().requires_grad_()
    out = mlp(xg)  # the differentiable path: the masked input through the dense projections
    torch.testing.assert_close(out.detach(), want[1:], atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert xg.grad is not None and (xg.grad[xg.detach().abs() <= input_threshold] == 0).all()
    assert "input_threshold=" in repr(mlp)
    with pytest.raises(ValueError, match=r"ThresholdSparseMLP: input: threshold = -0.5"):
        ThresholdSparseMLP.from_dense(dense, input_threshold=-0.5)


def test_patch_with_input_sparsity_calibrates_both():
    model = _model()
    ids = torch.randint(0, 96, (2, 24))
    cal = calibrate_thresholds(model, ids, 0.5, input_sparsity=0.3)
    assert cal["input_sparsity"] == 0.3 and set(cal["input_thresholds"]) == set(cal["thresholds"])
    assert all(v > 0 for v in cal["input_thresholds"].values())
    patched = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", sparsity=0.5, input_sparsity=0.3,
                                                         calibration=ids))
    mlp = patched.model.layers[0].mlp
    assert mlp.input_threshold == pytest.approx(cal["input_thresholds"]["model.layers.0.mlp"])
    same = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", thresholds=cal))
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, patched(ids).logits)
    with pytest.raises(ValueError, match=r"input_sparsity = 0.3 needs input thresholds"):
        patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", input_sparsity=0.3,
                                                   thresholds=calibrate_thresholds(model, ids, 0.5)))
    with pytest.raises(ValueError, match=r"input_sparsity = 0.2 but the thresholds were calibrated for "
                                         r"input_sparsity = 0.3"):
        patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", input_sparsity=0.2, thresholds=cal))
    with pytest.raises(ValueError, match=r"calibrate_thresholds: input_sparsity = 1.5"):
        calibrate_thresholds(model, ids, 0.5, input_sparsity=1.5)


@pytest.mark.parametrize("act", ["silu", "relu", "gelu"])
def test_input_sparse_decode_step_is_one_fused_call_and_matches(act, monkeypatch):
    """With input sparsity, a SiLU or ReLU MLP's host inference is one threshold_mlp call (found by
    evaluating act_fn); GELU keeps the two threshold_spmm calls. Both give the masked dense MLP,
    and the density statistics count the same entries."""
    import sparsecore as sc

    torch.manual_seed(3)
    dense = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=160, hidden_act=act))
    mlp = ThresholdSparseMLP.from_dense(dense, threshold=0.02, input_threshold=0.5)
    calls = []
    real = sc.threshold_mlp
    monkeypatch.setattr(sc, "threshold_mlp", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        xk = torch.where(x.abs() <= 0.5, torch.zeros(()), x)
        h = dense.act_fn(dense.gate_proj(xk)) * dense.up_proj(xk)
        keep = h.abs() > 0.02
        want = dense.down_proj(h * keep)
        got = mlp(x)
    assert calls == ([] if act == "gelu" else [act])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(mlp.last_density) == pytest.approx(float(keep.float().mean()))


def test_weights_that_require_grad_get_their_gradients():
    """Grad mode with weights that require grad (an input that does not): the differentiable path,
    so no weight's gradient is dropped, with or without input sparsity."""
    for t_in in (0.0, 0.5):
        torch.manual_seed(4)
        dense = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=160, hidden_act="silu"))
        mlp = ThresholdSparseMLP.from_dense(dense, threshold=0.02, input_threshold=t_in)
        mlp(torch.randn(3, 32)).square().sum().backward()
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0, (t_in, lin)
