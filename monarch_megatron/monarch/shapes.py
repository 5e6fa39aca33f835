"""Factor shapes of a Monarch matrix and argument validation.

The shapes are those of the paper authors' ``MonarchLinear`` (see ../shared/DESIGN.md,
"Monarch semantics"); every other module derives its shapes from :func:`monarch_factor_shapes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MonarchShape:
    """Shapes of the two block-diagonal factors of one Monarch matrix.

    ``w1`` has shape ``(k, q, p)`` and ``w2`` has shape ``(l, s, r)``, with ``k * p`` the padded
    input width and ``l * s`` the padded output width.
    """

    in_features: int
    out_features: int
    nblocks: int
    k: int
    q: int
    p: int
    l: int
    s: int
    r: int

    @property
    def w1_shape(self) -> tuple[int, int, int]:
        return (self.k, self.q, self.p)

    @property
    def w2_shape(self) -> tuple[int, int, int]:
        return (self.l, self.s, self.r)

    @property
    def padded_in(self) -> int:
        return self.k * self.p

    @property
    def padded_out(self) -> int:
        return self.l * self.s

    @property
    def num_params(self) -> int:
        return self.k * self.q * self.p + self.l * self.s * self.r


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int, else raise a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return value


def check_layer_args(in_features: int, out_features: int, nblocks: int) -> None:
    """Raise a ``ValueError`` naming the argument unless all three are positive integers and
    ``nblocks <= min(in_features, out_features)`` (every block has a real input and output)."""
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    check_positive_int("nblocks", nblocks)
    if nblocks > min(in_features, out_features):
        raise ValueError(
            f"nblocks={nblocks} is larger than the layer's features (in_features={in_features}, "
            f"out_features={out_features}); it must be at most {min(in_features, out_features)}"
        )


def monarch_factor_shapes(in_features: int, out_features: int, nblocks: int) -> MonarchShape:
    """Shapes of the factors of an ``in_features -> out_features`` Monarch matrix with ``nblocks`` blocks.

    ``in_blk = ceil(in/b)``, ``out_blk = ceil(out/b)``; if ``in_blk < out_blk`` then
    ``w1: (b, in_blk, in_blk)`` and ``w2: (b, out_blk, in_blk)``, else ``w1: (b, out_blk, in_blk)``
    and ``w2: (b, out_blk, out_blk)``.
    """
    check_layer_args(in_features, out_features, nblocks)
    b = nblocks
    in_blk = math.ceil(in_features / b)
    out_blk = math.ceil(out_features / b)
    if in_blk < out_blk:
        q, p, s, r = in_blk, in_blk, out_blk, in_blk
    else:
        q, p, s, r = out_blk, in_blk, out_blk, out_blk
    return MonarchShape(in_features, out_features, b, b, q, p, b, s, r)


def check_factors(w1: torch.Tensor, w2: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless ``w1: (k, q, p)`` and ``w2: (l, s, r)`` chain (``l * r == k * q``)."""
    if w1.dim() != 3:
        raise ValueError(f"w1 must be 3-D (k, q, p), got shape {tuple(w1.shape)}")
    if w2.dim() != 3:
        raise ValueError(f"w2 must be 3-D (l, s, r), got shape {tuple(w2.shape)}")
    k, q, _ = w1.shape
    l, _, r = w2.shape
    if l * r != k * q:
        raise ValueError(
            f"factor shapes do not chain: w1 {tuple(w1.shape)} gives k*q={k * q} intermediate "
            f"channels but w2 {tuple(w2.shape)} reads l*r={l * r}"
        )
