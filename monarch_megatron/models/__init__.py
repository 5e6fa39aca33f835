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
from .family import FAMILIES, ModelFamily, model_family

__all__ = [
    "FAMILIES",
    "MODEL_KINDS",
    "ModelFamily",
    "ModelConfig",
    "MonarchConfig",
    "SDPABertModel",
    "build_model",
    "forward_step",
    "loss_names",
    "masked_positions",
    "model_family",
    "parameter_report",
    "transformer_config",
]
