"""The structured layer kinds, one record each: ``"monarch"`` (two block-diagonal factors and a
permutation, :mod:`monarch_megatron.monarch`) and ``"blockdiag"`` (one block-diagonal factor, the
paper authors' ``BlockdiagLinear``, :mod:`monarch_megatron.monarch.blockdiag`).

A phase's ``monarch: {kind, layers, nblocks}`` names a kind, and everything that differs between
the kinds outside a layer's forward is read from its :class:`LayerKind` here (the one dispatch
point): the factors' state-dict names and shapes, parameter count, initialisation, exact dense
matrix, optimal projection from dense, and the tensor-parallel split / merge with its layout
check. Config validation, FLOPs, the TP layers, the in-job switch and offline conversion all use it.

Dense matrices and projections are in the layout of a layer of TP ``style``: a Monarch layer
uses block-major output in column-parallel layers and the paper's order in row-parallel ones
(:func:`monarch_output_permutation`, DESIGN.md); a block-diagonal layer has no permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..monarch import (
    blockdiag_shape,
    blockdiag_to_dense,
    init_blockdiag_,
    init_monarch_,
    monarch_factor_shapes,
    monarch_to_dense,
    project_to_blockdiag,
    project_to_monarch,
)
from .sharding import (
    check_blockdiag_split,
    check_monarch_split,
    merge_blockdiag,
    merge_monarch,
    split_blockdiag,
    split_monarch,
)

Shapes = tuple[tuple[int, ...], ...]
Factors = tuple[torch.Tensor, ...]


def monarch_output_permutation(style: str) -> bool:
    """The output order a Monarch layer of TP ``style`` uses (False: block-major, True: paper order)."""
    return style == "row"


@dataclass(frozen=True)
class LayerKind:
    """What one structured layer kind is, as functions of global (TP-merged) factors.

    Attributes:
        name: the config's ``kind``.
        title: how messages name a layer of this kind.
        factor_names: the factors' parameter / state-dict names, in order.
        shapes: ``(in_features, out_features, nblocks) -> factor shapes`` (``ValueError`` for an
            impossible ``nblocks``, naming it).
        init: ``(factors, in_features, std)``: fill in place so the output variance is a dense
            layer's with ``N(0, std^2)`` weights.
        dense: ``(factors, in_features, out_features, style) -> (out, in)`` exact dense matrix.
        project: ``(weight (out, in), nblocks, style) -> factors``: the optimal projection.
        check_split / split / merge: the TP layout of the factors (:mod:`.sharding`):
            ``check_split(shapes, tp, style, layer)`` raises ``ValueError``;
            ``split(factors, tp, style)`` -> per-rank factor tuples; ``merge(shards, style)``.
    """

    name: str
    title: str
    factor_names: tuple[str, ...]
    shapes: Callable[[int, int, int], Shapes]
    init: Callable[[Factors, int, float], None]
    dense: Callable[[Factors, int, int, str], torch.Tensor]
    project: Callable[[torch.Tensor, int, str], Factors]
    check_split: Callable[[Shapes, int, str, str], None]
    split: Callable[[Factors, int, str], list[Factors]]
    merge: Callable[[Sequence[Factors], str], Factors]

    def num_params(self, in_features: int, out_features: int, nblocks: int) -> int:
        """Elements of the factors (no bias)."""
        return sum(math.prod(shape) for shape in self.shapes(in_features, out_features, nblocks))

    def check_tp(self, in_features: int, out_features: int, nblocks: int, tp: int, style: str,
                 layer: str = "") -> Shapes:
        """The factor shapes, after checking that the layer can be built over ``tp`` ranks in
        ``style``: the sharded side (column: output, row: input) may not be zero-padded, since
        ranks own whole blocks, and the factors must split (:attr:`check_split`).

        Raises:
            ValueError: naming ``tp_size``, ``nblocks`` and ``layer``.
        """
        shapes = self.shapes(in_features, out_features, nblocks)
        if tp > 1:
            width, feature = (out_features, "out_features") if style == "column" else (in_features, "in_features")
            if width % nblocks:
                raise ValueError(f"cannot shard {self.title} layer {layer} with nblocks={nblocks} {style}-parallel "
                                 f"over tp_size={tp}: {feature} must be a multiple of nblocks")
        self.check_split(shapes, tp, style, layer)
        return shapes


def _monarch_shapes(n_in: int, n_out: int, nblocks: int) -> Shapes:
    shp = monarch_factor_shapes(n_in, n_out, nblocks)
    return shp.w1_shape, shp.w2_shape


MONARCH = LayerKind(
    name="monarch",
    title="Monarch",
    factor_names=("blkdiag1", "blkdiag2"),
    shapes=_monarch_shapes,
    init=lambda f, n_in, std: init_monarch_(f[0], f[1], n_in, std),
    dense=lambda f, n_in, n_out, style: monarch_to_dense(f[0], f[1], n_in, n_out, monarch_output_permutation(style)),
    project=lambda w, nblocks, style: project_to_monarch(w, nblocks, monarch_output_permutation(style)),
    check_split=lambda shapes, tp, style, layer: check_monarch_split(shapes[0], shapes[1], tp, style, layer),
    split=lambda f, tp, style: split_monarch(f[0], f[1], tp, style),
    merge=lambda shards, style: merge_monarch(list(shards), style),
)

BLOCKDIAG = LayerKind(
    name="blockdiag",
    title="block-diagonal",
    factor_names=("blkdiag",),
    shapes=lambda n_in, n_out, nblocks: (blockdiag_shape(n_in, n_out, nblocks).w_shape,),
    init=lambda f, n_in, std: init_blockdiag_(f[0], std),
    dense=lambda f, n_in, n_out, style: blockdiag_to_dense(f[0], n_in, n_out),
    project=lambda w, nblocks, style: (project_to_blockdiag(w, nblocks),),
    check_split=lambda shapes, tp, style, layer: check_blockdiag_split(shapes[0], tp, style, layer),
    split=lambda f, tp, style: [(w,) for w in split_blockdiag(f[0], tp, style)],
    merge=lambda shards, style: (merge_blockdiag([s[0] for s in shards], style),),
)

KINDS: dict[str, LayerKind] = {k.name: k for k in (MONARCH, BLOCKDIAG)}
# Every factor name of every kind -> its kind (factor names are unique across kinds).
FACTOR_KINDS: dict[str, LayerKind] = {name: k for k in KINDS.values() for name in k.factor_names}


def layer_kind(name: str) -> LayerKind:
    """The record of kind ``name`` (``ValueError`` listing the kinds for another name)."""
    if name not in KINDS:
        raise ValueError(f"unknown layer kind {name!r}; one of {', '.join(KINDS)}")
    return KINDS[name]
