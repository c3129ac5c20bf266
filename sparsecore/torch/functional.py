"""Differentiable sparse ops for training activation-sparse FFNs.

The gradients are registered on the custom ops (``torch.library.register_autograd``), so they hold in
eager mode and under ``torch.compile``, and every backward is built from the sparse ops themselves:

- ``C = spmm(A, W)``: ``dA = sddmm(dC, W, pattern=A)``, ``dW = spmm_t(A, dC)``
- ``S = sddmm(x, W, P)``: ``dx = spmm(dS, W)``, ``dW = spmm_t(dS, x)``
- ``Y = spmm_t(A, dy)``: ``dA = sddmm(dy, dY, pattern=A)``, ``d(dy) = spmm(A, dY)``
- ``out = gated_ffn(x, G, U, D)`` with ``u = sddmm(x, U, G)``, ``z = G * u``:
  ``dD = spmm_t(z, dout)``, ``dz = sddmm(dout, D, G)``, ``dG = dz * u``,
  ``dx = spmm(dz * G, U)``, ``dU = spmm_t(dz * G, x)``
- ``H = pack(x)`` (ReLU fused or not): ``dx = unpack(dH)``: the gradient reaches the kept entries only
- ``H = relu_gate(x, Wg)`` (``pack(relu(x @ Wg.T))``): ``dx = spmm(dH, Wg)``, ``dWg = spmm_t(dH, x)``
- ``unpack(A)``: ``dA`` = the dense gradient gathered at ``A``'s positions

Gradients w.r.t. the values of a packed operand are packed tensors of the same layout (padding
slots get 0). Integer buffers (cols, counts, indptr, indices) have no gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from . import ops as _t
from .ops import N_SPARSE, SparseArgs, TorchTiledELL, gated_ffn, pack, relu_gate, sddmm, spmm, spmm_t, unpack

__all__ = ["relu_gated_ffn", "l1_penalty", "pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn",
           "relu_gate"]

Tensor = torch.Tensor
_ops = torch.ops.sparsecore


# --------------------------------------------------------------------------------------------------
# the high-level function for the modules
# --------------------------------------------------------------------------------------------------

def relu_gated_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, *, tile: int = 256,
                   capacity: int | None = None, threshold: float = 0.0,
                   backend: str | None = None) -> tuple[Tensor, TorchTiledELL]:
    """A ReLU-gated FFN over the gate's non-zeros only::

        h = relu(x @ w_gate.T)                  # dense GEMM, then packed losslessly (TiledELL)
        out = (h * (x @ w_up.T)) @ w_down       # gated_ffn: computed at h's non-zeros only

    ``x[M, D]``, ``w_gate[K, D]``, ``w_up[K, D]``, ``w_down[K, N]`` (a LLaMA ``down_proj.weight.T``).
    Entries of ``h`` with ``h <= threshold`` are dropped. Returns ``(out[M, N], h)`` with ``h`` a
    :class:`TorchTiledELL` whose values carry gradient (for :func:`l1_penalty`). Differentiable
    w.r.t. ``x``, ``w_gate``, ``w_up`` and ``w_down``; the backward uses sddmm / spmm / spmm_t on the
    packed hidden state and never forms a dense ``[M, K]`` gradient.
    """
    h = relu_gate(x, w_gate, threshold=threshold, tile=tile, capacity=capacity, backend=backend)
    return gated_ffn(x, h, w_up, w_down, backend=backend), h


def l1_penalty(packed_gate: Any) -> Tensor:
    """``sum(|h|) / M``: the L1 norm of the hidden activations summed over the hidden dim and averaged
    over the ``M`` tokens, read from the packed values (slots and overflow; padding is 0).
    Differentiable: the gradient flows back through the gate values."""
    a = _t.as_torch_sparse(packed_gate, "l1_penalty", "packed_gate")
    m = torch.sym_max(a.shape[0], 1)  # no int(): M stays symbolic under torch.compile(dynamic=True)
    if isinstance(a, _t.TorchCSR):
        return a.data.abs().sum() / m
    total = a.values.abs().sum()
    if a.overflow_data is not None:
        total = total + a.overflow_data.abs().sum()
    return total / m


# --------------------------------------------------------------------------------------------------
# autograd of the custom ops. A sparse operand occupies N_SPARSE positional arguments of a schema
# (SparseArgs); ``_at`` names where it starts in each op's inputs, everything else is read by name.
# --------------------------------------------------------------------------------------------------

def _masked(values: Tensor | None, counts: Tensor, tile: int) -> Tensor | None:
    """Zero the padding slots of a gradient in the TiledELL layout (the ops read slots < counts
    only, and ``validate()`` wants padding at 0)."""
    if values is None or tile == 0:
        return values
    filled = torch.arange(values.shape[-1], device=values.device) < counts.unsqueeze(-1)
    return torch.where(filled, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _grads(values: Tensor, ov_data: Tensor | None, g_values: Tensor | None,
           g_ov: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if g_values is None:
        g_values = torch.zeros_like(values)
    if ov_data is None:
        g_ov = None
    elif g_ov is None:
        g_ov = torch.zeros_like(ov_data)
    return g_values, g_ov


def _sparse_grads(d_values: Tensor | None = None, d_ov: Tensor | None = None) -> tuple[Any, ...]:
    """The gradient slots of a sparse operand's N_SPARSE arguments: values and ov_data only."""
    out: list[Any] = [None] * N_SPARSE
    out[SparseArgs._fields.index("values")] = d_values
    out[SparseArgs._fields.index("ov_data")] = d_ov
    return tuple(out)


def _needs(ctx: Any, start: int) -> bool:
    """Whether the sparse operand at ``start`` needs a gradient (its values or overflow values)."""
    return bool(ctx.needs_input_grad[start] or ctx.needs_input_grad[start + SparseArgs._fields.index("ov_data")])


# spmm(*sparse, w, backend) = A @ w; spmm_t(*sparse, dy, backend) = A.T @ dy
def _spmm_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    sp = SparseArgs.take(inputs, 0)
    ctx.sp = sp
    ctx.backend = inputs[-1]
    ctx.save_for_backward(sp.values, sp.ov_data, inputs[N_SPARSE])


def _spmm_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    values, ov_data, w = ctx.saved_tensors
    sp = ctx.sp.with_values(values, ov_data)
    d_values = d_ov = d_w = None
    if _needs(ctx, 0):
        d_values, d_ov = _ops.sddmm(grad, w, *sp, ctx.backend)  # dA = dC @ w.T at A's positions
        d_ov = d_ov if sp.has_overflow else None
    if ctx.needs_input_grad[N_SPARSE]:
        d_w = _ops.spmm_t(*sp, grad, ctx.backend)
    return _sparse_grads(d_values, d_ov) + (d_w, None)


torch.library.register_autograd("sparsecore::spmm", _spmm_backward, setup_context=_spmm_setup)


def _spmm_t_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    values, ov_data, dy = ctx.saved_tensors
    sp = ctx.sp.with_values(values, ov_data)
    d_values = d_ov = d_dy = None
    if _needs(ctx, 0):
        d_values, d_ov = _ops.sddmm(dy, grad, *sp, ctx.backend)  # d A[m, k] = dy[m] . grad[k]
        d_ov = d_ov if sp.has_overflow else None
    if ctx.needs_input_grad[N_SPARSE]:
        d_dy = _ops.spmm(*sp, grad, ctx.backend)
    return _sparse_grads(d_values, d_ov) + (d_dy, None)


torch.library.register_autograd("sparsecore::spmm_t", _spmm_t_backward, setup_context=_spmm_setup)


# sddmm(x, w, *pattern, backend) -> (values, ov_data) in the pattern's layout
def _sddmm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    sp = SparseArgs.take(inputs, 2)
    ctx.sp = sp
    ctx.backend = inputs[-1]
    ctx.save_for_backward(inputs[0], inputs[1], sp.values, sp.ov_data)


def _sddmm_backward(ctx: Any, g_values: Tensor | None, g_ov: Tensor | None) -> tuple[Any, ...]:
    x, w, values, ov_data = ctx.saved_tensors
    g_values, g_ov = _grads(values, ov_data, g_values, g_ov)
    sp = ctx.sp
    ds = sp.with_values(_masked(g_values, sp.counts, sp.tile), g_ov)
    d_x = d_w = None
    if ctx.needs_input_grad[0]:
        d_x = _ops.spmm(*ds, w, ctx.backend)
    if ctx.needs_input_grad[1]:
        d_w = _ops.spmm_t(*ds, x, ctx.backend)
    return (d_x, d_w) + _sparse_grads() + (None,)


torch.library.register_autograd("sparsecore::sddmm", _sddmm_backward, setup_context=_sddmm_setup)


# gated_ffn(x, *gate, w_up, w_down, backend)
_UP, _DOWN = 1 + N_SPARSE, 2 + N_SPARSE


def _gated_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    sp = SparseArgs.take(inputs, 1)
    ctx.sp = sp
    ctx.backend = inputs[-1]
    ctx.save_for_backward(inputs[0], sp.values, sp.ov_data, inputs[_UP], inputs[_DOWN])


def _gated_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, g_vals, g_ov, w_up, w_down = ctx.saved_tensors
    sp, be = ctx.sp.with_values(g_vals, g_ov), ctx.backend
    has_ov = sp.has_overflow
    need = ctx.needs_input_grad
    need_gate = _needs(ctx, 1)
    u_vals = u_ov = dz_vals = dz_ov = None  # each SDDMM only when a wanted gradient reads it
    if need_gate or need[_DOWN]:
        u_vals, u_ov = _ops.sddmm(x, w_up, *sp, be)  # u = x @ w_up.T at the gate
    if need_gate or need[0] or need[_UP]:
        dz_vals, dz_ov = _ops.sddmm(grad, w_down, *sp, be)  # dz = dout @ w_down.T at the gate
    d_x = d_gv = d_gov = d_up = d_down = None
    if need_gate:
        d_gv = dz_vals * u_vals
        d_gov = dz_ov * u_ov if has_ov else None
    if need[_DOWN]:
        z = sp.with_values(g_vals * u_vals, g_ov * u_ov if has_ov else None)
        d_down = _ops.spmm_t(*z, grad, be)
    if need[0] or need[_UP]:
        du = sp.with_values(dz_vals * g_vals, dz_ov * g_ov if has_ov else None)
        if need[0]:
            d_x = _ops.spmm(*du, w_up, be)
        if need[_UP]:
            d_up = _ops.spmm_t(*du, x, be)
    return (d_x,) + _sparse_grads(d_gv, d_gov) + (d_up, d_down, None)


torch.library.register_autograd("sparsecore::gated_ffn", _gated_backward, setup_context=_gated_setup)


# pack(x, threshold, activation, tile, capacity, backend) -> (values, cols, counts, ov_indptr, ov_indices, ov_data)
def _pack_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x = inputs[0]
    ctx.shape = (x.shape[0], x.shape[-1])
    ctx.tile = inputs[3]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(*output[1:5])  # cols, counts, ov_indptr, ov_indices


def _packed_grad(ctx: Any, g_values: Tensor | None, g_ov: Tensor | None, like: Tensor) -> SparseArgs:
    """The gradient of a packed output as a sparse operand of the same structure."""
    cols, counts, ip, ix = ctx.saved_tensors[:4]
    if g_values is None:
        g_values = like.new_zeros(cols.shape)
    if g_ov is None:
        g_ov = like.new_zeros(ix.shape)
    m, k = ctx.shape
    return SparseArgs(_masked(g_values, counts, ctx.tile), cols, counts, ip, ix, g_ov, m, k, ctx.tile, True)


def _pack_backward(ctx: Any, g_values: Tensor | None, g_cols: Any, g_counts: Any, g_ip: Any, g_ix: Any,
                   g_ov: Tensor | None) -> tuple[Any, ...]:
    dh = _packed_grad(ctx, g_values, g_ov, g_values if g_values is not None else g_ov)
    return (_ops.unpack(*dh, ctx.backend), None, None, None, None, None)


torch.library.register_autograd("sparsecore::pack", _pack_backward, setup_context=_pack_setup)


# gated_pack(gate, up, threshold, activation, tile, capacity, backend): pack(act(gate) * up)
def _gated_pack_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    gate, up = inputs[0], inputs[1]
    ctx.shape = (gate.shape[0], gate.shape[-1])
    ctx.tile = inputs[4]
    ctx.relu = inputs[3] == "relu"
    ctx.backend = inputs[-1]
    ctx.save_for_backward(*output[1:5], gate, up)


def _gated_pack_backward(ctx: Any, g_values: Tensor | None, g_cols: Any, g_counts: Any, g_ip: Any, g_ix: Any,
                         g_ov: Tensor | None) -> tuple[Any, ...]:
    gate, up = ctx.saved_tensors[4:]
    dh = _ops.unpack(*_packed_grad(ctx, g_values, g_ov, gate), ctx.backend)  # zero where nothing was kept
    act = torch.relu(gate) if ctx.relu else gate
    d_gate = d_up = None
    if ctx.needs_input_grad[0]:
        d_gate = dh * up * (gate > 0).to(gate.dtype) if ctx.relu else dh * up
    if ctx.needs_input_grad[1]:
        d_up = dh * act
    return (d_gate, d_up, None, None, None, None, None)


torch.library.register_autograd("sparsecore::gated_pack", _gated_pack_backward, setup_context=_gated_pack_setup)


# relu_gate(x, w_gate, threshold, tile, capacity, backend): pack(relu(x @ w_gate.T))
def _relu_gate_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, w_gate = inputs[0], inputs[1]
    ctx.shape = (x.shape[0], w_gate.shape[0])
    ctx.tile = inputs[3]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(*output[1:5], x, w_gate)


def _relu_gate_backward(ctx: Any, g_values: Tensor | None, g_cols: Any, g_counts: Any, g_ip: Any, g_ix: Any,
                        g_ov: Tensor | None) -> tuple[Any, ...]:
    x, w_gate = ctx.saved_tensors[4:]
    dh = _packed_grad(ctx, g_values, g_ov, x)
    d_x = d_w = None
    if ctx.needs_input_grad[0]:
        d_x = _ops.spmm(*dh, w_gate, ctx.backend)
    if ctx.needs_input_grad[1]:
        d_w = _ops.spmm_t(*dh, x, ctx.backend)
    return (d_x, d_w, None, None, None, None)


torch.library.register_autograd("sparsecore::relu_gate", _relu_gate_backward, setup_context=_relu_gate_setup)


# unpack(*sparse, backend)
def _unpack_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    sp = SparseArgs.take(inputs, 0)
    ctx.tile = sp.tile
    ctx.save_for_backward(sp.cols, sp.counts, sp.ov_indptr, sp.ov_indices)
    ctx.has_ov = sp.ov_data is not None


def _unpack_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    cols, counts, ip, ix = ctx.saved_tensors
    m, nt, cap = cols.shape
    tile = ctx.tile
    col = (torch.arange(nt, device=cols.device) * tile).view(1, nt, 1) + cols.to(torch.int64)
    d_values = _masked(grad.gather(1, col.reshape(m, nt * cap)).reshape(m, nt, cap), counts, tile)
    d_ov = None
    if ctx.has_ov:
        rows = torch.searchsorted(ip[1:].to(torch.int64), torch.arange(ix.shape[0], device=ix.device), right=True)
        d_ov = grad[rows, ix.to(torch.int64)]
    return _sparse_grads(d_values, d_ov) + (None,)


torch.library.register_autograd("sparsecore::unpack", _unpack_backward, setup_context=_unpack_setup)
