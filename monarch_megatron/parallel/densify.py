"""Exact in-memory conversion of a structured (Monarch or block-diagonal) megatron model to the
equivalent stock dense model.

Each structured parallel linear becomes the weight megatron's ``ColumnParallelLinear`` /
``RowParallelLinear`` would hold on the same TP rank, computed from this rank's factors alone (no
communication, DESIGN.md "Tensor parallelism without extra communication"):
:meth:`~monarch_megatron.parallel.StructuredParallelLinear.local_dense_weight`.

* column-parallel (fc1, qkv): the rank's factors compute exactly the rank's contiguous output slice
  (Monarch: with block-major output; block-diagonal: its blocks on their input blocks), so their
  ``(out/t, in)`` matrix is the shard ``ColumnParallelLinear`` rank r owns.
* row-parallel (fc2, proj): the rank's factors map its contiguous input range to a partial sum of
  the full output (Monarch: paper order; block-diagonal: its blocks' outputs, zeros elsewhere), so
  their ``(out, in/t)`` matrix is the column block of the global matrix, ``RowParallelLinear``'s
  shard r.

Biases are already laid out as megatron's (column: the rank's ``out/t`` slice; row: full). The
products are formed in float64 and cast to the parameter dtype once.
"""

from __future__ import annotations

import torch

from .layers import StructuredParallelLinear


@torch.no_grad()
def local_dense_weight(module: StructuredParallelLinear, *factors: torch.Tensor | None) -> torch.Tensor:
    """This rank's dense weight shard of a structured parallel linear.

    Args:
        module: the layer (its kind, TP size and widths are read from it).
        factors: factors to use instead of the module's (e.g. fp32 master copies), in the kind's
            order (``blkdiag1, blkdiag2`` or ``blkdiag``) and the parameters' shapes.

    Returns:
        ``(out/t, in)`` for column layers, ``(out, in/t)`` for row layers, float64.
    """
    if not isinstance(module, StructuredParallelLinear):
        raise TypeError(f"not a structured parallel linear: {type(module).__name__}")
    return module.local_dense_weight(*factors)


@torch.no_grad()
def dense_state_dict_from_monarch(
    model: torch.nn.Module,
    fp32_factors: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of the stock megatron-core local-spec dense model equivalent to ``model``.

    Args:
        model: a megatron ``BertModel`` / ``GPTModel`` with structured linears (unwrapped module).
        fp32_factors: optional ``{"<module name>.<factor name>": tensor, ...}`` of full-precision
            copies of this rank's factors (the fp32 master weights of a half-precision run);
            default: the module's own factors.
        dtype: dtype of the converted weights (default: the layer's parameter dtype).

    Returns:
        This rank's shard: every structured layer's factors replaced by ``weight`` in megatron's TP
        layout, all other entries unchanged.
    """
    state = model.state_dict()
    fp32_factors = fp32_factors or {}
    for name, module in model.named_modules():
        if not isinstance(module, StructuredParallelLinear):
            continue
        prefix = f"{name}." if name else ""
        keys = [prefix + n for n in module.kind.factor_names]
        weight = module.local_dense_weight(*(fp32_factors.get(k) for k in keys))
        for key in keys:
            del state[key]
        state[prefix + "weight"] = weight.to(dtype or module.factors()[0].dtype).contiguous()
    return state
