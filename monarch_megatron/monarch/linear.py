"""``MonarchLinear`` and ``BlockdiagLinear``: drop-in ``nn.Linear`` replacements whose weight is a
Monarch matrix or a block-diagonal one, on one small base class (as fly's ``StructuredLinear``):
the subclass says how its factors multiply and what matrix they are; padding, bias and checks are
shared."""

from __future__ import annotations

import math

import torch
from torch import nn

from .blockdiag import blockdiag_multiply, blockdiag_shape, blockdiag_to_dense, init_blockdiag_, project_to_blockdiag
from .dense import monarch_to_dense, project_to_monarch
from .init import init_monarch_
from .multiply import monarch_multiply
from .options import MonarchOptions
from .shapes import monarch_factor_shapes


class _StructuredLinear(nn.Module):
    """``y = x @ W^T + bias`` with ``W`` given by factors (the subclass's ``_multiply`` /
    ``to_dense``); inputs are zero-padded by the multiply, outputs cut to ``out_features``."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, num_params: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.num_params = num_params

    def _add_parameters(self, factors: dict[str, tuple[int, ...]], bias: bool, factory: dict) -> None:
        """Register the factors (name -> shape; uninitialised), then the bias (as ``nn.Linear``
        orders weight and bias), and initialise them (``reset_parameters``)."""
        for name, shape in factors.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def reset_bias(self) -> None:
        """``nn.Linear``'s bias init."""
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in_features)`` -> ``(..., padded out)`` by the factors."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in_features)`` -> ``(..., out_features)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        out = self._multiply(x)[..., : self.out_features]
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def _filled(self, bias: torch.Tensor | None, **factors: torch.Tensor) -> "_StructuredLinear":
        """This layer with ``factors`` and ``bias`` (``(out_features,)``, or ``None``) copied in."""
        for name, value in factors.items():
            getattr(self, name).copy_(value)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias.copy_(bias)
        return self

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}, params={self.num_params} (dense {dense}: "
            f"{dense / self.num_params:.2f}x saving)"
        )


class MonarchLinear(_StructuredLinear):
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
        shape = monarch_factor_shapes(in_features, out_features, nblocks)
        if options is not None and not isinstance(options, MonarchOptions):
            raise TypeError(f"options must be a MonarchOptions or None, got {type(options).__name__}")
        super().__init__(in_features, out_features, nblocks, shape.num_params)
        self.shape = shape
        self.output_permutation = output_permutation
        self.options = options
        self._add_parameters({"blkdiag1": shape.w1_shape, "blkdiag2": shape.w2_shape}, bias,
                             {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        # nn.Linear's default init has weight variance 1 / (3 * in_features); match it.
        init_monarch_(self.blkdiag1, self.blkdiag2, self.in_features, 1.0 / math.sqrt(3 * self.in_features))
        self.reset_bias()

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        return monarch_multiply(x, self.blkdiag1, self.blkdiag2, self.output_permutation, self.options)

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
        return layer._filled(bias, blkdiag1=w1, blkdiag2=w2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_permutation={self.output_permutation}"


class BlockdiagLinear(_StructuredLinear):
    """``y = x @ B^T + bias`` with ``B`` block-diagonal with ``nblocks`` blocks (semantics in
    :mod:`.blockdiag`): the paper authors' ``BlockdiagLinear``.

    Parameters ``blkdiag: (b, s, p)`` (fly calls it ``weight``; here ``weight`` would be read as a
    dense 2-D matrix by megatron's state-dict layout and our converters) and ``bias: (out_features,)``.
    Inputs are zero-padded to ``b*p`` and outputs cut to ``out_features``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = blockdiag_shape(in_features, out_features, nblocks)
        super().__init__(in_features, out_features, nblocks, shape.num_params)
        self.shape = shape
        self._add_parameters({"blkdiag": shape.w_shape}, bias, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        # nn.Linear's default init has weight variance 1 / (3 * in_features); match it.
        init_blockdiag_(self.blkdiag, 1.0 / math.sqrt(3 * self.in_features))
        self.reset_bias()

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        return blockdiag_multiply(x, self.blkdiag)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The exact ``(out_features, in_features)`` weight matrix."""
        return blockdiag_to_dense(self.blkdiag, self.in_features, self.out_features)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, nblocks: int = 4) -> "BlockdiagLinear":
        """The optimal block-diagonal projection of a dense ``weight: (out, in)`` (its diagonal
        blocks, :func:`.blockdiag.project_to_blockdiag`) and ``bias: (out,)``."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, nblocks, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        return layer._filled(bias, blkdiag=project_to_blockdiag(weight, nblocks))
