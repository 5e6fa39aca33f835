"""The torch path of the Monarch multiply: two batched cuBLAS products with autograd, any device.

Semantics (fixed; ../shared/DESIGN.md): with ``w1: (k, q, p)`` and ``w2: (l, s, r)``, for one row x

    u[i] = w1[i] @ x[i*p:(i+1)*p]          i < k
    v    = u.reshape(r, l).T                (l, r)
    y[j] = w2[j] @ v[j]                     j < l
    out  = y.T.reshape(s*l)  if output_permutation  else  y.reshape(l*s)

It is the reference the Triton paths are checked against, the path ``backend="auto"`` takes
off Hopper and for complex operands, and the one :func:`.dense.monarch_to_dense` evaluates exactly.

Complex factors and inputs are supported: the backward multiplies by the *conjugates* of the
saved operands, which is PyTorch's convention for complex gradients (those of ``x @ W.T`` are
``dy @ conj(W)`` and ``dy.T @ conj(x)``). ``conj()`` of a real tensor is the tensor itself, so the
real path is unchanged.
"""

from __future__ import annotations

import torch

from .stages import chunk_rows, second_stage, second_stage_grads, swap_chunk_axes, unchunk_rows


class _MonarchMultiplyTorch(torch.autograd.Function):
    """Two batched matmuls whose outputs are written (``out=``) straight into the memory layout the
    next step reads, so each direction moves the activations through one permutation copy (two in
    the paper's output order), the same number as the paper authors' implementation.

    Where ``l`` divides ``q`` (every shape of the recipes) the first factor's rows are taken in the
    order ``(j, m)`` (:func:`.stages.chunk_rows`, a copy of the small factor), so that copy moves
    runs of ``ch = q/l`` contiguous channels instead of gathering single elements ``l`` apart; the
    weight gradient is put back into ``w1``'s row order (a copy of the small gradient)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool):
        k, q, p = w1.shape
        l, r = w2.shape[0], w2.shape[2]
        n = x2.shape[0]
        chunked = q % l == 0
        w1u = chunk_rows(w1, l) if chunked else w1  # the rows stage one uses
        xv = x2.view(n, k, p).transpose(0, 1)  # (k, n, p), strided view: no copy
        u = x2.new_empty(n, k, q)
        torch.bmm(xv, w1u.transpose(1, 2), out=u.transpose(0, 1))
        # Middle permutation: flat channel f = i*q + c goes to second-stage block f % l, slot f // l;
        # with chunked rows, u[:, i, j*ch + m] holds channel c = m*l + j, i.e. v[:, j, i*ch + m].
        if chunked:
            v = swap_chunk_axes(u.view(n, k, l, q // l)).view(n, l, r)
        else:
            v = u.view(n, r, l).transpose(1, 2).contiguous()  # (n, l, r)
        ctx.save_for_backward(x2, w1u, w2, v)
        ctx.output_permutation, ctx.chunked = output_permutation, chunked
        return second_stage(v, w2, output_permutation)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, w1u, w2, v = ctx.saved_tensors
        k, q, p = w1u.shape
        l = w2.shape[0]
        n = x2.shape[0]
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dw2, dv = second_stage_grads(grad_out, v, w2, ctx.output_permutation, need_w2, need_x or need_w1)
        dx = dw1 = None
        if dv is not None:
            # Inverse permutation into w1u's row order, (k, n, q).
            if ctx.chunked:
                du = swap_chunk_axes(dv.view(n, l, k, q // l)).view(n, k, q).transpose(0, 1)
            else:
                du = dv.transpose(1, 2).reshape(n, k, q).transpose(0, 1)
            if need_w1:
                dw1 = torch.bmm(du.transpose(1, 2), x2.view(n, k, p).transpose(0, 1).conj())
                if ctx.chunked:
                    dw1 = unchunk_rows(dw1, l)
            if need_x:
                dx = x2.new_empty(n, k, p)
                torch.bmm(du, w1u.conj(), out=dx.transpose(0, 1))
                dx = dx.view(n, k * p)
        return dx, dw1, dw2, None


def monarch_multiply_torch(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool = True
) -> torch.Tensor:
    """Reference Monarch multiply with batched matmuls (no Python loop over blocks).

    Under autocast the operands are cast to the autocast dtype, as a matmul would be.

    Args:
        x: ``(..., k*p)`` input (already padded to the factors' input width).
        w1: ``(k, q, p)`` first block-diagonal factor.
        w2: ``(l, s, r)`` second block-diagonal factor.
        output_permutation: paper order (``True``) or block-major order (``False``).

    Returns:
        ``(..., l*s)`` output.
    """
    k, _, p = w1.shape
    l, s, _ = w2.shape
    batch_shape = x.shape[:-1]
    device_type = x.device.type
    x2 = x.reshape(-1, k * p)
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            out = _MonarchMultiplyTorch.apply(x2.to(dtype).contiguous(), w1.to(dtype).contiguous(),
                                              w2.to(dtype).contiguous(), output_permutation)
    else:
        # The common training case (DeepSpeed half-precision model): no context managers, no casts.
        out = _MonarchMultiplyTorch.apply(x2.contiguous(), w1.contiguous(), w2.contiguous(), output_permutation)
    return out.reshape(*batch_shape, l * s)
