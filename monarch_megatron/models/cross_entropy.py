"""Cross entropy over the vocabulary in two passes over the logits, as Triton kernels.

Why not megatron-core's ``vocab_parallel_cross_entropy``: it materialises the logits in fp32, then
max, subtract, exp, sum and divide each make a pass over that fp32 copy, and the backward two more,
about 52 bytes of memory traffic per logit (plus an fp32 softmax kept for the backward). For GPT-2
small at micro batch 16 that is 824M logits, ~43 GB, ~10 ms per micro-step on an H200: as much as
a third of the step, in both phases. Here the forward reads the (bf16) logits once, keeping a
running max and sum of exponentials per row in fp32 (online softmax), and writes one loss and one
log-sum-exp per row; the backward reads them once more and writes the gradient in the logits'
dtype: ~6 bytes per logit, and nothing of vocabulary size is kept but the logits themselves.
megatron-core's own fused variant (``cross_entropy_loss_fusion``) keeps the fp32 passes and casts
its gradient to bf16 whatever the dtype; Transformer Engine's is not installed here.

Scope: the vocabulary of one tensor-parallel rank holds the whole vocabulary (TP = 1), on CUDA or
under the Triton interpreter; everything else takes megatron-core's function (``applies``).
Shapes: ``logits [N, V]`` (any float dtype, rows contiguous), ``labels [N]`` int; returns the
per-row loss ``[N]`` in fp32, ``lse[n] - logits[n, labels[n]]`` (a label outside ``[0, V)`` counts
a target logit of 0 and no one-hot in the gradient, megatron-core's convention).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the fallback is used
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if triton is not None:

    @triton.jit
    def _forward_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V, stride_row, BLOCK: tl.constexpr):
        """One row per program: online max / sum of exp over the row in BLOCK-wide slices."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        offs = tl.arange(0, BLOCK)
        # Per-lane running max and sum (combined at the end): no cross-lane reduction per slice.
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # Lanes still at -inf (a masked tail) keep s = 0 without producing exp(-inf - -inf).
            s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
            m = m_new
        row_max = tl.max(m, 0)
        total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - row_max)), 0)
        lse = row_max + tl.log(total)
        label = tl.load(labels_ptr + row).to(tl.int64)
        # A label outside the vocabulary (BERT's -1 on unmasked positions, which the loss mask
        # drops) reads nothing and counts a target logit of 0, as megatron-core's function does.
        valid = (label >= 0) & (label < V)
        target = tl.load(base + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, lse - target)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _backward_kernel(logits_ptr, labels_ptr, lse_ptr, grad_loss_ptr, grad_ptr, V, stride_row, stride_grad,
                         BLOCK: tl.constexpr):
        """``grad[n, v] = (softmax[n, v] - [v == label]) * grad_loss[n]``, in the logits' dtype."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        out = grad_ptr + row * stride_grad
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_loss_ptr + row).to(tl.float32)
        label = tl.load(labels_ptr + row).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            d = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * g
            tl.store(out + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)


def _block(v: int) -> int:
    """Slice width: 16 when interpreted (small test rows still loop), else up to 4096 (8 KB of bf16
    per load, enough bytes in flight per program to keep the row streaming)."""
    if _INTERPRET:
        return 16
    return min(4096, triton.next_power_of_2(v))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, v = logits.shape
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        _forward_kernel[(n,)](logits, labels, loss, lse, v, logits.stride(0), BLOCK=_block(v),
                              num_warps=1 if _INTERPRET else 8)
        ctx.save_for_backward(logits, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        n, v = logits.shape
        grad = torch.empty_like(logits)
        _backward_kernel[(n,)](logits, labels, lse, grad_loss.contiguous(), grad, v, logits.stride(0), grad.stride(0),
                               BLOCK=_block(v), num_warps=1 if _INTERPRET else 8)
        return grad, None


def applies(logits: torch.Tensor, tp_size: int) -> bool:
    """Whether the fused kernels take these logits (else megatron-core's function does)."""
    return triton is not None and tp_size == 1 and (logits.is_cuda or _INTERPRET) and logits.stride(-1) == 1


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross entropy ``[N]`` (fp32) of ``logits [N, V]`` against ``labels [N]``;
    differentiable in ``logits``. Only where :func:`applies` holds."""
    if logits.stride(0) != logits.shape[1]:
        logits = logits.contiguous()
    return _CrossEntropy.apply(logits, labels.contiguous())
