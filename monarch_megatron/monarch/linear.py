"""``MonarchLinear``: a drop-in ``nn.Linear`` replacement whose weight is a Monarch matrix."""

from __future__ import annotations

import math

import torch
from torch import nn

from .dense import monarch_to_dense, project_to_monarch
from .init import init_monarch_
from .multiply import monarch_multiply
from .options import MonarchOptions
from .shapes import monarch_factor_shapes


class MonarchLinear(nn.Module):
    """``y = x @ M^T + bias`` with ``M`` a Monarch matrix with ``nblocks`` blocks.

    Parameters ``blkdiag1: (k, q, p)``, ``blkdiag2: (l, s, r)`` (shapes in ../shared/DESIGN.md) and
    ``bias: (out_features,)``. Inputs are zero-padded to ``k*p`` and outputs cut to ``out_features``.
    ``options`` choose how the multiply runs (:class:`.options.MonarchOptions`; ``None``: the run's
    defaults); they change no result beyond rounding.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        output_permutation: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        options: MonarchOptions | None = None,
    ) -> None:
        super().__init__()
        self.shape = monarch_factor_shapes(in_features, out_features, nblocks)
        if options is not None and not isinstance(options, MonarchOptions):
            raise TypeError(f"options must be a MonarchOptions or None, got {type(options).__name__}")
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.output_permutation = output_permutation
        self.options = options
        factory = {"device": device, "dtype": dtype}
        self.blkdiag1 = nn.Parameter(torch.empty(self.shape.w1_shape, **factory))
        self.blkdiag2 = nn.Parameter(torch.empty(self.shape.w2_shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init has weight variance 1 / (3 * in_features); match it.
        init_monarch_(self.blkdiag1, self.blkdiag2, self.in_features, 1.0 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in_features)`` -> ``(..., out_features)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        out = monarch_multiply(x, self.blkdiag1, self.blkdiag2, self.output_permutation, self.options)
        out = out[..., : self.out_features]
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The exact ``(out_features, in_features)`` weight matrix."""
        return monarch_to_dense(
            self.blkdiag1, self.blkdiag2, self.in_features, self.out_features, self.output_permutation
        )

    @classmethod
    @torch.no_grad()
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        nblocks: int = 4,
        output_permutation: bool = True,
        options: MonarchOptions | None = None,
    ) -> "MonarchLinear":
        """The optimal Monarch projection of a dense ``weight: (out, in)`` (and ``bias: (out,)``)."""
        w1, w2 = project_to_monarch(weight, nblocks, output_permutation)
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, nblocks, bias=bias is not None,
            output_permutation=output_permutation, device=weight.device, dtype=weight.dtype, options=options,
        )
        layer.blkdiag1.copy_(w1)
        layer.blkdiag2.copy_(w2)
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
            layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        saving = dense / self.shape.num_params
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}, output_permutation={self.output_permutation}, "
            f"params={self.shape.num_params} (dense {dense}: {saving:.2f}x saving)"
        )
