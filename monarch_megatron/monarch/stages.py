"""The second Monarch stage and its gradients as batched cuBLAS products, shared by the torch path
(:mod:`.torch_path`) and the TMA path (:mod:`.triton_monarch_tma`): on every measured GPU cuBLAS
runs these plain strided products at least as fast as any Triton kernel of ours
(benchmarks/KERNEL_NOTES.md, v5), so both paths keep them.

Shapes: ``v: (n, l, r)`` (the second stage's input, block ``j`` contiguous), ``w2: (l, s, r)``,
output ``(n, l*s)``.
"""

from __future__ import annotations

import torch


def chunk_rows(w1: torch.Tensor, l: int) -> torch.Tensor:
    """``w1p: (k, q, p)``, the rows of ``w1: (k, q, p)`` in the order ``(j, m)`` (row ``j*ch + m`` is
    ``w1[:, m*l + j]``, ``ch = q / l``; needs ``l | q``): a copy of the small factor after which
    first-stage block ``i``'s output column ``j*ch + m`` is ``v[:, j, i*ch + m]``, so the middle
    permutation moves runs of ``ch`` contiguous channels instead of single elements."""
    k, q, p = w1.shape
    return w1.view(k, q // l, l, p).transpose(1, 2).reshape(k, q, p)


def unchunk_rows(w1p: torch.Tensor, l: int) -> torch.Tensor:
    """Inverse of :func:`chunk_rows`: rows ``(j, m)`` back to ``w1``'s order ``m*l + j``."""
    k, q, p = w1p.shape
    return w1p.view(k, l, q // l, p).transpose(1, 2).reshape(k, q, p)


def swap_chunk_axes(t: torch.Tensor) -> torch.Tensor:
    """``t: (n, a, b, ch)`` (contiguous) -> ``(n, b, a, ch)`` contiguous: the chunked middle
    permutation's copy. The runs of ``ch`` channels move as 16-, 8- or 4-byte words where the run's
    bytes allow it: torch's copy kernel for a permuted tensor moves one element per thread, so
    bf16 elements ran it at ~half the memory bandwidth (GPT-2 small on an H200, issue 11)."""
    run = t.shape[-1] * t.element_size()
    for wide in (torch.complex128, torch.int64, torch.int32):
        size = wide.itemsize
        if size > t.element_size() and run % size == 0 and t.data_ptr() % size == 0 and not t.is_complex():
            return t.view(wide).transpose(1, 2).contiguous().view(t.dtype)
    return t.transpose(1, 2).contiguous()


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
    ``grad_out: (n, l*s)``, ``v: (n, l, r)``, ``w2: (l, s, r)``; ``dv`` is ``(n, l, r)``. Complex
    operands enter conjugated (PyTorch's convention; a no-op for real ones)."""
    l, s, r = w2.shape
    n = v.shape[0]
    if output_permutation:
        dy = grad_out.reshape(n, s, l).transpose(1, 2).contiguous()  # (n, l, s)
    else:
        dy = grad_out.reshape(n, l, s)
    dyt = dy.transpose(0, 1)  # (l, n, s)
    dw2 = torch.bmm(dyt.transpose(1, 2), v.transpose(0, 1).conj()) if need_w2 else None
    dv = None
    if need_v:
        dv = v.new_empty(n, l, r)
        torch.bmm(dyt, w2.conj(), out=dv.transpose(0, 1))
    return dw2, dv
