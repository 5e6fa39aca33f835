"""Per-layer conversion of global (TP-merged) weights: structured (Monarch or block-diagonal) ->
dense exactly, dense -> structured by the kind's optimal projection, with the projection's relative
approximation error.

The math is the kind's record's (:mod:`monarch_megatron.parallel.kinds`: exact dense matrix,
optimal projection, in the layout of a layer of the given TP style); this module checks shapes and
measures the error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel.kinds import LayerKind
from .checkpoint import ConversionError


@dataclass
class Projection:
    """One layer projected onto a structured kind.

    Attributes:
        factors: global factors in the kind's order, in the requested dtype.
        err_sq: ``||W - M||_F^2`` of the written (cast) factors, float64.
        norm_sq: ``||W||_F^2``.
    """

    factors: tuple[torch.Tensor, ...]
    err_sq: float
    norm_sq: float

    @property
    def rel_error(self) -> float:
        """``||W - M||_F / ||W||_F`` (0 for a zero matrix)."""
        return (self.err_sq / self.norm_sq) ** 0.5 if self.norm_sq > 0 else 0.0


def check_factor_shapes(name: str, kind: LayerKind, factors: tuple[torch.Tensor, ...], in_features: int,
                        out_features: int, nblocks: int) -> None:
    """Raise ``ConversionError`` unless ``factors`` are the global factors of an ``in -> out`` layer
    of ``kind`` with ``nblocks`` blocks."""
    expected = kind.shapes(in_features, out_features, nblocks)
    got = tuple(tuple(f.shape) for f in factors)
    if got != tuple(expected):
        raise ConversionError(f"{name}: factors {', '.join(map(str, got))} do not match a {in_features}->{out_features} "
                              f"{kind.title} layer with nblocks={nblocks} (expected {', '.join(map(str, expected))})")


def layer_to_dense(kind: LayerKind, factors: tuple[torch.Tensor, ...], in_features: int, out_features: int,
                   style: str) -> torch.Tensor:
    """Exact ``(out_features, in_features)`` float64 matrix of a layer's global factors."""
    return kind.dense(tuple(f.to(torch.float64) for f in factors), in_features, out_features, style)


def project_layer(name: str, kind: LayerKind, weight: torch.Tensor, nblocks: int, style: str,
                  dtype: torch.dtype) -> Projection:
    """Optimal ``kind`` factors of the global ``weight (out, in)`` for a layer of TP ``style``.

    Raises:
        ConversionError: ``nblocks`` does not fit the layer's widths.
    """
    out_features, in_features = weight.shape
    w = weight.to(torch.float64)
    try:
        factors = tuple(f.to(dtype) for f in kind.project(w, nblocks, style))
    except ValueError as err:
        raise ConversionError(f"{name}: cannot project onto {kind.title} with nblocks={nblocks}: {err}") from None
    approx = layer_to_dense(kind, factors, in_features, out_features, style)
    return Projection(factors, float((w - approx).pow(2).sum()), float(w.pow(2).sum()))


def check_tp_shardable(name: str, kind: LayerKind, style: str, in_features: int, out_features: int, nblocks: int,
                       tp: int) -> None:
    """Raise ``ConversionError`` unless a ``kind`` layer can be built at TP size ``tp`` (the rule
    of the TP layers and of ``training.config``'s validation: :meth:`LayerKind.check_tp`)."""
    try:
        kind.check_tp(in_features, out_features, nblocks, tp, style, name)
    except ValueError as err:
        raise ConversionError(f"{name}: {err} (tensor_parallel={tp})") from None
