"""Data: sentencepiece tokenizer, corpus -> megatron indexed datasets, BERT/GPT datasets, demo data.

Importing this package is cheap; ``datasets`` imports megatron-core (several seconds), so import
``build_pretraining_datasets`` from ``monarch_megatron.data.datasets`` where it is needed.
"""

from monarch_megatron.data.tokenizer import (  # noqa: F401
    SPECIAL_TOKENS,
    SentencePieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)
