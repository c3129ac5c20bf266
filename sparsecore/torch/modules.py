"""``nn.Module`` building blocks that run on sparsecore's ops.

- :class:`SparseGatedMLP`: a drop-in for a LLaMA-style MLP (``gate_proj``, ``up_proj``, ``down_proj``
  with the same names and shapes as ``transformers``' ``LlamaMLP``, so state dicts load) with a ReLU
  gate whose activations are packed (TiledELL) and consumed by the fused up+down projection
  :func:`sparsecore.torch.functional.relu_gated_ffn`. It keeps the L1 penalty of its last forward for
  the training loop (``.last_l1``) and running activation-density statistics.

Top-k decode attention does not replace a module: it enters transformers through its attention
registry (:mod:`sparsecore.torch.attention`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SparseGatedMLP", "total_l1", "ffn_sparsity_stats"]


def _functional() -> Any:
    # imported lazily: sparsecore.torch's __init__ imports this module's package siblings
    from . import functional

    return functional


def _nnz(packed: Any) -> torch.Tensor:
    """Stored entries of a packed TiledELL (slots and overflow), as a 0-d int64 tensor."""
    if hasattr(packed, "nnz"):
        return packed.nnz()
    n = packed.counts.sum(dtype=torch.int64)
    ov = getattr(packed, "overflow", None)
    if ov is not None:
        n = n + ov.indptr[-1].to(torch.int64)
    return n


class SparseGatedMLP(nn.Module):
    """``down_proj(relu(gate_proj(x)) * up_proj(x))`` over the gate's non-zeros only.

    Parameters have LlamaMLP's names and shapes: ``gate_proj.weight[K, D]``, ``up_proj.weight[K, D]``,
    ``down_proj.weight[N, K]`` (``N = D`` for LLaMA); no biases. Inputs are ``[..., D]``.

    After each forward:

    - ``last_l1``: the differentiable L1 penalty of the hidden activations
      (:func:`sparsecore.torch.functional.l1_penalty` of the packed gate); add ``coef * last_l1`` to
      the loss (or use :func:`total_l1` over a model).
    - ``last_density``: the fraction of non-zero hidden activations in that forward (0-d tensor);
      ``density``: its running mean over every token since construction or :meth:`reset_stats`;
      ``sparsity = 1 - density``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, out_size: int | None = None, *, tile: int = 256,
                 capacity: int | None = None, threshold: float = 0.0, device: Any = None, dtype: Any = None
                 ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.out_size = self.hidden_size if out_size is None else int(out_size)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False, **kw)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False, **kw)
        self.down_proj = nn.Linear(self.intermediate_size, self.out_size, bias=False, **kw)
        self.tile = int(tile)
        self.capacity = capacity
        self.threshold = float(threshold)
        self.last_l1: torch.Tensor | None = None
        self.last_density: torch.Tensor | None = None
        self.register_buffer("_nnz_total", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("_slots_total", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self._w_down_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_dense(cls, mlp: nn.Module, *, tile: int = 256, capacity: int | None = None, threshold: float = 0.0
                   ) -> SparseGatedMLP:
        """A SparseGatedMLP that shares ``mlp``'s projection modules (no copy). The activation becomes
        ReLU whatever ``mlp.act_fn`` was: exact for a ReLU-gated model, an approximation to be
        fine-tuned otherwise."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name, None)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"SparseGatedMLP.from_dense: mlp.{name} is {type(lin).__name__}; "
                                "expected an nn.Linear (a LLaMA-style MLP)")
            if lin.bias is not None:
                raise ValueError(f"SparseGatedMLP.from_dense: mlp.{name} has a bias; only bias-free MLPs "
                                 "(mlp_bias=False) are supported")
        w = mlp.gate_proj.weight
        new = cls(mlp.gate_proj.in_features, mlp.gate_proj.out_features, mlp.down_proj.out_features, tile=tile,
                  capacity=capacity, threshold=threshold, device="meta", dtype=w.dtype)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        new._nnz_total = torch.zeros((), dtype=torch.float64, device=w.device)
        new._slots_total = torch.zeros((), dtype=torch.float64, device=w.device)
        return new.train(mlp.training)

    def _w_down(self) -> torch.Tensor:
        """``down_proj.weight.T`` ``[K, N]``: a differentiable view when autograd needs it, otherwise a
        contiguous copy kept until the weight changes (the kernels gather its rows)."""
        w = self.down_proj.weight
        if torch.is_grad_enabled() and w.requires_grad:
            self._w_down_cache = None
            return w.t()
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._w_down_cache is None or self._w_down_cache[0] != key:
            self._w_down_cache = (key, w.detach().t().contiguous())
        return self._w_down_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"SparseGatedMLP: x has shape {tuple(x.shape)}; expected [..., {self.hidden_size}]")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)
        f = _functional()
        out, packed = f.relu_gated_ffn(x2, self.gate_proj.weight, self.up_proj.weight, self._w_down(),
                                       tile=self.tile, capacity=self.capacity, threshold=self.threshold)
        self.last_l1 = f.l1_penalty(packed)
        with torch.no_grad():
            nnz = _nnz(packed).to(torch.float64)
            slots = float(x2.shape[0] * self.intermediate_size)
            self.last_density = nnz / slots if slots else torch.zeros((), dtype=torch.float64)
            self._nnz_total += nnz.to(self._nnz_total.device)
            self._slots_total += slots
        return out.reshape(*lead, self.out_size)

    @property
    def density(self) -> torch.Tensor:
        """Running mean fraction of non-zero hidden activations (token-weighted)."""
        return self._nnz_total / self._slots_total.clamp_min(1.0)

    @property
    def sparsity(self) -> torch.Tensor:
        return 1.0 - self.density

    def reset_stats(self) -> None:
        self._nnz_total.zero_()
        self._slots_total.zero_()
        self.last_density = None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"out_size={self.out_size}, tile={self.tile}, capacity={self.capacity}, threshold={self.threshold}")


def total_l1(model: nn.Module) -> torch.Tensor:
    """Sum of ``last_l1`` over every :class:`SparseGatedMLP` in ``model`` (run a forward first)."""
    terms = [m.last_l1 for m in model.modules() if isinstance(m, SparseGatedMLP) and m.last_l1 is not None]
    if not terms:
        raise ValueError("total_l1: the model has no SparseGatedMLP with a forward behind it")
    return torch.stack([t.reshape(()) for t in terms]).sum()


def ffn_sparsity_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{module name: {"density": running mean, "last_density": last forward}}`` per SparseGatedMLP."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseGatedMLP):
            last = m.last_density
            out[name] = {"density": float(m.density), "last_density": float("nan") if last is None else float(last)}
    return out
