"""The computation graph of one forward pass, with edge weights.

Nodes are residual-stream states ``R[k, t]`` for ``k = 0 .. 2L`` (``R[0]`` the embeddings; ``R[2i+1]`` after
layer ``i``'s attention block, ``R[2i+2]`` after its MLP block) and tokens ``t``; node id ``k * T + t``.
Edges, each a contribution vector added into its target node:

- **attention** edge ``(layer i, head h, token s -> t)``, ``s <= t``: ``R[2i, s] -> R[2i+1, t]``, vector
  ``a[i, h, t, s] * W_O[:, head h] @ v[i, h, s]`` (the attention weight times the head's projected value);
- **mlp** edge ``(layer i, token t)``: ``R[2i+1, t] -> R[2i+2, t]``, vector ``mlp_i(R[2i+1, t])``;
- **residual** edge ``(state k, token t)``: ``R[k, t] -> R[k+1, t]``, vector ``R[k, t]`` (the skip connection);

each edge's ``raw`` is the norm of its vector. The vectors sum exactly to their target:
``R[2i+1, t] = residual + sum over (h, s) of attention edges`` and ``R[2i+2, t] = residual + mlp``.
An edge's ``weight`` is its ``raw`` norm divided by the sum of the ``raw`` norms of the edges entering the same
node (weights into a node sum to 1). Head outputs and MLP blocks are edges here rather than nodes: an
attention head output at ``t`` is the sum of its edges ``(i, h, * -> t)``, and the MLP block at ``(i, t)`` is
the single MLP edge. The query and key paths (how ``R[2i, t]`` chose its weights) are not edges: zeroing an
edge keeps the weights of the others (no renormalisation), as the s-Trace evaluation demands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .hooks import Intervention, Record, Tracer

ATTN, MLP, RESID = 0, 1, 2
KIND_NAMES = ("attention", "mlp", "residual")


@dataclass
class ComputationGraph:
    """Edges of one forward (batch row 0 of a record); arrays of length ``n_edges`` unless noted.

    ``kind`` (0 attention, 1 mlp, 2 residual), ``layer`` (the decoder layer), ``head`` (-1 unless
    attention), ``src_tok``/``dst_tok``, ``src``/``dst`` node ids (``k * n_tokens + t``), ``raw`` (norm of the
    contribution vector), ``weight`` (``raw`` normalised over the edges into the same node);
    ``resid_state`` (``k`` of a residual edge, -1 otherwise).
    """

    n_layers: int
    n_heads: int
    n_tokens: int
    kind: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    src_tok: np.ndarray
    dst_tok: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    raw: np.ndarray
    weight: np.ndarray
    resid_state: np.ndarray

    @property
    def n_edges(self) -> int:
        return int(self.kind.shape[0])

    @property
    def n_nodes(self) -> int:
        return (2 * self.n_layers + 1) * self.n_tokens

    @property
    def output_node(self) -> int:
        """``R[2L, T-1]``: the last position's final residual state, which the LM head reads."""
        return 2 * self.n_layers * self.n_tokens + self.n_tokens - 1

    def incoming(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR over target nodes: edges into node ``n`` are ``order[indptr[n]:indptr[n + 1]]``."""
        order = np.argsort(self.dst, kind="stable")
        indptr = np.zeros(self.n_nodes + 1, dtype=np.int64)
        np.add.at(indptr, self.dst + 1, 1)
        return np.cumsum(indptr), order

    def intervention(self, keep: np.ndarray, *, device: Any = "cpu") -> Intervention:
        """Multipliers that keep exactly the edges where ``keep`` ([n_edges] or [B, n_edges], bool) is true."""
        keep = np.atleast_2d(np.asarray(keep, dtype=bool))
        if keep.shape[1] != self.n_edges:
            raise ValueError(f"keep: expected {self.n_edges} edges per row, got {keep.shape[1]}")
        b, n_l, n_h, n_t = keep.shape[0], self.n_layers, self.n_heads, self.n_tokens
        attn = np.zeros((n_l, b, n_h, n_t, n_t), dtype=np.float32)
        mlp = np.zeros((n_l, b, n_t), dtype=np.float32)
        resid = np.zeros((2 * n_l, b, n_t), dtype=np.float32)
        rows = np.arange(b)[:, None]
        a = self.kind == ATTN
        attn[self.layer[a][None, :], rows, self.head[a][None, :], self.dst_tok[a][None, :],
             self.src_tok[a][None, :]] = keep[:, a]
        m = self.kind == MLP
        mlp[self.layer[m][None, :], rows, self.dst_tok[m][None, :]] = keep[:, m]
        r = self.kind == RESID
        resid[self.resid_state[r][None, :], rows, self.dst_tok[r][None, :]] = keep[:, r]
        as_t = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
        return Intervention(attn=as_t(attn), mlp=as_t(mlp), resid=as_t(resid))

    def layer_quartile(self) -> np.ndarray:
        """Quartile (0-3) of each edge's layer in the depth of the model."""
        return np.minimum(4 * self.layer // max(self.n_layers, 1), 3)


def build_graph(rec: Record, row: int = 0) -> ComputationGraph:
    """The graph of batch row ``row`` of a traced forward's record (see the module docstring)."""
    n_l = len(rec.probs)
    _, n_h, n_t, _ = rec.probs[0].shape
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("kind", "layer", "head", "src_tok", "dst_tok", "src",
                                                          "dst", "raw", "resid_state")}

    def add(kind: int, layer: np.ndarray, head: np.ndarray, s: np.ndarray, t: np.ndarray, k_src: int,
            k_dst: int, raw: np.ndarray, state: int = -1) -> None:
        n = raw.shape[0]
        parts["kind"].append(np.full(n, kind, np.int8))
        parts["layer"].append(np.broadcast_to(layer, (n,)).astype(np.int32))
        parts["head"].append(np.broadcast_to(head, (n,)).astype(np.int32))
        parts["src_tok"].append(s.astype(np.int32))
        parts["dst_tok"].append(t.astype(np.int32))
        parts["src"].append((k_src * n_t + s).astype(np.int64))
        parts["dst"].append((k_dst * n_t + t).astype(np.int64))
        parts["raw"].append(raw.astype(np.float64))
        parts["resid_state"].append(np.full(n, state, np.int32))

    tri_t, tri_s = np.tril_indices(n_t)
    toks = np.arange(n_t)
    for i in range(n_l):
        probs = rec.probs[i][row].double().cpu().numpy()            # [H, T, S]
        vnorm = rec.value_norm[i][row].double().cpu().numpy()       # [H, S]
        contrib = probs * vnorm[:, None, :]
        for h in range(n_h):
            add(ATTN, np.int32(i), np.int32(h), tri_s, tri_t, 2 * i, 2 * i + 1, contrib[h, tri_t, tri_s])
        r_in = rec.resid_in[i][row].double().norm(dim=-1).cpu().numpy()
        r_mid = rec.resid_mid[i][row].double().norm(dim=-1).cpu().numpy()
        m_out = rec.mlp_out[i][row].double().norm(dim=-1).cpu().numpy()
        add(RESID, np.int32(i), np.int32(-1), toks, toks, 2 * i, 2 * i + 1, r_in, state=2 * i)
        add(MLP, np.int32(i), np.int32(-1), toks, toks, 2 * i + 1, 2 * i + 2, m_out)
        add(RESID, np.int32(i), np.int32(-1), toks, toks, 2 * i + 1, 2 * i + 2, r_mid, state=2 * i + 1)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    n_nodes = (2 * n_l + 1) * n_t
    total = np.bincount(cat["dst"], weights=cat["raw"], minlength=n_nodes)
    weight = np.divide(cat["raw"], total[cat["dst"]], out=np.zeros_like(cat["raw"]), where=total[cat["dst"]] > 0)
    return ComputationGraph(n_layers=n_l, n_heads=n_h, n_tokens=n_t, weight=weight, **cat)


def trace_graph(model: Any, input_ids: torch.Tensor) -> tuple[ComputationGraph, torch.Tensor]:
    """(graph, logits [T, vocab]) of one unmodified forward of ``input_ids`` ([T] or [1, T])."""
    ids = input_ids.reshape(1, -1)
    with Tracer(model) as tr:
        logits = tr.run(ids)
        graph = build_graph(tr.rec)
    return graph, logits[0]
