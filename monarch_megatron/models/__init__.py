"""Model providers on megatron-core: BERT / GPT with optional Monarch linears."""

from .builder import (
    SDPABertModel,
    build_model,
    forward_step,
    loss_names,
    masked_positions,
    parameter_report,
    transformer_config,
)
from .config import MODEL_KINDS, ModelConfig, MonarchConfig

__all__ = [
    "MODEL_KINDS",
    "ModelConfig",
    "MonarchConfig",
    "SDPABertModel",
    "build_model",
    "forward_step",
    "loss_names",
    "masked_positions",
    "parameter_report",
    "transformer_config",
]
