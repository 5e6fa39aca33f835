"""Block-diagonal matrices: the layer of the paper authors' ``BlockdiagLinear`` (HazyResearch/fly,
``src/models/layers/blockdiag_linear.py``), the sibling of the Monarch layer.

Semantics (fixed: tests, conversions and checkpoints rely on it). A block-diagonal linear with
``in_features``, ``out_features`` and ``nblocks = b`` has one factor ``w: (b, s, p)`` with
``p = ceil(in/b)`` and ``s = ceil(out/b)`` (fly's ``BlockdiagLinear.weight``). For a row x:

    x is zero-padded to b*p
    y[j*s:(j+1)*s] = w[j] @ x[j*p:(j+1)*p]        j < b
    out            = y[:out_features]

so the dense matrix is ``blockdiag(w[0], ..., w[b-1])`` cut to ``(out_features, in_features)``:
the Monarch product ``P L P^T R`` with ``L`` the identity is ``R`` itself, one block-diagonal
matrix, no permutation. Input and output are both block-major, so the output can enter the
residual stream as it is, and a contiguous range of blocks is a contiguous range of features
on both sides (what tensor parallelism shards, :mod:`monarch_megatron.parallel.sharding`).

The multiply is one batched GEMM per product (forward; input gradient; weight gradient), each on
strided views of the activations: ``x (n, b*p)`` viewed ``(n, b, p)`` and transposed to
``(b, n, p)`` is a view, and the outputs are written (``out=``) straight into their final
``(n, b, s)`` / ``(n, b, p)`` layout, so nothing is copied (cuBLAS takes the batch stride and the
leading dimension as they are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .shapes import check_layer_args


@dataclass(frozen=True)
class BlockdiagShape:
    """Shape of one block-diagonal factor ``w: (nblocks, s, p)`` (``w_shape``); ``nblocks * p`` is
    the padded input width and ``nblocks * s`` the padded output width."""

    in_features: int
    out_features: int
    nblocks: int
    s: int
    p: int

    @property
    def w_shape(self) -> tuple[int, int, int]:
        return (self.nblocks, self.s, self.p)

    @property
    def num_params(self) -> int:
        return math.prod(self.w_shape)


def blockdiag_shape(in_features: int, out_features: int, nblocks: int) -> BlockdiagShape:
    """The factor shape of an ``in_features -> out_features`` block-diagonal matrix with ``nblocks``
    blocks: ``(nblocks, ceil(out/nblocks), ceil(in/nblocks))``; the same argument rules as
    :func:`.shapes.monarch_factor_shapes` (positive integers, ``nblocks <= min(in, out)``)."""
    check_layer_args(in_features, out_features, nblocks)
    return BlockdiagShape(in_features, out_features, nblocks, math.ceil(out_features / nblocks),
                          math.ceil(in_features / nblocks))


class _BlockdiagMultiply(torch.autograd.Function):
    """``out[:, out_block + i] = x[:, in_block + i] @ w[i]^T`` (blocks of ``p`` inputs, ``s``
    outputs); output blocks no ``w[i]`` writes are zero. One ``bmm`` per product, on views."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: torch.Tensor, in_block: int, out_blocks: int, out_block: int):
        b, s, p = w.shape
        n = x2.shape[0]
        xv = x2.view(n, -1, p)[:, in_block:in_block + b].transpose(0, 1)  # (b, n, p), a view
        out = x2.new_empty(n, b, s) if out_blocks == b else x2.new_zeros(n, out_blocks, s)
        torch.bmm(xv, w.transpose(1, 2), out=out[:, out_block:out_block + b].transpose(0, 1))
        ctx.save_for_backward(x2, w)
        ctx.blocks = (in_block, out_blocks, out_block)
        return out.view(n, out_blocks * s)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, w = ctx.saved_tensors
        in_block, out_blocks, out_block = ctx.blocks
        b, s, p = w.shape
        n, width = x2.shape
        dy = grad_out.contiguous().view(n, out_blocks, s)[:, out_block:out_block + b].transpose(0, 1)  # (b, n, s)
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = dw = None
        if need_w:
            dw = torch.bmm(dy.transpose(1, 2), x2.view(n, -1, p)[:, in_block:in_block + b].transpose(0, 1))
        if need_x:
            in_blocks = width // p
            dx = x2.new_empty(n, b, p) if in_blocks == b else x2.new_zeros(n, in_blocks, p)
            torch.bmm(dy, w, out=dx[:, in_block:in_block + b].transpose(0, 1))
            dx = dx.view(n, width)
        return dx, dw, None, None, None


def blockdiag_multiply(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    in_blocks: int | None = None,
    in_block: int = 0,
    out_blocks: int | None = None,
    out_block: int = 0,
) -> torch.Tensor:
    """Multiply ``x`` by the block-diagonal matrix of ``w`` (module docstring), or by a contiguous
    range of the blocks of a larger one (what a tensor-parallel rank holds).

    With ``w: (b, s, p)``: ``x`` has ``in_blocks`` blocks of ``p`` features (zero-padded to
    ``in_blocks * p``); block ``w[i]`` reads input block ``in_block + i`` and writes output block
    ``out_block + i`` of an output of ``out_blocks`` blocks of ``s``; output blocks no ``w[i]``
    writes are zero. The defaults (``in_blocks = out_blocks = b``, offsets 0) are the plain product
    ``y[j] = w[j] @ x[j]``. Under autocast the operands are cast to the autocast dtype, as a
    matmul's are.

    Args:
        x: ``(..., n)`` with ``n <= in_blocks * p``.
        w: ``(b, s, p)`` blocks.
        in_blocks, in_block, out_blocks, out_block: the block range (above);
            ``in_block + b <= in_blocks`` and ``out_block + b <= out_blocks``.

    Returns:
        ``(..., out_blocks * s)``, differentiable with respect to ``x`` and ``w``.
    """
    if w.dim() != 3:
        raise ValueError(f"w must be 3-D (nblocks, s, p), got shape {tuple(w.shape)}")
    b, s, p = w.shape
    in_blocks = b if in_blocks is None else in_blocks
    out_blocks = b if out_blocks is None else out_blocks
    if not (0 <= in_block and in_block + b <= in_blocks and 0 <= out_block and out_block + b <= out_blocks):
        raise ValueError(f"block range out of bounds: {b} blocks from input block {in_block} of {in_blocks} "
                         f"to output block {out_block} of {out_blocks}")
    width = in_blocks * p
    if x.shape[-1] > width:
        raise ValueError(f"x has {x.shape[-1]} features but {in_blocks} input blocks of p={p} take at most {width} "
                         f"(w shape {tuple(w.shape)})")
    if x.shape[-1] < width:
        x = F.pad(x, (0, width - x.shape[-1]))
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, width)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            out = _BlockdiagMultiply.apply(x2.to(dtype).contiguous(), w.to(dtype).contiguous(), in_block,
                                           out_blocks, out_block)
    else:
        if x2.dtype != w.dtype:
            raise ValueError(f"dtypes differ: x {x2.dtype}, w {w.dtype} (cast them, or use autocast)")
        out = _BlockdiagMultiply.apply(x2.contiguous(), w.contiguous(), in_block, out_blocks, out_block)
    return out.reshape(*batch_shape, out_blocks * s)


def blockdiag_to_dense(
    w: torch.Tensor, in_features: int | None = None, out_features: int | None = None, **blocks: int
) -> torch.Tensor:
    """The exact ``(out_features, in_features)`` matrix ``W`` with
    ``blockdiag_multiply(x, w, **blocks) == x @ W.T`` (defaults: the padded widths).

    ``blocks``: the block range of :func:`blockdiag_multiply` (``in_blocks``, ``in_block``,
    ``out_blocks``, ``out_block``). Exact: each entry of ``W`` is one entry of ``w`` times one.
    """
    b, s, p = w.shape
    padded_in = blocks.get("in_blocks", b) * p
    in_features = padded_in if in_features is None else in_features
    out_features = blocks.get("out_blocks", b) * s if out_features is None else out_features
    eye = torch.eye(in_features, padded_in, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        return blockdiag_multiply(eye, w, **blocks)[:, :out_features].t().contiguous()


def project_to_blockdiag(weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The block-diagonal matrix nearest to ``weight`` in Frobenius norm: its diagonal blocks.

    Why this is optimal: with the padded ``weight`` ``W: (b*s, b*p)``, the block-diagonal matrices
    ``B`` are the matrices whose entries outside the diagonal blocks ``D = {(j*s + a, j*p + c)}``
    are zero, a coordinate subspace. The squared Frobenius norm is a sum over entries, so
    ``||W - B||^2 = sum_{(r, c) in D} (W[r, c] - B[r, c])^2 + sum_{(r, c) not in D} W[r, c]^2``:
    the second sum does not depend on ``B`` and the first is zero exactly when ``B`` equals ``W``
    on ``D``. So keeping the diagonal blocks is the unique minimiser (the orthogonal projection
    onto the subspace), the error is the norm of the off-diagonal blocks, and a block-diagonal
    ``weight`` is returned exactly. Padded rows / columns of ``W`` are zero, so the padded entries
    of the blocks come out zero.

    Args:
        weight: ``(out_features, in_features)``.
        nblocks: number of blocks ``b``.

    Returns:
        ``w: (b, s, p)`` (:func:`blockdiag_shape`), in ``weight``'s dtype (entries are copied, not
        computed).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got {shape}")
    out_features, in_features = weight.shape
    shp = blockdiag_shape(in_features, out_features, nblocks)
    b, s, p = shp.w_shape
    padded = weight.new_zeros(b * s, b * p)
    padded[:out_features, :in_features] = weight
    # view (b, s, b, p): [j, a, i, c] = W[j*s + a, i*p + c]; the diagonal i == j is (s, p, b).
    return padded.view(b, s, b, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@torch.no_grad()
def init_blockdiag_(w: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    """Fill ``w: (b, s, p)`` in place so the layer's output variance equals that of a dense layer
    with weights ``N(0, std^2)``.

    Derivation: a dense ``in_features``-input layer gives ``Var(y) = in_features * std^2 * v`` on
    inputs of variance ``v``; an output of a block-diagonal layer sums the ``in_features / b``
    real inputs of its block on average (zero padding adds nothing), so ``N(0, b * std^2)`` gives
    the same variance. (fly's ``BlockdiagLinear`` scales its dense init by ``sqrt(b)`` likewise.)
    """
    if w.dim() != 3:
        raise ValueError(f"w must be 3-D (nblocks, s, p), got shape {tuple(w.shape)}")
    if not std > 0:
        raise ValueError(f"std must be positive, got std={std!r}")
    w.normal_(0.0, std * math.sqrt(w.shape[0]), generator=generator)
