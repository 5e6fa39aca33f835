"""A LayerNorm whose forward and backward are compiled kernels, for the layer specs' two norms.

Why not megatron-core's own choice: without apex or Transformer Engine, its local spec takes
``WrappedTorchNorm`` (``torch.nn.LayerNorm``), whose CUDA backward computes the gamma/beta gradients
in a separate reduction kernel that runs far below memory bandwidth at transformer shapes
(BERT-large, 8192 x 1024 bf16 on an H200: ~39 us, where reading ``x`` and ``dy`` takes ~8 us), and
LayerNorm was ~8% of a BERT-large step's GPU time (benchmarks/RESULTS.md, issue 11). torch.compile
(inductor) generates a forward and a backward (``dx`` in one pass, ``dgamma``/``dbeta`` as a split
reduction) that run near bandwidth: the same approach as megatron-core's ``jit_fuser`` for its
other small fusions (bias + GELU, bias + dropout + add), applied to the norm. Same function and
parameters as ``torch.nn.LayerNorm`` (state-dict keys ``weight`` and ``bias``), so checkpoints do not
depend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# One compiled function for every instance: the layers differ only in their parameters, which are
# inputs, so each distinct input shape compiles once per process (in a CUDA-graphed step: during
# the eager warm-up, before capture). The compile is lazy: importing this module costs nothing.
_compiled_layer_norm = torch.compile(_layer_norm, dynamic=False)


class CompiledLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm(hidden_size, eps)`` with a torch.compile'd forward/backward.

    Built by megatron-core's ``build_module`` with the keywords of ``WrappedTorchNorm``;
    ``x: [..., hidden_size]`` -> same shape and dtype.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "LayerNorm") -> None:
        # The features WrappedTorchNorm refuses are refused here too (it asserts; we say why).
        unsupported = [name for name in ("layernorm_zero_centered_gamma", "persist_layer_norm", "sequence_parallel",
                                         "memory_efficient_layer_norm") if getattr(config, name, False)]
        if config.normalization != "LayerNorm" or unsupported:
            raise ValueError(f"CompiledLayerNorm is a plain LayerNorm; config has normalization="
                             f"{config.normalization!r} and {unsupported or 'no'} unsupported features")
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_layer_norm(x, self.weight, self.bias, self.eps)
