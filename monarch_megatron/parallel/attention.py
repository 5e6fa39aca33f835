"""Core attention on PyTorch's fused ``scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the ``[b, np, sq, sk]`` score matrix
(baddbmm, softmax, dropout, bmm). Where Transformer Engine is absent this module takes its place in
the layer specs, with the same constructor and forward contract, so that attention runs in
PyTorch's flash / memory-efficient kernels on GPU (DESIGN.md; issue 3).

Mask convention (megatron's): ``attention_mask`` is boolean with ``True`` = *masked out*, of shape
``[b, 1, sq, sk]`` or ``[b, 1, 1, sk]``. It enters SDPA as an additive mask of ``-10000`` on masked
positions, the value megatron's ``attention_mask_func`` writes, so every query row that can see at
least one key gives megatron's result. (A row that sees *no* key, a padding query under a ``b1ss``
mask, gets megatron's uniform average there and a softmax over all keys here; such rows never reach
a real token or the loss.) With no mask and ``AttnMaskType.causal`` the causal kernel is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

# The fill value of megatron's attention_mask_func (transformer/utils.py).
MASKED_SCORE = -10000.0


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron's ``DotProductAttention`` on ``F.scaled_dot_product_attention``.

    forward: ``query: [sq, b, np, hn]``, ``key``/``value``: ``[sk, b, ng, hn]``,
    ``attention_mask``: bool ``[b, 1, sq|1, sk]`` (``True`` = masked) or ``None`` ->
    context ``[sq, b, np * hn]``. Attention dropout (``config.attention_dropout``) is applied in
    training, under megatron's tensor-parallel RNG stream as ``DotProductAttention`` does.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPACoreAttention does not support context parallelism")
        if config.window_size is not None:
            raise NotImplementedError("SDPACoreAttention does not support sliding-window attention")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"SDPACoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        # megatron's apply_query_key_layer_scaling divides the scale by layer_number and multiplies
        # the scores back inside its softmax: the function is the unscaled one, which SDPA computes
        # with fp32 accumulation anyway.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Attention context ``[sq, b, np * hn]`` (shapes in the class docstring)."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by SDPACoreAttention")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        sq, sk = query.size(0), key.size(0)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal = False
        mask = None
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                mask = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
                mask.masked_fill_(attention_mask, MASKED_SCORE)
            else:
                mask = attention_mask.to(q.dtype)
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal mask needs self-attention (sq == sk), got sq={sq}, sk={sk}")
            is_causal = True
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Heads are split over TP ranks: draw their dropout from the per-rank stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
                )
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
            )
        # [b, n, sq, hn] -> [sq, b, n * hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(sq, context.size(1), self.hidden_size_per_partition)
