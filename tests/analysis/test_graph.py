"""The computation graph and s-Trace on tiny random LLaMA-family models (sparsecore.analysis)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparsecore.analysis.graph import ATTN, MLP, RESID, build_graph, trace_graph  # noqa: E402
from sparsecore.analysis.hooks import Intervention, Tracer  # noqa: E402
from sparsecore.analysis.strace import computation_density, next_token_metrics, s_trace, trace_input  # noqa: E402


def tiny(family: str = "llama", *, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, hidden_act="relu", max_position_embeddings=64)
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif family == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        m = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    # sharper outputs than the default init (std 0.02), so that removing edges visibly moves the distribution
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return m.eval()


IDS = torch.tensor([3, 17, 5, 60, 2, 9, 9, 41, 33, 7, 1, 12])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_traced_forward_equals_model_and_full_graph_is_exact(family: str) -> None:
    m = tiny(family)
    ref = m(IDS[None]).logits[0].float()
    graph, logits = trace_graph(m, IDS)
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)
    with Tracer(m) as tr:
        plain = tr.run(IDS[None])
        everything = tr.run(IDS[None], graph.intervention(np.ones(graph.n_edges, bool)))
        nothing = tr.run(IDS[None], graph.intervention(np.zeros(graph.n_edges, bool)))
    assert torch.equal(plain, everything)          # bit-identical: x * 1 and x + 0 * y change nothing
    p = torch.softmax(plain[0, -1].double(), -1)
    tv_empty = next_token_metrics(p, torch.softmax(nothing[:, -1].double(), -1))["tv"][0]
    assert tv_empty > 0.1


def test_edge_counts_and_weights_sum_to_one_per_node() -> None:
    m = tiny()
    graph, _ = trace_graph(m, IDS)
    t, h, n_l = IDS.numel(), 4, 2
    assert np.count_nonzero(graph.kind == ATTN) == n_l * h * t * (t + 1) // 2
    assert np.count_nonzero(graph.kind == MLP) == n_l * t
    assert np.count_nonzero(graph.kind == RESID) == 2 * n_l * t
    sums = np.bincount(graph.dst, weights=graph.weight, minlength=graph.n_nodes)
    targets = np.unique(graph.dst)
    np.testing.assert_allclose(sums[targets], 1.0, rtol=1e-12)
    assert set(targets) == set(range(t, graph.n_nodes))      # every node but the embeddings has inputs
    assert (graph.src < graph.dst).all()                      # edges go forward in depth
    assert graph.output_node == graph.n_nodes - 1


def test_edge_norms_are_the_contributions_the_model_adds() -> None:
    """Keep one attention edge (plus the residual) in layer 0: R[1, t] - R[0, t] is that edge's vector, and its
    norm must be the edge's raw weight; likewise the MLP edge of layer 1. Independent of how the graph computes
    them: the vectors come out of the model's own forward."""
    m = tiny()
    graph, _ = trace_graph(m, IDS)
    t = IDS.numel()
    rng = np.random.default_rng(1)
    attn0 = np.flatnonzero((graph.kind == ATTN) & (graph.layer == 0))
    with Tracer(m) as tr:
        for e in rng.choice(attn0, 5, replace=False):
            keep = (graph.kind == RESID) | (graph.kind == MLP)
            keep[e] = True
            tr.run(IDS[None], graph.intervention(keep))
            tok = graph.dst_tok[e]
            vec = tr.rec.resid_mid[0][0, tok] - tr.rec.resid_in[0][0, tok]
            assert float(vec.norm()) == pytest.approx(graph.raw[e], rel=1e-4, abs=1e-6)
        tr.run(IDS[None])
        mlp1 = np.flatnonzero((graph.kind == MLP) & (graph.layer == 1))
        for e in mlp1[[0, t // 2, t - 1]]:
            tok = graph.dst_tok[e]
            assert float(tr.rec.mlp_out[1][0, tok].norm()) == pytest.approx(graph.raw[e], rel=1e-6)
        # the residual edge into R[3, t] carries R[2, t]: the input of layer 1
        r = np.flatnonzero((graph.kind == RESID) & (graph.resid_state == 2))
        for e in r[:3]:
            assert float(tr.rec.resid_in[1][0, graph.src_tok[e]].norm()) == pytest.approx(graph.raw[e], rel=1e-6)


def test_strace_grows_connected_nested_subgraphs_heaviest_first() -> None:
    m = tiny()
    graph, _ = trace_graph(m, IDS)
    sizes, order = s_trace(graph, (1e-3, 0.01, 0.1, 0.5, 0.8))
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == int(np.ceil(0.8 * graph.n_edges))
    assert sorted(order.tolist()) == list(range(graph.n_edges))
    into_out = np.flatnonzero(graph.dst == graph.output_node)
    assert order[0] == into_out[np.argmax(graph.weight[into_out])]
    # the edges that can reach the output (backwards breadth-first): s-Trace adds them first, each after its target
    reach, frontier = {graph.output_node}, [graph.output_node]
    while frontier:
        n = frontier.pop()
        for e in np.flatnonzero(graph.dst == n):
            if int(graph.src[e]) not in reach:
                reach.add(int(graph.src[e]))
                frontier.append(int(graph.src[e]))
    n_reach = int(np.isin(graph.dst, list(reach)).sum())
    assert 0 < n_reach < graph.n_edges         # the other positions' last MLP and residual edges cannot reach it
    in_graph = {graph.output_node}
    for e in order[:n_reach]:
        assert graph.dst[e] in in_graph, "an edge was added before its target joined the subgraph"
        in_graph.add(int(graph.src[e]))
    _, order_local = s_trace(graph, (0.5,), key="local")
    assert order_local[0] == order[0]


def test_trace_input_beats_random_and_full_snapshot_is_close() -> None:
    m = tiny()
    r = trace_input(m, IDS, fractions=(1e-3, 0.01, 0.05, 0.2, 0.5, 0.8))
    tv = np.asarray(r.metrics["strace"]["tv"])
    rnd = np.asarray(r.metrics["random"]["tv"])
    assert tv[-1] < 0.25 * r.empty_tv
    assert tv.mean() < rnd.mean()
    comp = r.composition[-1]
    assert sum(comp.values()) == pytest.approx(1.0)
    assert set(k.split("/")[0] for k in comp) <= {"attention", "mlp", "residual"}
    assert 0.0 <= r.density <= 1.0
    js = r.to_json()
    assert js["density"] == r.density and len(js["metrics"]["complement"]["tv"]) == 6


def test_interventions_batch_rows_independently() -> None:
    m = tiny()
    graph, _ = trace_graph(m, IDS)
    rng = np.random.default_rng(0)
    keep = rng.random((3, graph.n_edges)) < 0.5
    with Tracer(m, record=False) as tr:
        batched = tr.run(IDS[None].expand(3, -1), graph.intervention(keep))
        for b in range(3):
            single = tr.run(IDS[None], graph.intervention(keep[b]))
            torch.testing.assert_close(batched[b], single[0], atol=1e-5, rtol=1e-5)


def test_computation_density_definition() -> None:
    f = [1e-4, 1e-3, 1e-2, 1e-1]
    assert computation_density(f, [0, 0, 0, 0]) == 0.0
    assert computation_density(f, [1, 1, 1, 1]) == pytest.approx(1.0)
    assert computation_density(f, [1, 0, 0, 0]) == pytest.approx(1 / 6)
    assert computation_density(f, [1, 1, 0, 0]) == pytest.approx(0.5)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="model"):
        Tracer(torch.nn.Linear(2, 2))
    m = tiny()
    graph, _ = trace_graph(m, IDS)
    with pytest.raises(ValueError, match="fractions"):
        s_trace(graph, (0.0, 0.5))
    with pytest.raises(ValueError, match="key"):
        s_trace(graph, (0.5,), key="heaviest")
    with pytest.raises(ValueError, match="keep"):
        graph.intervention(np.ones(graph.n_edges + 1, bool))
    with Tracer(m) as tr, pytest.raises(ValueError, match="input_ids"):
        tr.run(IDS)
    with Tracer(m) as tr, pytest.raises(ValueError, match="ffn_block"):
        tr.run(IDS[None], Intervention(ffn_block=torch.ones(2, 1, 2), ffn_block_size=32))
    assert m.config._attn_implementation != "sparsecore_trace"      # restored on exit, even after errors


def test_record_matches_rebuilt_graph() -> None:
    m = tiny()
    with Tracer(m) as tr:
        tr.run(IDS[None].expand(2, -1))
        g0, g1 = build_graph(tr.rec, 0), build_graph(tr.rec, 1)
    np.testing.assert_allclose(g0.weight, g1.weight, rtol=1e-6, atol=1e-9)
