"""``nn.Module`` building blocks that run on sparsecore's ops.

- :class:`SparseGatedMLP`: a drop-in for a LLaMA-style MLP (``gate_proj``, ``up_proj``, ``down_proj``
  with the same names and shapes as ``transformers``' ``LlamaMLP``, so state dicts load) with a ReLU
  gate whose activations are packed (TiledELL) and consumed by the fused up+down projection
  :func:`sparsecore.torch.functional.relu_gated_ffn`. It keeps the L1 penalty of its last forward for
  the training loop (``.last_l1``) and running activation-density statistics.

- :class:`ThresholdSparseMLP`: training-free activation sparsity for a gated MLP of any activation
  (SiLU included): ``h = act(gate_proj x) * up_proj x`` with ``|h| <= threshold`` dropped (per-layer
  thresholds from :func:`calibrate_thresholds`), packed and multiplied by ``down_proj`` with ``spmm``.

Top-k decode attention does not replace a module: it enters transformers through its attention
registry (:mod:`sparsecore.torch.attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import sparsecore as sc

from ..ops.inputs import threshold_f32

__all__ = ["SparseGatedMLP", "ThresholdSparseMLP", "total_l1", "ffn_sparsity_stats", "calibrate_thresholds",
           "save_thresholds", "load_thresholds", "THRESHOLDS_FORMAT"]


def _functional() -> Any:
    # imported lazily: sparsecore.torch's __init__ imports this module's package siblings
    from . import functional

    return functional


def _nnz(packed: Any) -> torch.Tensor:
    """Stored entries of a packed TiledELL (slots and overflow), as a 0-d int64 tensor (no host sync)."""
    if callable(getattr(type(packed), "nnz", None)):  # a TorchTiledELL (sparsecore.TiledELL's nnz is an int)
        return packed.nnz()
    if isinstance(packed.counts, np.ndarray):  # a host TiledELL of NumPy arrays: counted on the host
        return packed.nnz
    n = packed.counts.sum(dtype=torch.int64)
    ov = getattr(packed, "overflow", None)
    if ov is not None:
        n = n + ov.indptr[-1].to(torch.int64)
    return n


def _kept(h: Any, threshold: float) -> int:
    """How many entries of ``h`` (a NumPy array or a CPU tensor) ``pack(h, threshold=threshold)``
    keeps: ``~(abs(h) <= threshold)``, compared in float32 against the threshold that decides as
    the reference's float64 comparison does (:func:`sparsecore.ops.inputs.threshold_f32`)."""
    t = threshold_f32(threshold)
    if isinstance(h, np.ndarray):
        return int(h.size - np.count_nonzero(np.abs(h) <= np.float32(t)))
    return int(h.numel() - int((h.detach().abs().float() <= t).sum()))


def _operand(t: torch.Tensor) -> Any:
    """An inference operand of the public ops: a zero-copy NumPy view of a CPU float32 tensor (the
    ops then convert no buffer of their result), else the detached tensor."""
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" and t.dtype == torch.float32 else t


def _as_tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _check_llama_mlp(where: str, mlp: nn.Module) -> None:
    """``mlp`` has bias-free ``nn.Linear`` ``gate_proj``, ``up_proj`` and ``down_proj`` (LlamaMLP's)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{where}: mlp.{name} is {type(lin).__name__}; expected an nn.Linear (a LLaMA-style MLP)")
        if lin.bias is not None:
            raise ValueError(f"{where}: mlp.{name} has a bias; only bias-free MLPs (mlp_bias=False) are supported")


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
        _check_llama_mlp("SparseGatedMLP.from_dense", mlp)
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
    """``{module name: {"density": running mean, "last_density": last forward}}`` per SparseGatedMLP
    and ThresholdSparseMLP."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (SparseGatedMLP, ThresholdSparseMLP)):
            last = m.last_density
            out[name] = {"density": float(m.density), "last_density": float("nan") if last is None else float(last)}
    return out


# --------------------------------------------------------------------------------------------------
# training-free activation sparsity for gated MLPs of any activation (SiLU models)
# --------------------------------------------------------------------------------------------------

#: values an activation is evaluated on to tell whether threshold_mlp's kernel computes it (SiLU, ReLU)
_ACT_PROBE = torch.cat([torch.linspace(-30.0, 30.0, 241), torch.tensor([0.0, -0.0, 1e-4, -1e-4, 88.0, -88.0])])


def _check_threshold(where: str, threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0 \
            or threshold == float("inf"):
        raise ValueError(f"{where}: threshold = {threshold!r}; must be a finite number >= 0")
    return float(threshold)


class ThresholdSparseMLP(nn.Module):
    """A LLaMA-style gated MLP whose hidden activations below a threshold are dropped::

        x[|x| <= input_threshold] = 0               # optional (default 0: nothing dropped), TEAL's input
                                                    # sparsity: only the kept columns of gate_proj and
                                                    # up_proj are read
        h = act(gate_proj(x)) * up_proj(x)          # act as the model had it (SiLU, GELU, ...)
        h[|h| <= threshold] = 0
        out = h @ down_proj.weight.T                # only the kept rows of down_proj are read

    In inference on the host with ``input_threshold > 0`` and a SiLU or ReLU ``act`` (found by
    evaluating it, not by its class) the whole MLP is one :func:`sparsecore.threshold_mlp` call (its
    activation computed in float32 by the kernel); otherwise each thresholded product is one
    :func:`sparsecore.threshold_spmm` call (nothing is packed). On a device, and when differentiated
    or compiled, ``pack`` then ``spmm`` (the custom ops, with their gradients).

    With ``threshold = 0`` only exact zeros are dropped and the output is the dense MLP's (up to the
    order of the float32 sums). A threshold calibrated by :func:`calibrate_thresholds` for a target
    sparsity ``s`` drops about the fraction ``s`` of the hidden activations (training-free, as TEAL
    does for the input of ``down_proj``); the model's function changes by as much as the dropped
    activations contribute, which the calibration keeps small because it drops the smallest.

    The projections are the dense MLP's own modules (:meth:`from_dense` shares them; the state dict
    keeps its keys). ``tile`` and ``capacity`` are the packing's (default ``capacity``: from
    ``expected_sparsity`` with a margin, so that few entries overflow their tile's slots; nothing is
    ever dropped by the packing). Statistics as :class:`SparseGatedMLP`: ``last_density``, the
    running ``density`` and ``sparsity``, :meth:`reset_stats`.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: Any, *,
                 threshold: float = 0.0, tile: int = 256, capacity: int | None = None,
                 expected_sparsity: float | None = None, input_threshold: float = 0.0,
                 expected_input_sparsity: float | None = None) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn
        self.hidden_size = gate_proj.in_features
        self.intermediate_size = gate_proj.out_features
        self.out_size = down_proj.out_features
        self.threshold = _check_threshold("ThresholdSparseMLP", threshold)
        self.input_threshold = _check_threshold("ThresholdSparseMLP: input", input_threshold)
        if expected_input_sparsity is not None and not 0.0 <= float(expected_input_sparsity) <= 1.0:
            raise ValueError(f"ThresholdSparseMLP: expected_input_sparsity = {expected_input_sparsity!r}; must be "
                             "in [0, 1]")
        self.input_tile = min(256, 1 << max(1, (self.hidden_size - 1).bit_length()))
        keep_in = 1.0 if expected_input_sparsity is None else 1.0 - float(expected_input_sparsity)
        cap_in = int(self.input_tile * min(1.0, keep_in * 1.25 + 0.02) + 0.999)
        self.input_capacity = max(1, min(self.input_tile, cap_in))
        self._w_gate_up_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 2 or tile & (tile - 1):
            raise ValueError(f"ThresholdSparseMLP: tile = {tile!r}; must be a power of two >= 2")
        if expected_sparsity is not None and not 0.0 <= float(expected_sparsity) <= 1.0:
            raise ValueError(f"ThresholdSparseMLP: expected_sparsity = {expected_sparsity!r}; must be in [0, 1]")
        self.tile = min(tile, 1 << max(1, (self.intermediate_size - 1).bit_length()))
        if capacity is None:
            keep = 1.0 if expected_sparsity is None else 1.0 - float(expected_sparsity)
            # the kept fraction plus a margin for tiles denser than the mean; at most the tile
            capacity = max(1, min(self.tile, int(self.tile * min(1.0, keep * 1.25 + 0.02) + 0.999)))
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= self.tile:
            raise ValueError(f"ThresholdSparseMLP: capacity = {capacity!r}; must be an int in [1, tile = {self.tile}]")
        self.capacity = capacity
        self.expected_sparsity = expected_sparsity
        self.__dict__["_last"] = None  # (kept, slots) of the last forward: see last_density
        self.__dict__["_host_counts"] = (0, 0)  # kept and slots counted on the host, not yet in the buffers
        w = down_proj.weight
        self.register_buffer("_nnz_total", torch.zeros((), dtype=torch.float64, device=w.device), persistent=False)
        self.register_buffer("_slots_total", torch.zeros((), dtype=torch.float64, device=w.device), persistent=False)
        self._w_down_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_dense(cls, mlp: nn.Module, *, threshold: float = 0.0, tile: int = 256, capacity: int | None = None,
                   expected_sparsity: float | None = None, input_threshold: float = 0.0,
                   expected_input_sparsity: float | None = None) -> ThresholdSparseMLP:
        """A ThresholdSparseMLP sharing ``mlp``'s ``gate_proj``, ``up_proj``, ``down_proj`` and
        ``act_fn`` (no copy)."""
        _check_llama_mlp("ThresholdSparseMLP.from_dense", mlp)
        act = getattr(mlp, "act_fn", None)
        if act is None or not callable(act):
            raise TypeError(f"ThresholdSparseMLP.from_dense: mlp ({type(mlp).__name__}) has no callable act_fn")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, act, threshold=threshold, tile=tile,
                   capacity=capacity, expected_sparsity=expected_sparsity, input_threshold=input_threshold,
                   expected_input_sparsity=expected_input_sparsity).train(mlp.training)

    _w_down = SparseGatedMLP._w_down  # down_proj.weight.T [K, N], a contiguous copy kept without autograd

    def hidden(self, x2: torch.Tensor) -> torch.Tensor:
        """The hidden activations ``act(gate_proj x) * up_proj x`` of ``x2[M, D]`` (with
        ``input_threshold > 0``: of ``x2`` with ``|x| <= input_threshold`` set to 0; NaN is kept)."""
        t_in = self.input_threshold
        if t_in > 0:
            if torch.compiler.is_compiling() or self._differentiable(x2) \
                    or self.gate_proj.bias is not None or self.up_proj.bias is not None:
                x2 = torch.where(x2.abs() <= t_in, torch.zeros((), dtype=x2.dtype, device=x2.device), x2)
            else:  # inference: only the kept inputs' columns of gate_proj and up_proj are read
                if x2.device.type == "cpu":  # one call, nothing packed
                    gu = _as_tensor(sc.threshold_spmm(_operand(x2), _operand(self._w_gate_up()), threshold=t_in))
                else:
                    xs = sc.pack(_operand(x2), threshold=t_in, tile=self.input_tile, capacity=self.input_capacity)
                    gu = _as_tensor(sc.spmm(xs, _operand(self._w_gate_up())))
                k = self.intermediate_size
                return self.act_fn(gu[:, :k]) * gu[:, k:]
        return self.act_fn(self.gate_proj(x2)) * self.up_proj(x2)

    def _w_gate_up(self) -> torch.Tensor:
        """``[gate_proj.weight.T | up_proj.weight.T]`` ``[D, 2K]``, a contiguous copy kept until a weight
        changes (the input-sparse path gathers its rows)."""
        wg, wu = self.gate_proj.weight, self.up_proj.weight
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape)) for w in (wg, wu))
        if self._w_gate_up_cache is None or self._w_gate_up_cache[0] != key:
            self._w_gate_up_cache = (key, torch.cat([wg.detach().t(), wu.detach().t()], dim=1).contiguous())
        return self._w_gate_up_cache[1]

    def _host_weights(self) -> tuple[Any, Any]:
        """:meth:`_w_gate_up` and :meth:`_w_down` as the ops take them (NumPy views of float32 CPU
        copies), kept with the three weights' data pointers and version counters: a decode step checks
        those instead of building both copies' keys and views each call."""
        ws = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        key = tuple((w.data_ptr(), w._version, w.shape, w.dtype) for w in ws)
        found = self.__dict__.get("_sc_host_weights")
        if found is None or found[0] != key:
            found = self.__dict__["_sc_host_weights"] = (key, _operand(self._w_gate_up()), _operand(self._w_down()))
        return found[1], found[2]

    def _differentiable(self, x2: torch.Tensor) -> bool:
        """Grad mode is on and the input or a projection's weight requires grad: the path with the
        custom ops' gradients (the inference paths read detached copies of the weights)."""
        return torch.is_grad_enabled() and (x2.requires_grad or self.gate_proj.weight.requires_grad
                                            or self.up_proj.weight.requires_grad
                                            or self.down_proj.weight.requires_grad)

    def _fused_activation(self) -> str | None:
        """``"silu"`` or ``"relu"`` when ``act_fn`` computes exactly that on a probe of values (what
        :func:`sparsecore.threshold_mlp` can run in its kernel), else None; kept until ``act_fn`` changes."""
        d = self.__dict__
        act = self.act_fn
        found = d.get("_sc_act")
        if found is None or found[0] is not act:
            with torch.no_grad():
                try:
                    y = act(_ACT_PROBE)
                except Exception:  # noqa: BLE001 - an activation that cannot take the probe is not fused
                    y = None
            name = None
            if isinstance(y, torch.Tensor) and y.shape == _ACT_PROBE.shape and y.dtype == _ACT_PROBE.dtype:
                name = "silu" if torch.equal(y, nn.functional.silu(_ACT_PROBE)) else \
                    "relu" if torch.equal(y, nn.functional.relu(_ACT_PROBE)) else None
            found = d["_sc_act"] = (act, name)
        return found[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"ThresholdSparseMLP: x has shape {tuple(x.shape)}; expected [..., {self.hidden_size}]")
        from . import ops

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)
        if self.input_threshold > 0 and x2.device.type == "cpu" and not torch.compiler.is_compiling() \
                and not self._differentiable(x2) \
                and self.gate_proj.bias is None and self.up_proj.bias is None and self.down_proj.bias is None:
            act = self._fused_activation()
            if act is not None:  # a decode step on the host: the whole MLP in one call
                kept = np.empty(x2.shape[0], np.int64)
                wgu, wd = self._host_weights()
                out = _as_tensor(sc.threshold_mlp(_operand(x2), wgu, wd, input_threshold=self.input_threshold,
                                                  threshold=self.threshold, activation=act, kept=kept))
                nnz, slots = sum(kept.tolist()), x2.shape[0] * self.intermediate_size
                d = self.__dict__
                d["_last"] = (nnz, slots)
                d["_host_counts"] = (d["_host_counts"][0] + nnz, d["_host_counts"][1] + slots)
                return out.reshape(*lead, self.out_size).to(x.dtype)
        h = self.hidden(x2)
        if torch.compiler.is_compiling() or self._differentiable(x2) or (torch.is_grad_enabled() and h.requires_grad):
            # traced, or differentiated: the custom ops (fakes for the compiler, gradients registered)
            packed = ops.pack(h, threshold=self.threshold, tile=self.tile, capacity=self.capacity)
            out = ops.spmm(packed, self._w_down())
        elif h.device.type == "cpu":  # inference on the host: one call, nothing packed (threshold_spmm)
            hn = _operand(h)
            out = _as_tensor(sc.threshold_spmm(hn, _operand(self._w_down()), threshold=self.threshold))
            packed = None
        else:  # inference on a device: the public ops, zero-copy, without custom-op dispatch
            packed = sc.pack(_operand(h), threshold=self.threshold, tile=self.tile, capacity=self.capacity)
            out = _as_tensor(sc.spmm(packed, _operand(self._w_down())))
        slots = x2.shape[0] * self.intermediate_size
        d = self.__dict__  # plain attributes, set without nn.Module's __setattr__ (a decode step's cost)
        if packed is None:  # counted on the host: kept as Python numbers, made tensors when read
            nnz = _kept(hn, self.threshold)
            d["_last"] = (nnz, slots)
            d["_host_counts"] = (d["_host_counts"][0] + nnz, d["_host_counts"][1] + slots)
        else:
            with torch.no_grad():
                n = _nnz(packed)
                n = torch.tensor(float(n), dtype=torch.float64) if isinstance(n, int) else n.to(torch.float64)
                d["_last"] = (n, slots)
                self._nnz_total += n.to(self._nnz_total.device)
                self._slots_total += float(slots)
        return out.reshape(*lead, self.out_size).to(x.dtype)

    @property
    def last_density(self) -> torch.Tensor | None:
        """The fraction of the hidden activations kept in the last forward (0-d float64 tensor)."""
        last = self.__dict__.get("_last")
        if last is None:
            return None
        nnz, slots = last
        if not slots:
            return torch.zeros((), dtype=torch.float64)
        return (torch.tensor(float(nnz), dtype=torch.float64) if isinstance(nnz, int) else nnz) / slots

    def _flush(self) -> None:
        """Add the counts kept on the host to the running buffers."""
        nnz, slots = self.__dict__["_host_counts"]
        if slots:
            self._nnz_total += float(nnz)
            self._slots_total += float(slots)
            self.__dict__["_host_counts"] = (0, 0)

    @property
    def density(self) -> torch.Tensor:
        """Running mean fraction of kept hidden activations (token-weighted)."""
        self._flush()
        return SparseGatedMLP.density.fget(self)

    @property
    def sparsity(self) -> torch.Tensor:
        return 1.0 - self.density

    def reset_stats(self) -> None:
        self.__dict__["_host_counts"] = (0, 0)
        self.__dict__["_last"] = None
        self._nnz_total.zero_()
        self._slots_total.zero_()

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"threshold={self.threshold:.6g}, tile={self.tile}, capacity={self.capacity}"
                + (f", input_threshold={self.input_threshold:.6g}" if self.input_threshold else ""))


THRESHOLDS_FORMAT = "sparsecore-ffn-thresholds"


def _gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every LLaMA-style gated MLP (gate/up/down ``nn.Linear`` and an ``act_fn``),
    dense or already a ThresholdSparseMLP."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, SparseGatedMLP):
            continue
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
                and callable(getattr(m, "act_fn", None)):
            found.append((name, m))
    return found


def calibrate_thresholds(model: nn.Module, ids: Any, sparsity: float | Sequence[float], *, batch_size: int = 1,
                         max_samples: int = 1 << 22, seed: int = 0, input_sparsity: float | None = None
                         ) -> dict[str, Any] | list[dict[str, Any]]:
    """Per-layer thresholds that make the fraction ``sparsity`` of each gated MLP's hidden
    activations (the input of ``down_proj``, ``act(gate_proj x) * up_proj x``) zero on the
    calibration tokens ``ids`` (``[N, T]`` or ``[T]`` int tensor, or a list of such): the
    ``sparsity``-quantile of ``|h|`` per layer, over every calibration token (a seeded uniform sample
    of ``max_samples`` values per layer when there are more).

    Runs the model (no grad, eval mode restored afterwards) with a hook on every ``down_proj``;
    returns a JSON-ready dict ``{"format", "version", "sparsity", "tokens", "model", "thresholds":
    {mlp module name: float}}`` for ``patch_model(model, ffn=dict(mode="threshold", thresholds=...))``
    and :func:`save_thresholds`. A sequence of sparsities gives a list of such dicts from one pass
    over the calibration text. ``input_sparsity`` (TEAL's input sparsity) also calibrates, from the
    same pass, per-layer thresholds of the MLP's input ``x`` (the input of ``gate_proj`` and
    ``up_proj``): the dicts then carry ``"input_sparsity"`` and ``"input_thresholds"``.
    """
    if input_sparsity is not None and (isinstance(input_sparsity, bool) or not isinstance(input_sparsity, (int, float))
                                       or not 0.0 <= input_sparsity < 1.0):
        raise ValueError(f"calibrate_thresholds: input_sparsity = {input_sparsity!r}; must be a number in [0, 1)")
    many = isinstance(sparsity, (list, tuple))
    targets = list(sparsity) if many else [sparsity]
    for sp in targets:
        if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not 0.0 <= sp < 1.0:
            raise ValueError(f"calibrate_thresholds: sparsity = {sp!r}; must be a number in [0, 1)")
    mlps = _gated_mlps(model)
    if not mlps:
        raise ValueError(f"calibrate_thresholds: {type(model).__name__} has no gated MLP "
                         "(gate_proj/up_proj/down_proj nn.Linear and act_fn)")
    seqs = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    batches = []
    for s in seqs:
        t = torch.as_tensor(s)
        if t.dtype not in (torch.int32, torch.int64) or t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"calibrate_thresholds: ids has dtype {t.dtype} and shape {tuple(t.shape)}; expected "
                             "a non-empty int tensor [T] or [N, T] (or a list of them)")
        t = t.reshape(-1, t.shape[-1]) if t.dim() == 2 else t[None]
        batches.extend(t[i:i + batch_size] for i in range(0, t.shape[0], batch_size))
    n_tokens = sum(int(b.numel()) for b in batches)
    per_call = max(1, max_samples // max(1, len(batches)))
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name, _ in mlps}
    in_samples: dict[str, list[torch.Tensor]] = {name: [] for name, _ in mlps}

    def hook(name: str, into: dict[str, list[torch.Tensor]]) -> Any:
        def fn(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().reshape(-1).abs().float()
            if a.numel() > per_call:
                a = a[torch.randint(a.numel(), (per_call,), generator=gen).to(a.device)]
            into[name].append(a.cpu())
        return fn

    handles = [m.down_proj.register_forward_pre_hook(hook(name, samples)) for name, m in mlps]
    if input_sparsity is not None:
        handles += [m.gate_proj.register_forward_pre_hook(hook(name, in_samples)) for name, m in mlps]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    def quantile(chunks: list[torch.Tensor], sp: float) -> float:
        # the sp-quantile: |h| <= it for the fraction sp of the samples (0: only exact zeros)
        a = torch.sort(torch.cat(chunks)).values
        return 0.0 if sp == 0 else float(a[min(a.numel(), max(1, int(round(sp * a.numel())))) - 1])

    tables = [{name: quantile(chunks, sp) for name, chunks in samples.items()} for sp in targets]
    cfg = getattr(model, "config", None)
    out = [{"format": THRESHOLDS_FORMAT, "version": 1, "sparsity": float(sp), "tokens": n_tokens,
            "model": getattr(cfg, "_name_or_path", None) or type(model).__name__, "thresholds": table}
           for sp, table in zip(targets, tables)]
    if input_sparsity is not None:
        inputs = {name: quantile(chunks, float(input_sparsity)) for name, chunks in in_samples.items()}
        for d in out:
            d["input_sparsity"] = float(input_sparsity)
            d["input_thresholds"] = dict(inputs)
    return out if many else out[0]


def save_thresholds(calibration: dict[str, Any], path: Any) -> None:
    """Write a :func:`calibrate_thresholds` result to ``path`` as JSON."""
    _check_calibration(calibration, "save_thresholds")
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(calibration, indent=1, sort_keys=True) + "\n")


def load_thresholds(path: Any) -> dict[str, Any]:
    """Read thresholds that :func:`save_thresholds` wrote (checked as it reads)."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"load_thresholds: {path} is not JSON: {e}") from None
    return _check_calibration(data, f"load_thresholds({path})")


def _check_calibration(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{where}: expected a dict with format = {THRESHOLDS_FORMAT!r} (from calibrate_thresholds); "
                         f"got {type(data).__name__} with format = "
                         f"{data.get('format') if isinstance(data, dict) else None!r}")
    th = data.get("thresholds")
    if not isinstance(th, dict) or not th:
        raise ValueError(f"{where}: thresholds must be a non-empty dict of module name -> threshold")
    for name, v in th.items():
        _check_threshold(f"{where}: thresholds[{name!r}]", v)
    inp = data.get("input_thresholds")
    if inp is not None:
        if not isinstance(inp, dict) or set(inp) != set(th):
            raise ValueError(f"{where}: input_thresholds must be a dict with the same module names as thresholds")
        for name, v in inp.items():
            _check_threshold(f"{where}: input_thresholds[{name!r}]", v)
    return data
