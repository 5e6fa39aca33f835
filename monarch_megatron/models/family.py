"""A model family (BERT, GPT) as one record: what differs between them outside megatron-core's
model classes, so that callers ask the record instead of branching on ``kind``.

The parameter and FLOP counts (``training/flops.py``), the plan (the LM head on masked positions
only), the config check (the sentence-order head) and the reported loss names read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """One model family. Sizes below are per model of hidden size ``h`` and padded vocabulary ``v``.

    Attributes:
        name: the config's ``model.kind``.
        token_types: two token-type embeddings (``2 x h`` parameters).
        lm_head_transform: BERT's LM head: dense ``h x h`` (+ bias), GELU, LayerNorm before the
            (tied) output layer, and an output bias of ``v``.
        masked_lm: the loss is on masked positions only, so the LM head may run on those alone
            (``training.mlm_head_masked_only``).
        sentence_order: the family has the optional sentence-order head (pooler ``h x h`` + bias,
            binary head ``h x 2`` + bias) that ``model.sentence_order`` turns on.
    """

    name: str
    token_types: bool
    lm_head_transform: bool
    masked_lm: bool
    sentence_order: bool

    def loss_names(self, sentence_order: bool) -> tuple[str, ...]:
        """Names of the values a forward step reports, in order: ``loss`` first, then Megatron's
        ``lm loss`` and (with the sentence-order head) ``sop loss``."""
        return ("loss", "lm loss", "sop loss") if self.sentence_order and sentence_order else ("loss", "lm loss")


FAMILIES = {
    "bert": ModelFamily("bert", token_types=True, lm_head_transform=True, masked_lm=True, sentence_order=True),
    "gpt": ModelFamily("gpt", token_types=False, lm_head_transform=False, masked_lm=False, sentence_order=False),
}


def model_family(kind: str) -> ModelFamily:
    """The record of ``kind`` ("bert" | "gpt")."""
    if kind not in FAMILIES:
        raise ValueError(f"kind must be one of {sorted(FAMILIES)}, got kind={kind!r}")
    return FAMILIES[kind]


__all__ = ["FAMILIES", "ModelFamily", "model_family"]
