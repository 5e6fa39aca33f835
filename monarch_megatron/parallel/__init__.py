"""Structured (Monarch, block-diagonal) tensor-parallel linears with megatron-core's linear contract,
the layer kinds, layer specs for BERT/GPT, TP (re)sharding of the factors, and the CPU stand-ins
megatron-core needs without CUDA."""

from .attention import SDPACoreAttention
from .cpu_compat import apply_cpu_stand_ins
from .distributed import init_tensor_parallel, spawn
from .kinds import KINDS, LayerKind, layer_kind
from .layers import (
    PARALLEL_LINEARS,
    BlockdiagColumnParallelLinear,
    BlockdiagRowParallelLinear,
    MonarchColumnParallelLinear,
    MonarchRowParallelLinear,
    StructuredParallelLinear,
)
from .sharding import check_blockdiag_split, check_monarch_split, merge_blockdiag, merge_monarch, split_blockdiag, split_monarch
from .specs import MONARCH_LAYERS, MonarchConfig, core_attention_module, get_bert_layer_spec, get_gpt_layer_spec

__all__ = [
    "KINDS",
    "MONARCH_LAYERS",
    "PARALLEL_LINEARS",
    "BlockdiagColumnParallelLinear",
    "BlockdiagRowParallelLinear",
    "LayerKind",
    "MonarchColumnParallelLinear",
    "MonarchConfig",
    "MonarchRowParallelLinear",
    "SDPACoreAttention",
    "StructuredParallelLinear",
    "apply_cpu_stand_ins",
    "check_blockdiag_split",
    "check_monarch_split",
    "core_attention_module",
    "get_bert_layer_spec",
    "get_gpt_layer_spec",
    "init_tensor_parallel",
    "layer_kind",
    "merge_blockdiag",
    "merge_monarch",
    "spawn",
    "split_blockdiag",
    "split_monarch",
]
