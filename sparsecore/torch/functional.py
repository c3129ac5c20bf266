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
from .ops import TorchTiledELL, gated_ffn, pack, relu_gate, sddmm, spmm, spmm_t, unpack

__all__ = ["relu_gated_ffn", "l1_penalty", "pack", "unpack", "spmm", "sddmm", "spmm_t", "gated_ffn",
           "relu_gate"]

Tensor = torch.Tensor
_N_SPARSE = 10  # values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted


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
# autograd of the custom ops
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


def _with(sp: tuple[Any, ...], values: Tensor, ov_data: Tensor | None) -> tuple[Any, ...]:
    """The sparse-operand arguments ``sp`` with other values."""
    return (values, sp[1], sp[2], sp[3], sp[4], ov_data if sp[3] is not None else None) + tuple(sp[6:])


def _sparse_nones() -> tuple[None, ...]:
    return (None,) * _N_SPARSE


# spmm(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, w, backend)
def _spmm_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.sp = inputs[:_N_SPARSE]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(inputs[0], inputs[5], inputs[_N_SPARSE])


def _spmm_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    values, ov_data, w = ctx.saved_tensors
    sp = _with(ctx.sp, values, ov_data)
    d_values = d_ov = d_w = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[5]:
        d_values, d_ov = torch.ops.sparsecore.sddmm(grad, w, *sp, ctx.backend)
        if ov_data is None:
            d_ov = None
    if ctx.needs_input_grad[_N_SPARSE]:
        d_w = torch.ops.sparsecore.spmm_t(*sp, grad, ctx.backend)
    return (d_values, None, None, None, None, d_ov, None, None, None, None, d_w, None)


torch.library.register_autograd("sparsecore::spmm", _spmm_backward, setup_context=_spmm_setup)


# spmm_t(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, dy, backend) = A.T @ dy
def _spmm_t_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    values, ov_data, dy = ctx.saved_tensors
    sp = _with(ctx.sp, values, ov_data)
    d_values = d_ov = d_dy = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[5]:
        # d A[m, k] = dy[m] . grad[k]
        d_values, d_ov = torch.ops.sparsecore.sddmm(dy, grad, *sp, ctx.backend)
        if ov_data is None:
            d_ov = None
    if ctx.needs_input_grad[_N_SPARSE]:
        d_dy = torch.ops.sparsecore.spmm(*sp, grad, ctx.backend)
    return (d_values, None, None, None, None, d_ov, None, None, None, None, d_dy, None)


torch.library.register_autograd("sparsecore::spmm_t", _spmm_t_backward, setup_context=_spmm_setup)


# sddmm(x, w, values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, backend)
def _sddmm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.sp = inputs[2:2 + _N_SPARSE]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[7])


def _sddmm_backward(ctx: Any, g_values: Tensor | None, g_ov: Tensor | None) -> tuple[Any, ...]:
    x, w, values, ov_data = ctx.saved_tensors
    g_values, g_ov = _grads(values, ov_data, g_values, g_ov)
    ds = _with(ctx.sp, _masked(g_values, ctx.sp[2], ctx.sp[8]), g_ov)
    d_x = d_w = None
    if ctx.needs_input_grad[0]:
        d_x = torch.ops.sparsecore.spmm(*ds, w, ctx.backend)
    if ctx.needs_input_grad[1]:
        d_w = torch.ops.sparsecore.spmm_t(*ds, x, ctx.backend)
    return (d_x, d_w) + _sparse_nones() + (None,)


torch.library.register_autograd("sparsecore::sddmm", _sddmm_backward, setup_context=_sddmm_setup)


# gated_ffn(x, values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, w_up, w_down, backend)
def _gated_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.sp = inputs[1:1 + _N_SPARSE]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(inputs[0], inputs[1], inputs[6], inputs[11], inputs[12])


def _gated_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, g_vals, g_ov, w_up, w_down = ctx.saved_tensors
    sp, be = _with(ctx.sp, g_vals, g_ov), ctx.backend
    has_ov = g_ov is not None
    need = ctx.needs_input_grad
    u_vals, u_ov = torch.ops.sparsecore.sddmm(x, w_up, *sp, be)  # u = x @ w_up.T at the gate
    dz_vals, dz_ov = torch.ops.sparsecore.sddmm(grad, w_down, *sp, be)  # dz = dout @ w_down.T at the gate
    d_x = d_gv = d_gov = d_up = d_down = None
    if need[1] or need[6]:
        d_gv = dz_vals * u_vals
        d_gov = dz_ov * u_ov if has_ov else None
    if need[12]:
        z = _with(ctx.sp, g_vals * u_vals, g_ov * u_ov if has_ov else None)
        d_down = torch.ops.sparsecore.spmm_t(*z, grad, be)
    if need[0] or need[11]:
        du = _with(ctx.sp, dz_vals * g_vals, dz_ov * g_ov if has_ov else None)
        if need[0]:
            d_x = torch.ops.sparsecore.spmm(*du, w_up, be)
        if need[11]:
            d_up = torch.ops.sparsecore.spmm_t(*du, x, be)
    return (d_x, d_gv, None, None, None, None, d_gov, None, None, None, None, d_up, d_down, None)


torch.library.register_autograd("sparsecore::gated_ffn", _gated_backward, setup_context=_gated_setup)


# pack(x, threshold, activation, tile, capacity, backend) -> (values, cols, counts, ov_indptr, ov_indices, ov_data)
def _pack_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x = inputs[0]
    ctx.shape = (x.shape[0], x.shape[-1])
    ctx.tile = inputs[3]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output[1], output[2], output[3], output[4])


def _packed_grad(ctx: Any, g_values: Tensor | None, g_ov: Tensor | None, like: Tensor) -> tuple[Any, ...]:
    cols, counts, ip, ix = ctx.saved_tensors
    if g_values is None:
        g_values = like.new_zeros(cols.shape)
    if g_ov is None:
        g_ov = like.new_zeros(ix.shape)
    m, k = ctx.shape
    return (_masked(g_values, counts, ctx.tile), cols, counts, ip, ix, g_ov, m, k, ctx.tile, True)


def _pack_backward(ctx: Any, g_values: Tensor | None, g_cols: Any, g_counts: Any, g_ip: Any, g_ix: Any,
                   g_ov: Tensor | None) -> tuple[Any, ...]:
    dh = _packed_grad(ctx, g_values, g_ov, g_values if g_values is not None else g_ov)
    d_x = torch.ops.sparsecore.unpack(*dh, ctx.backend)
    return (d_x, None, None, None, None, None)


torch.library.register_autograd("sparsecore::pack", _pack_backward, setup_context=_pack_setup)


# relu_gate(x, w_gate, threshold, tile, capacity, backend): pack(relu(x @ w_gate.T))
def _relu_gate_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, w_gate = inputs[0], inputs[1]
    ctx.shape = (x.shape[0], w_gate.shape[0])
    ctx.tile = inputs[3]
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output[1], output[2], output[3], output[4], x, w_gate)


def _relu_gate_backward(ctx: Any, g_values: Tensor | None, g_cols: Any, g_counts: Any, g_ip: Any, g_ix: Any,
                        g_ov: Tensor | None) -> tuple[Any, ...]:
    x, w_gate = ctx.saved_tensors[4:]
    cols, counts, ip, ix = ctx.saved_tensors[:4]
    if g_values is None:
        g_values = x.new_zeros(cols.shape)
    if g_ov is None:
        g_ov = x.new_zeros(ix.shape)
    m, k = ctx.shape
    dh = (_masked(g_values, counts, ctx.tile), cols, counts, ip, ix, g_ov, m, k, ctx.tile, True)
    d_x = d_w = None
    if ctx.needs_input_grad[0]:
        d_x = torch.ops.sparsecore.spmm(*dh, w_gate, ctx.backend)
    if ctx.needs_input_grad[1]:
        d_w = torch.ops.sparsecore.spmm_t(*dh, x, ctx.backend)
    return (d_x, d_w, None, None, None, None)


torch.library.register_autograd("sparsecore::relu_gate", _relu_gate_backward, setup_context=_relu_gate_setup)


# unpack(values, cols, counts, ov_indptr, ov_indices, ov_data, m, k, tile, sorted, backend)
def _unpack_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.tile = inputs[8]
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3], inputs[4])
    ctx.has_ov = inputs[5] is not None


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
    return (d_values, None, None, None, None, d_ov, None, None, None, None, None)


torch.library.register_autograd("sparsecore::unpack", _unpack_backward, setup_context=_unpack_setup)
