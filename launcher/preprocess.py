#!/usr/bin/env python
"""Corpus -> sentencepiece model -> megatron-core .bin/.idx datasets.

    python launcher/preprocess.py --input corpus.jsonl --output-prefix data/wiki \
        --train-tokenizer 32768
    python launcher/preprocess.py --input corpus.txt --output-prefix data/x \
        --tokenizer-model data/wiki.model

Writes <prefix>_text_sentence.{bin,idx} (BERT), <prefix>_text_document.{bin,idx} (GPT) and, when
training, <prefix>.model. See monarch_megatron/data/preprocess.py.
"""
import os
import sys

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monarch_megatron.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
