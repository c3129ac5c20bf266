"""The compressed-sensing probe (sparsecore.analysis.probe), execution plans (plan) and their figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sparsecore.analysis.hooks import Intervention, Tracer  # noqa: E402
from sparsecore.analysis.plan import ExecutionPlan, next_token_compare, run_plan  # noqa: E402
from sparsecore.analysis.probe import (  # noqa: E402
    default_k,
    omp,
    probe_function,
    probe_model,
    quality,
    recovery_vs_m,
    solve_sparse,
    synthetic_recovery,
)

torch.set_num_threads(1)

BS = 16          # FFN block size of the tiny model: 128 channels -> 8 blocks per layer


def tiny_model(act: str = "relu", seed: int = 0) -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act=act, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> object:
    return tiny_model()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(1))


def planted(rng: np.random.Generator, p: int, k: int) -> np.ndarray:
    x = np.zeros(p)
    x[rng.choice(p, k, replace=False)] = rng.standard_normal(k) + np.sign(rng.standard_normal(k))
    return x


# ------------------------------------------------------------------------------------------------ OMP
def test_omp_recovers_planted_support_above_klogpk() -> None:
    rng = np.random.default_rng(0)
    p, k = 128, 5
    m = int(4 * k * math.log(p / k))                      # 64: well above k ln(p/k) = 16
    for _ in range(10):
        x = planted(rng, p, k)
        A = rng.choice([-1.0, 1.0], size=(m, p)) / math.sqrt(m)
        x_hat = omp(A, A @ x, k=k)
        assert np.array_equal(x_hat != 0, x != 0)
        assert np.allclose(x_hat, x, atol=1e-9)
        assert np.allclose(omp(A, A @ x), x, atol=1e-9)   # no k: runs until y is explained


def test_omp_fails_far_below_klogpk() -> None:
    rng = np.random.default_rng(1)
    p, k, m = 128, 5, 6
    errs = []
    for _ in range(10):
        x = planted(rng, p, k)
        A = rng.choice([-1.0, 1.0], size=(m, p)) / math.sqrt(m)
        errs.append(np.linalg.norm(omp(A, A @ x, k=k) - x) / np.linalg.norm(x))
    assert np.mean(np.asarray(errs) > 0.1) >= 0.8


def test_omp_matches_sklearn_and_stops_on_tol() -> None:
    rng = np.random.default_rng(2)
    A = rng.standard_normal((40, 100))
    A /= np.linalg.norm(A, axis=0)           # scikit-learn selects by |A^T r| unnormalised: same only on unit columns
    y = A @ planted(rng, 100, 6) + 0.01 * rng.standard_normal(40)
    ours = omp(A, y, k=6)
    theirs = solve_sparse(A, y, "sklearn_omp", 6)
    assert np.count_nonzero(ours) == 6
    assert np.allclose(ours, theirs, atol=1e-8)
    loose = omp(A, y, tol=0.5)                             # stops as soon as half of ||y|| is explained
    assert 1 <= np.count_nonzero(loose) < 6
    assert np.linalg.norm(y - A @ loose) <= 0.5 * np.linalg.norm(y)
    assert not omp(A, np.zeros(40), k=3).any()


@pytest.mark.parametrize("call, match", [
    (lambda: omp(np.ones((4, 6)), np.ones(4), k=0), r"omp: k = 0"),
    (lambda: omp(np.ones((4, 6)), np.ones(4), k=5), r"k = 5; allowed 1 <= k <= 4"),
    (lambda: omp(np.ones((4, 6)), np.ones(5)), r"y has shape \(5,\); expected \(4,\)"),
    (lambda: omp(np.ones(6), np.ones(6)), r"A has shape \(6,\)"),
    (lambda: omp(np.ones((4, 6)), np.ones(4), tol=-1.0), r"tol = -1.0"),
    (lambda: omp(np.full((4, 6), np.nan), np.ones(4)), r"A has non-finite"),
    (lambda: solve_sparse(np.ones((4, 6)), np.ones(4), "cosamp"), r"solver = 'cosamp'; allowed"),
    (lambda: synthetic_recovery(10, 11, [5], 1), r"synthetic_recovery: k = 11"),
    (lambda: synthetic_recovery(10, 2, [], 1), r"ms = \[\]"),
    (lambda: synthetic_recovery(10, 2, [5], 0), r"trials = 0"),
    (lambda: probe_function(lambda g: g.sum(1), 5, m=4, delta=0.0), r"delta = 0.0; must be > 0"),
    (lambda: probe_function(lambda g: g.sum(1), 5, m=4, scheme="backward"), r"scheme = 'backward'"),
])
def test_bad_arguments_name_the_argument(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_synthetic_recovery_transition() -> None:
    r = synthetic_recovery(64, 3, [4, 40], trials=8, seed=0, solver=["omp", "sklearn_omp"])
    assert r["klogpk"] == pytest.approx(3 * math.log(64 / 3))
    for s in ("omp", "sklearn_omp"):
        assert r["solvers"][s]["success"][0] <= 0.25 and r["solvers"][s]["success"][1] == 1.0
        assert r["solvers"][s]["rel_err"][1] < 1e-9
    assert r["solvers"]["omp"]["support"] == r["solvers"]["sklearn_omp"]["support"]


def test_probe_function_recovers_planted_linear_support() -> None:
    rng = np.random.default_rng(3)
    p, k = 200, 4
    w = planted(rng, p, k)
    calls = []

    def fn(G: np.ndarray) -> np.ndarray:
        calls.append(G.shape[0])
        return 0.3 + (G - 1.0) @ w + 0.1 * ((G - 1.0) @ w) ** 2   # gradient w at g = 1, with curvature

    x, A, y = probe_function(fn, p, m=40, delta=1e-3, k=k, scheme="central")
    assert A.shape == (40, p) and sum(calls) == 80
    assert np.array_equal(x != 0, w != 0)
    assert np.allclose(x, w, atol=1e-6)


def test_default_k() -> None:
    assert default_k(64, 32) == 32                         # determined: least squares
    k = default_k(40, 200)
    assert 2 * k * math.log(200 / k) <= 40 < 2 * (k + 1) * math.log(200 / (k + 1))


def test_quality_metrics() -> None:
    t = np.array([3.0, -2.0, 0.5, 0.0])
    q = quality(t, t)
    assert q["rel_err"] == 0 and q["cosine"] == pytest.approx(1) and q["top_overlap"] == 1
    q = quality(np.array([0.0, 0.0, 0.0, 1.0]), t)
    assert q["top_overlap"] == 0 and q["cosine"] == 0 and q["best_k_err"] == pytest.approx(
        np.linalg.norm([2.0, 0.5]) / np.linalg.norm(t))


# ------------------------------------------------------------------------------------------------ model probe
def test_probe_with_m_above_p_matches_autograd_gradient(model: object, ids: torch.Tensor) -> None:
    # a small delta: the ReLU FFNs make f only piecewise smooth, so a larger step measures a secant slope
    res = probe_model(model, ids, m=96, ffn_block_size=BS, solver="lstsq", delta=1e-4, scheme="central")
    assert res.p == 2 * 4 + 2 * 8 + 8 and len(res.units) == res.p and res.units[0] == "L0.head0"
    assert res.quality["gradient"]["rel_err"] < 0.03
    assert res.quality["gradient"]["spearman_abs"] > 0.99
    # the knock-outs are separate forwards: zeroing unit j changes the output by about -x[j]
    assert res.quality["knockout"]["spearman_abs"] > 0.5
    assert np.abs(res.knockout).max() > 1e-3
    js = res.to_json()
    assert js["p"] == res.p and len(js["x"]) == res.p and js["target"] == res.target
    assert res.values("head").shape == (2, 4) and res.values("ffn_block", "gradient").shape == (2, 8)


def test_probe_recovers_planted_units_in_a_model(ids: torch.Tensor) -> None:
    """Only heads L0.h1, L1.h3 and FFN blocks L0.b2, L1.b5 reach the residual stream (the other heads' o_proj
    columns and the other blocks' down_proj columns are zero), so the true gradient is 4-sparse in p = 24."""
    mdl = tiny_model(seed=5)
    keep_heads = {(0, 1), (1, 3)}
    keep_blocks = {(0, 2), (1, 5)}
    with torch.no_grad():
        for i, layer in enumerate(mdl.model.layers):
            for h in range(4):
                if (i, h) not in keep_heads:
                    layer.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
            for b in range(8):
                if (i, b) not in keep_blocks:
                    layer.mlp.down_proj.weight[:, b * BS:(b + 1) * BS] = 0
    res = probe_model(mdl, ids, m=16, k=4, ffn_block_size=BS, units=("head", "ffn_block"), delta=1e-2,
                      scheme="central")
    truth = {"L0.head1", "L1.head3", "L0.ffn2", "L1.ffn5"}
    grad_support = {u for u, g in zip(res.units, res.gradient) if g != 0}
    assert grad_support == truth                            # the plant worked
    assert {u for u, v in zip(res.units, res.x) if v != 0} == truth
    assert res.quality["gradient"]["rel_err"] < 0.05
    assert res.quality["gradient"]["top_overlap"] == 1.0


def test_probe_far_below_p_is_worse(model: object, ids: torch.Tensor) -> None:
    r = recovery_vs_m(model, ids, [4, 64], ffn_block_size=BS, delta=1e-4, scheme="central", seeds=(0, 1))
    assert r["p"] == 32 and r["k"][1] == 32 and r["lstsq_full"]["rel_err"] < 0.03
    assert r["gradient"]["rel_err"][1] < 0.05 and r["gradient"]["rel_err"][0] > 0.3


def test_probe_model_bad_arguments(model: object, ids: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="units contains 'heads'"):
        probe_model(model, ids, m=4, ffn_block_size=BS, units=("heads",))
    with pytest.raises(ValueError, match="ffn_block_size = 7 does not divide"):
        probe_model(model, ids, m=4, ffn_block_size=7)
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 8\)"):
        probe_model(model, ids.reshape(1, -1).expand(2, -1), m=4, ffn_block_size=BS)
    with pytest.raises(ValueError, match="probe_model: m = 0"):
        probe_model(model, ids, m=0, ffn_block_size=BS)


# ------------------------------------------------------------------------------------------------ plans
def test_full_plan_reproduces_model_and_empty_plan_differs(model: object, ids: torch.Tensor) -> None:
    full = run_plan(model, ids, ExecutionPlan.full(model, 8, BS), repeats=2)
    assert full["full_tv"] < 1e-4 and full["tv"] < 1e-4 and full["top1"] == 1.0
    assert full["hf_cache_tv"] < 1e-4
    assert all(full[t] > 0 for t in ("time_hf_s", "time_full_s", "time_plan_s"))
    empty = run_plan(model, ids, ExecutionPlan.empty(model, 8, BS), repeats=1)
    assert empty["kept"] == {"heads": 0.0, "ffn_blocks": 0.0, "tokens": 1 / 8}
    assert empty["tv"] > 1e-2


def test_plan_dropping_last_layer_units_matches_tracer(model: object, ids: torch.Tensor) -> None:
    """In the last layer, only the last position's head and FFN outputs reach the logits, so dropping units
    there in the plan equals gating them to 0 in the Tracer (an independent implementation)."""
    plan = ExecutionPlan.full(model, 8, BS)
    plan.heads_kept[1, [0, 2]] = False
    plan.ffn_blocks_kept[1, [1, 3, 4]] = False
    out = run_plan(model, ids, plan, repeats=1)
    head = torch.ones(2, 1, 4)
    head[1, 0, [0, 2]] = 0
    blocks = torch.ones(2, 1, 8)
    blocks[1, 0, [1, 3, 4]] = 0
    with Tracer(model, record=False) as tr:
        gated = tr.run(ids[None], Intervention(head=head, ffn_block=blocks, ffn_block_size=BS))[0, -1]
        full = tr.run(ids[None])[0, -1]
    assert next_token_compare(full, gated)["tv"] == pytest.approx(out["tv"], abs=1e-5)
    assert out["tv"] > 1e-3


def test_plan_from_probe(model: object, ids: torch.Tensor) -> None:
    res = probe_model(model, ids, m=16, ffn_block_size=BS, ground_truth=False)
    plan = ExecutionPlan.from_probe(res, count=2)
    assert plan.heads_kept.sum() == 2 and plan.ffn_blocks_kept.sum() == 2
    assert plan.tokens_kept[-1] and plan.tokens_kept.sum() in (2, 3)
    top_head = np.unravel_index(np.argmax(np.abs(res.values("head"))), (2, 4))
    assert plan.heads_kept[top_head]
    assert ExecutionPlan.from_probe(res, mass=1.0).ffn_blocks_kept.sum() == np.count_nonzero(res.values("ffn_block"))
    out = run_plan(model, ids, plan, repeats=1)
    assert out["kept"]["heads"] == 0.25 and out["full_tv"] < 1e-4
    with pytest.raises(ValueError, match="exactly one of count and mass"):
        ExecutionPlan.from_probe(res, count=2, mass=0.5)
    with pytest.raises(ValueError, match="mass = 1.5"):
        ExecutionPlan.from_probe(res, mass=1.5)


def test_run_plan_refuses_non_relu_model(ids: torch.Tensor) -> None:
    gelu = tiny_model("gelu")                   # ReLU and SiLU gates are supported (tests/analysis/test_real.py)
    with pytest.raises(ValueError, match="ReLU- or SiLU"):
        run_plan(gelu, ids, ExecutionPlan.full(gelu, 8, BS))
    relu = tiny_model()
    with pytest.raises(ValueError, match=r"tokens_kept has shape \(5,\)"):
        run_plan(relu, ids, ExecutionPlan.full(relu, 5, BS))
    with pytest.raises(ValueError, match="T >= 2"):
        run_plan(relu, ids[:1], ExecutionPlan.full(relu, 1, BS))


# ------------------------------------------------------------------------------------------------ plots
def test_plots_write_png(model: object, ids: torch.Tensor, tmp_path: object) -> None:
    from sparsecore.analysis.plots_probe import plot_model_recovery, plot_probe_vs_truth, plot_synthetic_recovery

    syn = synthetic_recovery(32, 2, [4, 12], trials=2)
    rvm = recovery_vs_m(model, ids, [8, 40], ffn_block_size=BS)
    res = probe_model(model, ids, m=16, ffn_block_size=BS)
    for path in (plot_synthetic_recovery(syn, tmp_path / "syn.png"), plot_model_recovery(rvm, tmp_path / "m.png"),
                 plot_probe_vs_truth(res, tmp_path / "x.png")):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="no 'solvers'"):
        plot_synthetic_recovery({"ms": [1]}, tmp_path / "bad.png")
