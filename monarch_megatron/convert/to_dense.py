"""Exact in-memory conversion of a Monarch megatron model to the equivalent stock dense model.

Each Monarch parallel linear becomes the weight megatron's ``ColumnParallelLinear`` /
``RowParallelLinear`` would hold on the same TP rank, computed from this rank's factors alone (no
communication, DESIGN.md "Tensor parallelism without extra communication"):

* column-parallel (fc1, qkv): the rank's factors ``w1_r: (k, q/t, p)``, ``w2_r: (l/t, s, r)`` with
  block-major output compute exactly the rank's contiguous output slice, so
  ``monarch_to_dense(w1_r, w2_r, in, out/t, output_permutation=False)`` is the
  ``(out/t, in)`` shard ``ColumnParallelLinear`` rank r owns.
* row-parallel (fc2, proj): the rank's factors map its contiguous input range to a partial sum of
  the full (paper-order) output, so ``monarch_to_dense(w1_r, w2_r, in/t, out, True)`` is the
  ``(out, in/t)`` column block of the global matrix, which is ``RowParallelLinear``'s shard r.

Biases are already laid out as megatron's (column: the rank's ``out/t`` slice; row: full). The
products are formed in float64 and cast to the parameter dtype once.
"""

from __future__ import annotations

import torch

from ..monarch import monarch_to_dense
from ..parallel import MonarchColumnParallelLinear, MonarchRowParallelLinear


@torch.no_grad()
def local_dense_weight(
    module: MonarchColumnParallelLinear | MonarchRowParallelLinear,
    w1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's dense weight shard of a Monarch parallel linear.

    Args:
        module: the layer (its TP size and widths are read from it).
        w1, w2: factors to use instead of the module's (e.g. fp32 master copies); same shapes as
            ``module.blkdiag1`` ``(k_r, q_r, p)`` and ``module.blkdiag2`` ``(l_r, s, r_r)``.

    Returns:
        ``(out/t, in)`` for column layers, ``(out, in/t)`` for row layers, float64.
    """
    w1 = (module.blkdiag1 if w1 is None else w1).detach().to(torch.float64)
    w2 = (module.blkdiag2 if w2 is None else w2).detach().to(torch.float64)
    t = module.tp_size
    if isinstance(module, MonarchColumnParallelLinear):
        return monarch_to_dense(w1, w2, module.input_size, module.output_size // t, output_permutation=False)
    if isinstance(module, MonarchRowParallelLinear):
        return monarch_to_dense(w1, w2, module.input_size // t, module.output_size, output_permutation=True)
    raise TypeError(f"not a Monarch parallel linear: {type(module).__name__}")


@torch.no_grad()
def dense_state_dict_from_monarch(
    model: torch.nn.Module,
    fp32_factors: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of the stock megatron-core local-spec dense model equivalent to ``model``.

    Args:
        model: a megatron ``BertModel`` / ``GPTModel`` with Monarch linears (unwrapped module).
        fp32_factors: optional ``{"<module name>.blkdiag1": tensor, ...}`` of full-precision copies
            of this rank's factors (the fp32 master weights of a half-precision run); default:
            the module's own factors.
        dtype: dtype of the converted weights (default: the layer's parameter dtype).

    Returns:
        This rank's shard: every Monarch layer's ``blkdiag1`` / ``blkdiag2`` replaced by
        ``weight`` in megatron's TP layout (parameter dtype), all other entries unchanged.
    """
    state = model.state_dict()
    fp32_factors = fp32_factors or {}
    for name, module in model.named_modules():
        if not isinstance(module, (MonarchColumnParallelLinear, MonarchRowParallelLinear)):
            continue
        prefix = f"{name}." if name else ""
        weight = local_dense_weight(module, fp32_factors.get(prefix + "blkdiag1"), fp32_factors.get(prefix + "blkdiag2"))
        del state[prefix + "blkdiag1"], state[prefix + "blkdiag2"]
        state[prefix + "weight"] = weight.to(dtype or module.blkdiag1.dtype).contiguous()
    return state
