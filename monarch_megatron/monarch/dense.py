"""Exact Monarch -> dense conversion and the optimal dense -> Monarch projection (Algorithm 1, generalised).

Structure used by the projection: first-stage output channel ``f = i*q + c`` (block ``i``, row ``c``)
feeds second-stage block ``j = f % l`` at slot ``m = f // l``. So the dense sub-block joining input
block ``i`` to output block ``j`` is ``sum_{f in S_ij} w2[j][:, m(f)] (outer) w1[i][c(f), :]`` with
``S_ij = {f in [i*q, (i+1)*q) : f % l == j}``: a matrix of rank at most ``|S_ij|``. Every row of
``w1`` and every column of ``w2`` belongs to exactly one pair ``(i, j)``, so the pairs are independent
and the best Monarch approximation in Frobenius norm replaces each sub-block by its best
rank-``|S_ij|`` approximation (Eckart-Young), split as ``U sqrt(S)`` into ``w2`` and ``sqrt(S) V^H``
into ``w1``. Zero padding of inputs/outputs adds zero rows/columns, which change no singular vectors
of the real part, so padded entries come out zero.

Complex matrices are projected by the complex SVD (the same argument holds with ``V^H`` for
``V^T``; the multiply involves no conjugation): so the DFT, whose columns permuted by swapping the
axes of a ``sqrt(n) x sqrt(n)`` grid give a Monarch matrix, is recovered exactly.
"""

from __future__ import annotations

import torch

from .shapes import check_factors, monarch_factor_shapes
from .torch_path import monarch_multiply_torch


def monarch_to_dense(
    w1: torch.Tensor,
    w2: torch.Tensor,
    in_features: int | None = None,
    out_features: int | None = None,
    output_permutation: bool = True,
) -> torch.Tensor:
    """The exact dense matrix of a Monarch matrix.

    Args:
        w1: ``(k, q, p)`` first factor.
        w2: ``(l, s, r)`` second factor.
        in_features: real input width (default ``k*p``); padded inputs are dropped.
        out_features: real output width (default ``l*s``); padded outputs are dropped.
        output_permutation: the output order the factors are used with.

    Returns:
        ``(out_features, in_features)`` matrix ``W`` with ``monarch_multiply(x) == x @ W.T``.
    """
    check_factors(w1, w2)
    padded_in = w1.shape[0] * w1.shape[2]
    in_features = padded_in if in_features is None else in_features
    out_features = w2.shape[0] * w2.shape[1] if out_features is None else out_features
    eye = torch.eye(in_features, padded_in, device=w1.device, dtype=w1.dtype)
    # Row e_i of the identity maps to column i of W; the multiply is linear, so this is exact.
    columns = monarch_multiply_torch(eye, w1, w2, output_permutation)
    return columns[:, :out_features].t().contiguous()


def _output_positions(l: int, s: int, output_permutation: bool, device: torch.device) -> torch.Tensor:
    """``(l, s)`` index of the output position of slot ``a`` of second-stage block ``j``."""
    j = torch.arange(l, device=device).view(l, 1)
    a = torch.arange(s, device=device).view(1, s)
    return a * l + j if output_permutation else j * s + a


def project_to_monarch(
    weight: torch.Tensor, nblocks: int, output_permutation: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Monarch matrix nearest to ``weight`` in Frobenius norm (Algorithm 1, any shape and nblocks).

    Args:
        weight: ``(out_features, in_features)`` dense matrix.
        nblocks: number of blocks ``b``.
        output_permutation: the output order the factors will be used with.

    Returns:
        ``(w1, w2)`` with shapes from :func:`monarch_factor_shapes`, in ``weight``'s dtype; the
        SVDs run in float64 (complex128 for complex weights).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got {shape}")
    out_features, in_features = weight.shape
    shp = monarch_factor_shapes(in_features, out_features, nblocks)
    k, q, p, l, s, r = shp.k, shp.q, shp.p, shp.l, shp.s, shp.r
    dev = weight.device
    work = torch.complex128 if weight.is_complex() else torch.float64
    w = torch.zeros(shp.padded_out, shp.padded_in, dtype=work, device=dev)
    w[:out_features, :in_features] = weight.to(work)
    # blocks[j, i] is the (s, p) sub-block joining input block i to output block j.
    rows = w[_output_positions(l, s, output_permutation, dev).reshape(-1)]  # (l*s, k*p)
    blocks = rows.view(l, s, k, p).permute(0, 2, 1, 3)  # (l, k, s, p)
    u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)  # (l,k,s,R) (l,k,R) (l,k,R,p)
    rank_cap = sv.shape[-1]
    root = sv.sqrt()

    f = torch.arange(k * q, device=dev)
    i, c, j, m = f // q, f % q, f % l, f // l
    # Channel f is the rho-th member of S_ij: members are f = j + l*t, t from ceil((i*q - j)/l).
    first_t = torch.div(i * q - j + (l - 1), l, rounding_mode="floor")
    rho = m - first_t
    keep = rho < rank_cap  # more channels than min(s, p): the extra ones carry nothing
    rho_c = rho.clamp(max=rank_cap - 1)
    scale = torch.where(keep, root[j, i, rho_c], torch.zeros((), dtype=torch.float64, device=dev))
    w1 = torch.zeros(k, q, p, dtype=work, device=dev)
    w1[i, c] = scale.unsqueeze(-1) * vh[j, i, rho_c]
    w2 = torch.zeros(l, s, r, dtype=work, device=dev)
    w2[j, :, m] = scale.unsqueeze(-1) * u[j, i, :, rho_c]
    return w1.to(weight.dtype), w2.to(weight.dtype)
