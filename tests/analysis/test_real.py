"""The real-model study (sparsecore.analysis.real) end to end on a tiny random SiLU LLaMA with a toy word
tokenizer, so that it runs without the real model; plus the pieces it added to the library (the heap-free
s-Trace order, run_plans on a SiLU MLP, the bootstrap)."""

from __future__ import annotations

import heapq
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sparsecore.analysis import real  # noqa: E402
from sparsecore.analysis.density import bootstrap_ci, correlation  # noqa: E402
from sparsecore.analysis.graph import trace_graph  # noqa: E402
from sparsecore.analysis.plan import ExecutionPlan, run_plan, run_plans  # noqa: E402
from sparsecore.analysis.strace import s_trace  # noqa: E402

TEXTS = {"english": " ".join(f"the cat number {i % 7} sat on the mat and looked at word{i % 11}." for i in range(60)),
         "python": "\n".join(f"def f{i % 5}(x):\n    return x * {i % 3} + value_{i % 4}" for i in range(60))}
PIECE = re.compile(r" ?\w+|\s|[^\w\s]")


def toy_tokenizer():
    vocab: dict[str, int] = {}
    for t in TEXTS.values():
        for p in PIECE.findall(t):
            vocab.setdefault(p, len(vocab))
    inv = {i: p for p, i in vocab.items()}
    return (lambda s: [vocab[p] for p in PIECE.findall(s)]), (lambda ids: "".join(inv[int(i)] for i in ids)), len(vocab)


def tiny_llama(vocab: int, act: str = "silu", seed: int = 0, max_pos: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act=act, max_position_embeddings=max_pos)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return m.eval()


def test_flow_order_is_the_heap_order() -> None:
    enc, dec, v = toy_tokenizer()
    m = tiny_llama(v)
    graph, _ = trace_graph(m, torch.tensor(enc(TEXTS["english"])[:12]))
    _, fast = s_trace(graph, (0.5,))
    indptr, order_in = graph.incoming()
    w = graph.weight
    in_graph = np.zeros(graph.n_nodes, bool)
    added = np.zeros(graph.n_edges, bool)
    heap: list[tuple[float, int]] = []
    order: list[int] = []

    def push(n: int, k: float) -> None:
        in_graph[n] = True
        for e in order_in[indptr[n]:indptr[n + 1]]:
            heapq.heappush(heap, (-(w[e] * k), int(e)))

    push(graph.output_node, 1.0)
    while heap:
        neg, e = heapq.heappop(heap)
        if not added[e]:
            added[e] = True
            order.append(e)
            if not in_graph[graph.src[e]]:
                push(int(graph.src[e]), -neg)
    for n in (1, 3, 10, 50, len(order)):           # the same nested sets (ties may swap neighbours)
        assert set(fast[:n].tolist()) == set(order[:n])


def test_word_boundary_and_byte_inputs_align() -> None:
    enc, dec, _ = toy_tokenizer()
    inp = real.word_boundary_inputs(TEXTS, enc, dec, 6, 10)
    assert inp["windows"].shape == (6, 10) and inp["kinds"] == ["english"] * 3 + ["python"] * 3
    for w, t, tt, pre in zip(inp["windows"], inp["targets"], inp["target_text"], inp["prefix"]):
        assert real.is_word_start(tt) and dec([t]) == tt and dec(w.tolist()) == pre
    b = real.byte_inputs(inp["prefix"], inp["target_text"], 12)
    for w, t, pre, tt in zip(b["windows"], b["targets"], inp["prefix"], inp["target_text"]):
        assert bytes(w.tolist()) == (pre + " ").encode()[-12:] and t == tt.encode()[1]


def test_run_plans_on_a_silu_model_matches_run_plan_and_full_plan_is_exact() -> None:
    enc, dec, v = toy_tokenizer()
    m = tiny_llama(v)
    ids = torch.tensor(enc(TEXTS["python"])[:20])
    full = ExecutionPlan.full(m, 20, 16)
    half = ExecutionPlan.full(m, 20, 16)
    half.heads_kept[:, 1::2] = False
    half.ffn_blocks_kept[:, ::2] = False
    half.tokens_kept[:10] = False
    res = run_plans(m, ids, [full, half], target=3, repeats=1)
    assert res["ref"]["full_tv"] < 1e-5 and res["plans"][0]["tv"] < 1e-5
    assert res["plans"][0]["loss"] == pytest.approx(res["ref"]["loss"], abs=1e-4)
    single = run_plan(m, ids, half, repeats=1)
    assert res["plans"][1]["tv"] == pytest.approx(single["tv"], abs=1e-6) and res["plans"][1]["tv"] > 1e-4


def test_bootstrap_and_correlation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    b = bootstrap_ci(np.mean, x, n_boot=300)
    assert b["lo"] < b["value"] < b["hi"]
    c = correlation(x, x + 0.1 * rng.normal(size=60), n_perm=200, n_boot=200)
    assert c["rho"] > 0.9 and c["p"] < 0.01 and c["ci"][0] > 0.8


def test_run_study_end_to_end(tmp_path: Path) -> None:
    enc, dec, v = toy_tokenizer()
    m = tiny_llama(v)
    second = tiny_llama(256, act="relu", seed=1)
    steps: list[str] = []
    res = real.run_study(m, enc, dec, TEXTS, n=6, length=12, context_lengths=(6, 12), second=second,
                         second_length=16, probe_inputs=1, probe_m=16, ffn_block_size=16,
                         fractions=(0.01, 0.1, 0.5, 0.9), n_perm=50, progress=steps.append)
    assert sum("s-Trace" in s for s in steps) == 12 and any("probe" in s for s in steps)
    cl = res["claims"]
    assert cl["smollm2"]["n"] == 6 and 0 <= cl["smollm2"]["density"]["mean"] <= 1
    assert set(cl["cross_model"]) >= {"all", "english", "python"}
    assert cl["smollm2"]["context"]["lengths"] == [6, 12]
    comp = cl["smollm2"]["composition"]
    assert len(comp["shares"]) == 4 and all(abs(sum(r) - 1) < 1e-6 for r in comp["added"] if sum(r) > 0)
    fr = res["plans"]["frontier"]
    assert {r["source"] for r in fr} == {"probe", "gradient", "random", "probe_head_only", "probe_ffn_block_only",
                                         "probe_token_only"}
    full = [r for r in fr if r["fraction"] == 1.0 and r["source"] == "probe"][0]
    assert full["top1"] == 1.0 and abs(full["loss_increase"]) < 1e-4
    json.dumps(res)                                 # JSON-able
    figs = real.plot_real(res, tmp_path)
    assert set(figs) >= {"density_hist", "density_correlates", "density_context", "tv_curves", "composition",
                         "cross_model", "plan_frontier"}
    assert all(Path(f).stat().st_size > 1000 for f in figs.values())
