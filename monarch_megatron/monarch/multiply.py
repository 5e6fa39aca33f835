"""The Monarch multiply ``x -> x @ M^T`` for ``M = P L P^T R`` given as two block-diagonal factors.

Semantics (fixed; ../shared/DESIGN.md): with ``w1: (k, q, p)`` and ``w2: (l, s, r)``, for one row x

    u[i] = w1[i] @ x[i*p:(i+1)*p]          i < k
    v    = u.reshape(r, l).T                (l, r)
    y[j] = w2[j] @ v[j]                     j < l
    out  = y.T.reshape(s*l)  if output_permutation  else  y.reshape(l*s)

Backends: ``"torch"`` (two batched matmuls, autograd through them), ``"triton"`` (on Hopper the TMA
kernels of :mod:`.triton_monarch_tma` with cuBLAS for the plain products, elsewhere the fused kernel
of :mod:`.triton_monarch`), ``"auto"`` (the fastest correct path: the TMA path on Hopper where it
applies, the torch path everywhere else; the environment variable ``MONARCH_MULTIPLY_BACKEND``
overrides it for a whole run).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .shapes import check_factors

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "MONARCH_MULTIPLY_BACKEND"  # overrides backend="auto" when set


def second_stage(v: torch.Tensor, w2: torch.Tensor, output_permutation: bool) -> torch.Tensor:
    """``y_j = v_j @ w2[j]^T`` by one batched cuBLAS product. ``v: (n, l, r)`` (the second stage's
    input, block ``j`` contiguous), ``w2: (l, s, r)``; returns ``(n, l*s)`` in the requested order
    (the paper order costs one copy of the output)."""
    l, s, _ = w2.shape
    n = v.shape[0]
    y = v.new_empty(n, l, s)
    torch.bmm(v.transpose(0, 1), w2.transpose(1, 2), out=y.transpose(0, 1))
    return y.transpose(1, 2).reshape(n, s * l) if output_permutation else y.view(n, l * s)


def second_stage_grads(grad_out: torch.Tensor, v: torch.Tensor, w2: torch.Tensor, output_permutation: bool,
                       need_w2: bool, need_v: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`second_stage`: ``(dw2, dv)`` (``None`` where not needed).
    ``grad_out: (n, l*s)``, ``v: (n, l, r)``, ``w2: (l, s, r)``; ``dv`` is ``(n, l, r)``."""
    l, s, r = w2.shape
    n = v.shape[0]
    if output_permutation:
        dy = grad_out.reshape(n, s, l).transpose(1, 2).contiguous()  # (n, l, s)
    else:
        dy = grad_out.reshape(n, l, s)
    dyt = dy.transpose(0, 1)  # (l, n, s)
    dw2 = torch.bmm(dyt.transpose(1, 2), v.transpose(0, 1)) if need_w2 else None
    dv = None
    if need_v:
        dv = v.new_empty(n, l, r)
        torch.bmm(dyt, w2, out=dv.transpose(0, 1))
    return dw2, dv


class _MonarchMultiplyTorch(torch.autograd.Function):
    """Two batched matmuls whose outputs are written (``out=``) straight into the memory layout the
    next step reads, so each direction moves the activations through one permutation copy (two in
    the paper's output order), the same number as the paper authors' implementation."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool):
        k, q, p = w1.shape
        l, r = w2.shape[0], w2.shape[2]
        n = x2.shape[0]
        xv = x2.view(n, k, p).transpose(0, 1)  # (k, n, p), strided view: no copy
        u = x2.new_empty(n, k, q)
        torch.bmm(xv, w1.transpose(1, 2), out=u.transpose(0, 1))
        # Middle permutation: flat channel f = i*q + c goes to second-stage block f % l, slot f // l.
        v = u.view(n, r, l).transpose(1, 2).contiguous()  # (n, l, r)
        ctx.save_for_backward(x2, w1, w2, v)
        ctx.output_permutation = output_permutation
        return second_stage(v, w2, output_permutation)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, w1, w2, v = ctx.saved_tensors
        k, q, p = w1.shape
        n = x2.shape[0]
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dw2, dv = second_stage_grads(grad_out, v, w2, ctx.output_permutation, need_w2, need_x or need_w1)
        dx = dw1 = None
        if dv is not None:
            du = dv.transpose(1, 2).reshape(n, k, q).transpose(0, 1)  # inverse permutation, (k, n, q)
            if need_w1:
                dw1 = torch.bmm(du.transpose(1, 2), x2.view(n, k, p).transpose(0, 1))
            if need_x:
                dx = x2.new_empty(n, k, p)
                torch.bmm(du, w1, out=dx.transpose(0, 1))
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


def _triton_kernel():
    """The fused-kernel module, or ``None`` where Triton (or the kernel) is not importable."""
    try:
        from . import triton_monarch
    except ImportError:
        return None
    return triton_monarch


def resolve_backend(
    backend: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool | None = None
) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) that ``backend`` selects for these operands
    (``output_permutation=None``: the fused path must win in both output orders)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "auto" and os.environ.get(BACKEND_ENV):
        # Whole-run override of the automatic choice (e.g. to compare both paths in one training setup).
        backend = os.environ[BACKEND_ENV]
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    kernel = _triton_kernel()
    if backend == "triton":
        if kernel is None:
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        return "triton"
    if x.is_cuda and kernel is not None and kernel.prefers_triton(x, w1, w2, output_permutation):
        return "triton"
    return "torch"


def monarch_multiply(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    output_permutation: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Multiply ``x`` by the Monarch matrix given by factors ``w1`` and ``w2``.

    Args:
        x: ``(..., n)`` input with ``n <= k*p``; it is zero-padded to ``k*p`` when shorter.
        w1: ``(k, q, p)`` first block-diagonal factor (``R``).
        w2: ``(l, s, r)`` second block-diagonal factor (``L``), ``l*r == k*q``.
        output_permutation: ``True`` for the paper's order ``M = P L P^T R``; ``False`` for
            block-major output (``y.reshape(l*s)``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(..., l*s)`` output, differentiable with respect to ``x``, ``w1`` and ``w2``.
    """
    check_factors(w1, w2)
    padded_in = w1.shape[0] * w1.shape[2]
    if x.shape[-1] > padded_in:
        raise ValueError(
            f"x has {x.shape[-1]} features but the factors take at most k*p={padded_in} "
            f"(w1 shape {tuple(w1.shape)})"
        )
    if x.shape[-1] < padded_in:
        x = F.pad(x, (0, padded_in - x.shape[-1]))
    if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(
            f"dtypes differ: x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype} (cast them, or use autocast)"
        )
    if resolve_backend(backend, x, w1, w2, output_permutation) == "triton":
        return _triton_kernel().monarch_multiply_triton(x, w1, w2, output_permutation)
    return monarch_multiply_torch(x, w1, w2, output_permutation)
