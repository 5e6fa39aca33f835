"""Initialisation of Monarch factors that keeps activations at the scale of a dense layer.

Derivation. A dense layer ``y = W x`` with i.i.d. ``W ~ N(0, std^2)`` and inputs of variance ``v``
gives ``Var(y) = in_features * std^2 * v``. In a Monarch layer each intermediate channel
``u = w1[i][c] . x_i`` sums over the ``in_features / k`` real inputs of its block on average (zero
padding adds nothing), so ``w1 ~ N(0, k / in_features)`` keeps ``Var(u) = v``. Each output sums ``r``
intermediate channels, so ``w2 ~ N(0, std^2 * in_features / r)`` gives
``Var(y) = r * std^2 * in_features / r * v = in_features * std^2 * v``: the dense layer's variance.
"""

from __future__ import annotations

import math

import torch

from .shapes import check_factors


@torch.no_grad()
def init_monarch_(
    w1: torch.Tensor,
    w2: torch.Tensor,
    in_features: int,
    std: float,
    generator: torch.Generator | None = None,
) -> None:
    """Fill ``w1: (k, q, p)`` and ``w2: (l, s, r)`` in place so the layer's output variance equals
    that of a dense ``in_features``-input layer with weights ``N(0, std^2)``."""
    check_factors(w1, w2)
    if not std > 0:
        raise ValueError(f"std must be positive, got std={std!r}")
    k = w1.shape[0]
    r = w2.shape[2]
    w1.normal_(0.0, math.sqrt(k / in_features), generator=generator)
    w2.normal_(0.0, std * math.sqrt(in_features / r), generator=generator)
