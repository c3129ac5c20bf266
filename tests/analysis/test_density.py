"""Computation density over inputs: statistics, windows, the study on tiny random models, and the plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")

from sparsecore.analysis import plots  # noqa: E402
from sparsecore.analysis.density import (  # noqa: E402
    density_study,
    edges_needed,
    loglog_slope,
    permutation_test,
    rankdata,
    spearman,
    windows_from_text,
)

FRACTIONS = (1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8)
N_LAYERS, N_HEADS = 2, 4


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=128, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, num_key_value_heads=2, hidden_act="relu",
                      initializer_range=0.2)        # peaked outputs: the empty graph is far from the full one
    return LlamaForCausalLM(cfg).eval()


def n_edges_formula(c: int, n_layers: int = N_LAYERS, n_heads: int = N_HEADS) -> int:
    """Per layer: one attention edge per head and pair s <= t, plus per token one MLP and two residual edges."""
    return n_layers * (n_heads * c * (c + 1) // 2 + 3 * c)


# ----------------------------------------------------------------------------------------------------- statistics
def test_rankdata_average_ties():
    assert rankdata([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    np.testing.assert_array_equal(rankdata([3, 1, 2, 1]), scipy_stats.rankdata([3, 1, 2, 1]))


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    xt = rng.integers(0, 4, size=n).astype(float)          # heavy ties in both
    yt = rng.integers(0, 3, size=n).astype(float) + 0.3 * xt
    if len(set(xt)) > 1 and len(set(yt)) > 1:
        assert spearman(xt, yt) == pytest.approx(scipy_stats.spearmanr(xt, yt).statistic, abs=1e-12)


def test_spearman_monotone_constant_and_errors():
    x = np.linspace(-3, 5, 17)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x ** 3) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones_like(x)))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2, 3], [1, 2])


def test_permutation_test():
    x = np.arange(10.0)
    r = permutation_test(x, x ** 2, n_perm=500, seed=1)
    assert r["rho"] == pytest.approx(1.0) and r["n"] == 10 and r["p"] < 0.01
    rng = np.random.default_rng(0)
    r = permutation_test(rng.normal(size=30), rng.normal(size=30), n_perm=500, seed=1)
    assert -1 <= r["rho"] <= 1 and 1 / 501 <= r["p"] <= 1
    assert permutation_test(x, x, n_perm=200, seed=3) == permutation_test(x, x, n_perm=200, seed=3)
    assert math.isnan(permutation_test(x, np.zeros(10))["p"])


def test_loglog_slope_and_edge_count_arithmetic():
    c = np.array([16, 32, 64, 128])
    assert loglog_slope(c, 3.0 * c ** 2) == pytest.approx(2.0)
    assert loglog_slope(c, 5.0 * c) == pytest.approx(1.0)
    assert loglog_slope(c, [10, float("inf"), 40, 80]) == pytest.approx(1.0)    # inf points are dropped
    assert math.isnan(loglog_slope([16, 32], [10, float("inf")]))
    # the graph's edge count: attention (quadratic in c) dominates when heads x layers is large ...
    big = [n_edges_formula(int(k), n_layers=16, n_heads=32) for k in c]
    assert 1.95 < loglog_slope(c, big) < 2.0
    # ... and with 4 heads at c = 12, 24 the linear MLP/residual edges pull it to log2(2544 / 696) = 1.870
    assert n_edges_formula(12) == 696 and n_edges_formula(24) == 2544
    assert loglog_slope([12, 24], [696, 2544]) == pytest.approx(math.log2(2544 / 696))
    assert loglog_slope([12, 24], [696, 2544]) == pytest.approx(1.8699, abs=1e-4)


def test_edges_needed_interpolation():
    sizes = [10, 100, 1000]
    # first reaches 0.1 between 100 (TV 0.3) and 1000 (TV 0.05): 0.8 of the way in log size
    assert edges_needed(sizes, [0.5, 0.3, 0.05]) == pytest.approx(10 ** 2.8)
    assert edges_needed(sizes, [0.05, 0.3, 0.01]) == 10.0
    assert edges_needed(sizes, [0.5, 0.3, 0.2]) == math.inf
    assert edges_needed(sizes, [0.5, 0.1, 0.0]) == pytest.approx(100.0)
    assert edges_needed(sizes, [0.05, 0.01, 0.0], empty_tv=0.08) == 0.0
    assert edges_needed(sizes, [0.05, 0.01, 0.0], empty_tv=0.3) == 10.0


# -------------------------------------------------------------------------------------------------------- windows
def test_windows_from_text():
    data = bytes(range(100))
    w = windows_from_text(data, 3, 10)
    assert w.dtype == torch.long and w.shape == (3, 10)
    assert w[:, 0].tolist() == [0, 45, 90] and w[2].tolist() == list(range(90, 100))
    r = windows_from_text(data, 5, 10, seed=3, random=True)
    assert r.shape == (5, 10) and len(set(r[:, 0].tolist())) == 5
    assert torch.equal(r, windows_from_text(data, 5, 10, seed=3, random=True))
    assert torch.all(r[:, 1:] - r[:, :-1] == 1)


def test_windows_from_text_errors():
    with pytest.raises(ValueError, match=r"windows_from_text: data is too short: 5 bytes.*length = 10"):
        windows_from_text(b"hello", 1, 10)
    with pytest.raises(ValueError, match=r"data is too short.*n = 20"):
        windows_from_text(bytes(20), 20, 10)
    with pytest.raises(ValueError, match="length = 0"):
        windows_from_text(bytes(20), 1, 0)
    with pytest.raises(TypeError, match="data must be bytes"):
        windows_from_text("some text", 1, 2)


# ---------------------------------------------------------------------------------------------------------- study
@pytest.fixture(scope="module")
def study():
    torch.set_num_threads(1)
    text = b"the quick brown fox jumps over the lazy dog. " * 4
    windows = windows_from_text(text, 3, 24)
    counts = np.bincount(np.frombuffer(text, dtype=np.uint8), minlength=256)
    models = {"a": tiny_model(0), "b": tiny_model(1)}
    return density_study(models, windows, corpus_counts=counts, context_lengths=(12, 24), fractions=FRACTIONS,
                         n_perm=200)


def test_study_keys_and_values(study):
    json.dumps(study, allow_nan=False)                      # strictly JSON-able
    for k in ("n_inputs", "n_tokens", "fractions", "context_lengths", "tv_threshold", "models", "cross_model",
              "corpus_counts_source", "seconds"):
        assert k in study
    assert study["n_inputs"] == 3 and study["n_tokens"] == 24 and study["context_lengths"] == [12, 24]
    assert set(study["models"]) == {"a", "b"}
    for m in study["models"].values():
        assert len(m["inputs"]) == 3
        for r in m["inputs"]:
            assert 0.0 <= r["density"] <= 1.0 and r["entropy"] > 0 and 0 <= r["predicted"] < 256
            assert 0.0 <= r["predicted_freq"] <= 1.0
            assert r["n_edges"] == n_edges_formula(24)
            assert [x["c"] for x in r["context"]] == [12, 24]
            assert [x["n_edges"] for x in r["context"]] == [n_edges_formula(12), n_edges_formula(24)]
            assert r["context"][1]["density"] == r["density"]      # c = T reuses the full trace
            assert r["empty_tv"] > 0.1                              # so edges needed is not trivially 0
            for x in r["context"]:
                assert x["edges_needed"] is None or 1 <= x["edges_needed"] <= x["n_edges"]
            assert r["edges_needed"] == r["context"][1]["edges_needed"]
        d = m["density"]
        assert d["n"] == 3 and sum(d["hist"]["counts"]) == 3 and math.isfinite(d["mean"])
        assert d["quantiles"]["0"] <= d["quantiles"]["0.5"] <= d["quantiles"]["1"]
        assert -1.0 <= m["correlations"]["density_entropy"]["rho"] <= 1.0     # both vary: a finite rho
        for c in m["correlations"].values():
            assert c["n"] == 3
            assert c["rho"] is None or -1.0 <= c["rho"] <= 1.0
            assert c["p"] is None or 0.0 < c["p"] <= 1.0
        ctx = m["context"]
        assert ctx["lengths"] == [12, 24] and ctx["slope_n_edges"] == pytest.approx(math.log2(2544 / 696))
        assert len(ctx["density_mean"]) == 2 and all(0 <= v <= 1 for v in ctx["density_mean"])
        for method in ("strace", "random", "complement_sample", "complement"):
            for metric in ("tv", "top1", "top_p"):
                cur = m["curves"][method][metric]
                assert len(cur["mean"]) == len(FRACTIONS)
                assert all(lo <= hi + 1e-12 for lo, hi in zip(cur["q25"], cur["q75"]))
                assert all(0.0 <= v <= 1.0 + 1e-12 for v in cur["mean"])
        assert len(m["composition"]) == len(FRACTIONS)
        for comp in m["composition"]:
            assert sum(comp.values()) == pytest.approx(1.0)
    assert len(study["cross_model"]) == 1
    cm = study["cross_model"][0]
    assert (cm["a"], cm["b"], cm["n"]) == ("a", "b", 3)
    assert cm["rho"] is None or -1.0 <= cm["rho"] <= 1.0


def test_study_strace_beats_random(study):
    """The traced subgraph should be closer to the full output than a random one of the same size (on average)."""
    for m in study["models"].values():
        st = np.mean(m["curves"]["strace"]["tv"]["mean"])
        rnd = np.mean(m["curves"]["random"]["tv"]["mean"])
        assert st < rnd


def test_study_errors():
    m = {"a": tiny_model(0)}
    w = windows_from_text(bytes(range(64)), 2, 16)
    with pytest.raises(ValueError, match=r"context_lengths = \(8, 32\)"):
        density_study(m, w, context_lengths=(8, 32))
    with pytest.raises(TypeError, match="windows must be a 2-D"):
        density_study(m, w[0], context_lengths=(8,))
    with pytest.raises(ValueError, match="corpus_counts"):
        density_study(m, w, corpus_counts=np.ones(10), context_lengths=(8,))
    with pytest.raises(ValueError, match="models is empty"):
        density_study({}, w, context_lengths=(8,))


# ---------------------------------------------------------------------------------------------------------- plots
def test_plots_write_pngs(study, tmp_path):
    paths = plots.plot_all(study, tmp_path / "study")
    assert len(paths) == 7
    single = {"a": tiny_model(0)}
    from sparsecore.analysis.strace import trace_input
    trace = trace_input(single["a"], torch.arange(10) + 60, fractions=FRACTIONS).to_json()
    paths = list(paths.values()) + [
        plots.plot_tv_curves(trace, tmp_path / "one_tv.png"),
        plots.plot_top_p([trace, trace], tmp_path / "two_top_p.png"),
        plots.plot_composition(trace, tmp_path / "one_comp.png"),
        plots.plot_cross_model({**study, "cross_model": []}, tmp_path / "no_cross.png"),
    ]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError, match="plot_density_hist"):
        plots.plot_density_hist(trace, tmp_path / "bad.png")
