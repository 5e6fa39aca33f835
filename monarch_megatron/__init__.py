"""monarch-megatron: Monarch-matrix BERT/GPT pretraining on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
