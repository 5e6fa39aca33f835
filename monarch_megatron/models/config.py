"""Typed model configuration: the architecture of a BERT or GPT model, and its Monarch layers.

``MonarchConfig`` is defined in :mod:`monarch_megatron.parallel.specs` (the layer specs consume it
and ``parallel`` may not import ``models``) and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..parallel.specs import MONARCH_LAYERS, MonarchConfig

MODEL_KINDS = ("bert", "gpt")
# GELU of the MLPs (and of BERT's LM-head transform): "gelu" the exact (erf) function, "gelu_tanh"
# its tanh approximation, the one of the original BERT and GPT-2 code and the one megatron-core
# fuses with the fc1 bias (models/builder.py).
ACTIVATIONS = ("gelu", "gelu_tanh")

__all__ = ["ACTIVATIONS", "MODEL_KINDS", "MONARCH_LAYERS", "ModelConfig", "MonarchConfig", "ffn_width", "linear_widths",
           "padded_vocab_size"]


# The quantities derived from a model's sizes, each computed here only (the run config's model
# section, ModelConfig, the FLOP count, conversions and checks call these).
def ffn_width(hidden_size: int, ffn_hidden_size: int | None) -> int:
    """The MLP width: ``ffn_hidden_size``, by default 4 x ``hidden_size`` (BERT's and GPT-2's)."""
    return 4 * hidden_size if ffn_hidden_size is None else ffn_hidden_size


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``make_vocab_size_divisible_by`` (independent of
    the TP size, so that the model's function is too)."""
    m = make_vocab_size_divisible_by
    return -(-vocab_size // m) * m


def linear_widths(hidden_size: int, ffn: int) -> dict[str, tuple[int, int, str]]:
    """``{layer: (in_features, out_features, TP style)}`` of the four linears of a transformer
    layer (the names of :data:`MONARCH_LAYERS`), ``ffn`` the MLP width."""
    h = hidden_size
    return {"qkv": (h, 3 * h, "column"), "proj": (h, h, "row"), "fc1": (h, ffn, "column"), "fc2": (ffn, h, "row")}


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a megatron-core ``BertModel`` (``kind="bert"``) or ``GPTModel`` (``"gpt"``).

    ``vocab_size`` is the tokenizer's; the model pads it to a multiple of
    ``make_vocab_size_divisible_by`` (independent of the TP size, so that the function is too).
    ``sentence_order`` adds BERT's sentence-order (binary) head. ``activation`` is one of
    :data:`ACTIVATIONS`.
    """

    kind: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int | None = None
    vocab_size: int
    max_position_embeddings: int
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    sentence_order: bool = True
    make_vocab_size_divisible_by: int = 128
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got kind={self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got activation={self.activation!r}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        self.ffn_hidden_size = ffn_width(self.hidden_size, self.ffn_hidden_size)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to a multiple of ``make_vocab_size_divisible_by``."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by)
