"""The qkv linear's bias without a pass of its own (CUDA fast path; ``training.fused_linear_bias``).

megatron-core's ``ColumnParallelLinear`` adds the bias after the GEMM (``output + bias`` in
``linear_with_grad_accumulation_and_async_allreduce``). A bias broadcast over ``[s, b]`` is not
contiguous, so torch runs that add with its non-vectorised strided kernel: on an H200 the qkv bias
took 6.6 ms of a 171-ms BERT-large step (twice the time of its bytes; benchmarks/RESULTS.md,
issue 11). The attention's qkv linear is the one linear whose bias megatron never hands on to a
later fusion (fc1's goes to the fused bias + GELU where ``training.fused_bias_gelu`` applies, the
row-parallel ones' to the fused bias + dropout + add).

* Dense: :class:`FusedBiasColumnParallelLinear`, a ``ColumnParallelLinear`` whose matrix multiply is
  ``F.linear(x, weight, bias)``, which torch runs as one cuBLASLt GEMM with the bias in its epilogue.
  Taken where megatron's custom autograd function adds nothing (no tensor-parallel gradient
  all-reduce, sequence parallelism, gradient-accumulation fusion or deferred wgrad); elsewhere it is
  megatron's path unchanged.
* Structured (Monarch, block-diagonal): the add as a torch.compile'd kernel (:func:`add_bias`),
  vectorised; its backward (the bias gradient) is generated with it.

Same function and parameters either way; only where the add runs changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear


def _add(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x + bias


# One compiled function for every layer; each distinct shape compiles once per process (in a
# CUDA-graphed step: during the eager warm-up, before capture). Lazy: importing costs nothing.
add_bias = torch.compile(_add, dynamic=False)


class FusedBiasColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` with the bias added inside the GEMM (module docstring).

    Same constructor, parameters, state dict and ``forward(x [s, b, h]) -> (out, bias or None)``.
    """

    # The keywords under which megatron's autograd function adds nothing to a plain F.linear.
    _PLAIN = dict(gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False,
                  grad_output_buffer=None)

    def _forward_impl(self, input, weight, *args, **kwargs):
        if (not args and weight.requires_grad
                and all(kwargs.get(k, v) == v for k, v in self._PLAIN.items())):
            return F.linear(input, weight, kwargs.get("bias"))
        return super()._forward_impl(input, weight, *args, **kwargs)
