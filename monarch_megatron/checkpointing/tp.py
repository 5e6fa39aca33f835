"""Tensor-parallel merge and split of whole model state dicts (megatron-core local spec + Monarch).

Which entries are sharded, and how, is megatron-core's layout for the layers our models use:

* column-parallel ``linear_qkv`` / ``linear_fc1``: ``weight (out/t, in)`` and ``bias (out/t)``
  concatenated along dim 0 (qkv included: each rank holds whole query groups, so concatenating
  ranks gives the TP-independent global order);
* row-parallel ``linear_proj`` / ``linear_fc2``: ``weight (out, in/t)`` concatenated along dim 1;
  the bias is replicated;
* ``embedding.word_embeddings.weight`` and ``output_layer.{weight,bias}``: vocabulary-parallel,
  dim 0;
* structured factors (Monarch ``blkdiag1`` / ``blkdiag2``, block-diagonal ``blkdiag``): their
  kind's merge / split (:mod:`monarch_megatron.parallel.kinds`) with the layer's style (exact);
  their biases follow the dense layer's layout;
* everything else (layer norms, position / token-type embeddings, pooler, heads, ``_extra_state``)
  is replicated: rank 0's copy is taken.

The global form is a state dict with the same keys, holding full tensors; structured layers keep
their factor keys with the global factors. Every merge / split is a concatenation or a fixed
permutation of entries, so it applies unchanged to anything shaped like the parameters: fp32
master weights and optimizer moments (:mod:`.reshard`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch

from ..parallel.kinds import FACTOR_KINDS
from .errors import CheckpointFormatError

# megatron module name -> (our layer name, TP style)
LINEARS = {"linear_qkv": ("qkv", "column"), "linear_fc1": ("fc1", "column"),
           "linear_proj": ("proj", "row"), "linear_fc2": ("fc2", "row")}
_LINEAR_KEY = re.compile(
    r"^(?P<prefix>.*\.layers\.\d+\.(?:self_attention|mlp)\.(?P<module>linear_qkv|linear_proj|linear_fc1|linear_fc2))"
    r"\.(?P<param>weight|bias|_extra_state|" + "|".join(FACTOR_KINDS) + r")$")
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def parse_linear_key(key: str) -> tuple[str, str, str, str] | None:
    """``(module prefix, layer name, style, param)`` of a transformer-layer linear's entry, else None."""
    m = _LINEAR_KEY.match(key)
    if m is None:
        return None
    name, style = LINEARS[m["module"]]
    return m["prefix"], name, style, m["param"]


def shard_dim(key: str) -> int | None:
    """The dimension along which a dense / bias entry is TP-sharded, or None (replicated / structured factor)."""
    if key in _VOCAB_PARALLEL:
        return 0
    parsed = parse_linear_key(key)
    if parsed is None:
        return None
    _, _, style, param = parsed
    if param == "weight":
        return 0 if style == "column" else 1
    if param == "bias" and style == "column":
        return 0
    return None


def linear_prefixes(state: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """``{module prefix: (layer name, style)}`` of every transformer-layer linear in ``state``."""
    out = {}
    for key in state:
        parsed = parse_linear_key(key)
        if parsed is not None:
            out[parsed[0]] = (parsed[1], parsed[2])
    return out


class _FactorGroup(NamedTuple):
    """The factors of one structured linear, named by the entry of its kind's first factor."""

    prefix: str  # the module's key prefix
    name: str  # our layer name (fc1, ...)
    style: str  # "column" | "row"
    kind: Any  # its LayerKind
    keys: list[str]  # the factors' keys, in the kind's order


def _factor_group(key: str) -> _FactorGroup | bool:
    """The factor group that ``key`` opens (its kind's first factor); True for a kind's later factor
    (handled with the first); False for any other entry."""
    parsed = parse_linear_key(key)
    if parsed is None or parsed[3] not in FACTOR_KINDS:
        return False
    kind = FACTOR_KINDS[parsed[3]]
    if parsed[3] != kind.factor_names[0]:
        return True
    prefix, name, style, _ = parsed
    return _FactorGroup(prefix, name, style, kind, [f"{prefix}.{n}" for n in kind.factor_names])


def merge_tp(modules: list[dict[str, Any]]) -> dict[str, Any]:
    """The global state dict of TP shards ``modules`` (rank order). Exact: only concatenations."""
    if len(modules) == 1:
        return dict(modules[0])
    merged: dict[str, Any] = {}
    for key, first in modules[0].items():
        group = _factor_group(key)
        if group is True:
            continue  # merged with the kind's first factor
        if group:
            try:
                factors = group.kind.merge([tuple(sd[n] for n in group.keys) for sd in modules], group.style)
            except (KeyError, ValueError) as err:
                raise CheckpointFormatError(f"cannot merge the TP shards of {group.prefix}: {err}") from None
            merged.update(zip(group.keys, factors))
            continue
        dim = shard_dim(key)
        if dim is None or not torch.is_tensor(first):
            merged[key] = first
        else:
            shapes = {tuple(sd[key].shape) for sd in modules}
            if len(shapes) != 1:
                raise CheckpointFormatError(f"TP shards of {key} differ in shape: {sorted(shapes)}")
            merged[key] = torch.cat([sd[key] for sd in modules], dim=dim)
    # Keep the source key order (a kind's factors together).
    return {k: merged[k] for k in modules[0] if k in merged}


def split_tp(state: dict[str, Any], tp: int) -> list[dict[str, Any]]:
    """Per-rank state dicts of the global ``state`` for TP size ``tp`` (new contiguous tensors).

    Raises:
        CheckpointFormatError: a sharded dimension or a Monarch layout does not divide by ``tp``.
    """
    if tp == 1:
        return [dict(state)]
    shards: list[dict[str, Any]] = [{} for _ in range(tp)]
    for key, value in state.items():
        group = _factor_group(key)
        if group is True:
            continue  # split with the kind's first factor
        if group:
            try:
                per_rank = group.kind.split(tuple(state[n] for n in group.keys), tp, group.style)
            except (KeyError, ValueError) as err:
                raise CheckpointFormatError(f"cannot shard {group.prefix} ({group.name}) over tensor_parallel={tp}: "
                                            f"{err}") from None
            for sd, factors in zip(shards, per_rank):
                sd.update(zip(group.keys, factors))
            continue
        dim = shard_dim(key)
        if dim is None or not torch.is_tensor(value):
            for sd in shards:
                sd[key] = value  # replicated (the same tensor object: saved once per file)
            continue
        if value.shape[dim] % tp:
            raise CheckpointFormatError(f"{key} has {value.shape[dim]} entries along its TP dimension {dim}, "
                                        f"not divisible by tensor_parallel={tp}")
        for sd, part in zip(shards, torch.chunk(value, tp, dim=dim)):
            sd[key] = part.clone(memory_format=torch.contiguous_format)  # a view would save the whole tensor
    return [{k: sd[k] for k in state if k in sd} for sd in shards]


def check_replicated_agree(modules: list[dict[str, Any]]) -> list[str]:
    """Names of replicated tensors whose TP copies differ (they should be bitwise equal)."""
    bad = []
    for key, first in modules[0].items():
        parsed = parse_linear_key(key)
        if not torch.is_tensor(first) or shard_dim(key) is not None or (parsed and parsed[3] in FACTOR_KINDS):
            continue
        if any(sd[key].shape != first.shape or not torch.equal(sd[key], first) for sd in modules[1:]):
            bad.append(key)
    return bad
