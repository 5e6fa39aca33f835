"""Monarch tensor-parallel linears with megatron-core's linear contract, layer specs for BERT/GPT,
TP (re)sharding of Monarch factors, and the CPU stand-ins megatron-core needs without CUDA."""

from .attention import SDPACoreAttention
from .cpu_compat import apply_cpu_stand_ins
from .distributed import init_tensor_parallel, spawn
from .layers import MonarchColumnParallelLinear, MonarchRowParallelLinear
from .sharding import check_monarch_split, merge_monarch, split_monarch
from .specs import MONARCH_LAYERS, MonarchConfig, core_attention_module, get_bert_layer_spec, get_gpt_layer_spec

__all__ = [
    "MONARCH_LAYERS",
    "MonarchColumnParallelLinear",
    "MonarchConfig",
    "MonarchRowParallelLinear",
    "SDPACoreAttention",
    "apply_cpu_stand_ins",
    "check_monarch_split",
    "core_attention_module",
    "get_bert_layer_spec",
    "get_gpt_layer_spec",
    "init_tensor_parallel",
    "merge_monarch",
    "spawn",
    "split_monarch",
]
