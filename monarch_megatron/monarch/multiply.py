"""The Monarch multiply ``x -> x @ M^T`` for ``M = P L P^T R`` given as two block-diagonal factors.

Semantics (fixed; ../shared/DESIGN.md): with ``w1: (k, q, p)`` and ``w2: (l, s, r)``, for one row x

    u[i] = w1[i] @ x[i*p:(i+1)*p]          i < k
    v    = u.reshape(r, l).T                (l, r)
    y[j] = w2[j] @ v[j]                     j < l
    out  = y.T.reshape(s*l)  if output_permutation  else  y.reshape(l*s)

Backends: ``"torch"`` (two batched matmuls, autograd through them), ``"triton"`` (the fused kernel in
:mod:`monarch_megatron.monarch.triton_monarch`), ``"auto"`` (the fastest correct path available: the
fused kernel on CUDA where it supports the shape, the torch path everywhere else).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .shapes import check_factors

BACKENDS = ("auto", "torch", "triton")


def monarch_multiply_torch(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool = True
) -> torch.Tensor:
    """Reference Monarch multiply with batched matmuls (no Python loop over blocks).

    Args:
        x: ``(..., k*p)`` input (already padded to the factors' input width).
        w1: ``(k, q, p)`` first block-diagonal factor.
        w2: ``(l, s, r)`` second block-diagonal factor.
        output_permutation: paper order (``True``) or block-major order (``False``).

    Returns:
        ``(..., l*s)`` output.
    """
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, k * p)
    n = x2.shape[0]
    # (k, n, p) as a strided view: cuBLAS reads it without a copy.
    u = torch.bmm(x2.view(n, k, p).transpose(0, 1), w1.transpose(1, 2))  # (k, n, q)
    # Middle permutation: flat channel f = i*q + c goes to second-stage block f % l, slot f // l.
    v = u.transpose(0, 1).reshape(n, r, l).permute(2, 0, 1)  # (l, n, r)
    y = torch.bmm(v, w2.transpose(1, 2))  # (l, n, s)
    if output_permutation:
        out = y.permute(1, 2, 0).reshape(n, s * l)
    else:
        out = y.transpose(0, 1).reshape(n, l * s)
    return out.reshape(*batch_shape, l * s)


def _triton_kernel():
    """The fused-kernel module, or ``None`` where Triton (or the kernel) is not importable."""
    try:
        from . import triton_monarch
    except ImportError:
        return None
    return triton_monarch


def resolve_backend(backend: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) that ``backend`` selects for these operands."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "torch":
        return "torch"
    kernel = _triton_kernel()
    if backend == "triton":
        if kernel is None:
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        return "triton"
    if x.is_cuda and kernel is not None and kernel.prefers_triton(x, w1, w2):
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
    if resolve_backend(backend, x, w1, w2) == "triton":
        return _triton_kernel().monarch_multiply_triton(x, w1, w2, output_permutation)
    return monarch_multiply_torch(x, w1, w2, output_permutation)
