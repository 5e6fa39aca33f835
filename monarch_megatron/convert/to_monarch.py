"""Per-layer conversion of global (TP-merged) weights: Monarch -> dense exactly, dense -> Monarch by
the optimal projection, with the projection's relative approximation error.

The math is :mod:`monarch_megatron.monarch`'s (``monarch_to_dense``, ``project_to_monarch``); this
module decides each layer's output order and widths. Output order: column-parallel layers (fc1,
qkv) use block-major output (``output_permutation=False``), row-parallel ones (fc2, proj) the
paper's order (``True``), as the Monarch parallel linears do (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..monarch import monarch_factor_shapes, monarch_to_dense, project_to_monarch
from .checkpoint import ConversionError


def output_permutation(style: str) -> bool:
    """The output order a Monarch layer of TP ``style`` uses (False: block-major, True: paper order)."""
    return style == "row"


@dataclass
class Projection:
    """One layer projected onto Monarch matrices.

    Attributes:
        w1, w2: global factors ``(k, q, p)``, ``(l, s, r)`` in the requested dtype.
        err_sq: ``||W - M||_F^2`` of the written (cast) factors, float64.
        norm_sq: ``||W||_F^2``.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    err_sq: float
    norm_sq: float

    @property
    def rel_error(self) -> float:
        """``||W - M||_F / ||W||_F`` (0 for a zero matrix)."""
        return (self.err_sq / self.norm_sq) ** 0.5 if self.norm_sq > 0 else 0.0


def check_factor_shapes(name: str, w1: torch.Tensor, w2: torch.Tensor, in_features: int, out_features: int,
                        nblocks: int) -> None:
    """Raise ``ConversionError`` unless ``(w1, w2)`` are the global factors of an ``in -> out`` layer."""
    shp = monarch_factor_shapes(in_features, out_features, nblocks)
    if tuple(w1.shape) != shp.w1_shape or tuple(w2.shape) != shp.w2_shape:
        raise ConversionError(f"{name}: factors {tuple(w1.shape)}, {tuple(w2.shape)} do not match a "
                              f"{in_features}->{out_features} Monarch layer with nblocks={nblocks} "
                              f"(expected {shp.w1_shape}, {shp.w2_shape})")


def monarch_layer_to_dense(w1: torch.Tensor, w2: torch.Tensor, in_features: int, out_features: int,
                           style: str) -> torch.Tensor:
    """Exact ``(out_features, in_features)`` float64 matrix of a layer's global factors."""
    return monarch_to_dense(w1.to(torch.float64), w2.to(torch.float64), in_features, out_features,
                            output_permutation(style))


def project_layer(name: str, weight: torch.Tensor, nblocks: int, style: str, dtype: torch.dtype) -> Projection:
    """Optimal Monarch factors of the global ``weight (out, in)`` for a layer of TP ``style``.

    Raises:
        ConversionError: ``nblocks`` does not fit the layer's widths.
    """
    out_features, in_features = weight.shape
    w = weight.to(torch.float64)
    try:
        w1, w2 = project_to_monarch(w, nblocks, output_permutation(style))
    except ValueError as err:
        raise ConversionError(f"{name}: cannot project onto Monarch with nblocks={nblocks}: {err}") from None
    w1, w2 = w1.to(dtype), w2.to(dtype)
    approx = monarch_layer_to_dense(w1, w2, in_features, out_features, style)
    return Projection(w1, w2, float((w - approx).pow(2).sum()), float(w.pow(2).sum()))


def check_tp_shardable(name: str, style: str, in_features: int, out_features: int, nblocks: int, tp: int) -> None:
    """Raise ``ConversionError`` unless a Monarch layer can be built at TP size ``tp``.

    The layer's sharded width must be a multiple of nblocks (no padding to split; the rule of
    ``training.config``'s Monarch validation); the factor layout is checked by ``split_monarch``.
    """
    if tp > 1 and ((style == "column" and out_features % nblocks) or (style == "row" and in_features % nblocks)):
        width = out_features if style == "column" else in_features
        raise ConversionError(f"{name}: {style}-parallel Monarch layer with nblocks={nblocks} cannot be sharded "
                              f"over tensor_parallel={tp}: its width {width} is not a multiple of nblocks")
