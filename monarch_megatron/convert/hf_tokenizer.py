"""The tokenizer of an exported model, in a form ``transformers.AutoTokenizer`` loads.

Our models are trained with a sentencepiece model holding BERT's special tokens
(:mod:`monarch_megatron.data.tokenizer`). The export writes

* ``tokenizer.json``: the same segmentation as a ``tokenizers`` pipeline (sentencepiece's own
  normalizer table, whitespace handling and pieces with their scores; built by
  ``transformers``' ``SpmConverter``), the special tokens as added special tokens, and for BERT
  the post-processor ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` (token types 0 / 1), the
  layout megatron's BERT dataset feeds;
* ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` with the special tokens named;
* ``sentencepiece.model``: the original model, for :mod:`monarch_megatron.data` (e.g.
  ``launcher/preprocess.py --tokenizer-model``).

``tokenizer(text, add_special_tokens=False).input_ids`` equals ``SentencePieceTokenizer.encode``
for text (byte fallback included), with one deliberate difference: the literal strings of the
special tokens (``"[MASK]"``, ...) become those tokens, as Hugging Face users expect (fill-mask
prompts), where sentencepiece spells them out. A literal ``<0xNN>`` whose characters are not
otherwise in the vocabulary may become that byte piece (``tokenizers``' unigram lattice prices
unknown characters below any piece).

A tokenizer given as a Hugging Face directory (e.g. the source of ``launcher/import_hf.py``) is
copied as it is.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from ..data.tokenizer import CLS, EOD, MASK, PAD, SEP, SPECIAL_TOKENS, UNK, SentencePieceTokenizer
from .checkpoint import ConversionError

SP_FILE = "sentencepiece.model"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", SP_FILE)
# sentencepiece never matches its unknown / control / byte pieces against text; ``tokenizers``'
# unigram model matches every entry, so those get a score below any segmentation of real pieces.
_UNMATCHABLE = -1e9
_SP_NORMAL = 1  # sentencepiece's ModelProto.SentencePiece.Type.NORMAL
_SP_UNIGRAM, _SP_BPE = 1, 2  # sentencepiece's TrainerSpec.ModelType


@dataclass
class TokenizerSource:
    """A tokenizer to export: a sentencepiece ``.model`` file or a Hugging Face tokenizer directory.

    Attributes:
        path: the file or directory.
        vocab_size: number of ids it produces.
        special_ids: ``bos`` / ``eos`` / ``pad`` ids for the model config, where known.
    """

    path: str
    vocab_size: int
    special_ids: dict[str, int] = field(default_factory=dict)

    @property
    def is_sentencepiece(self) -> bool:
        return os.path.isfile(self.path)


def inspect_tokenizer(path: str) -> TokenizerSource:
    """Check ``path`` cheaply (before any heavy work) and describe it.

    Raises:
        ConversionError: missing, not a sentencepiece model with BERT's special tokens, or a
            directory without Hugging Face tokenizer files.
    """
    if os.path.isfile(path):
        try:
            sp = SentencePieceTokenizer(path)
        except (ValueError, RuntimeError, OSError) as err:
            raise ConversionError(f"tokenizer {path} is not a usable sentencepiece model: {err}") from None
        return TokenizerSource(path, sp.vocab_size, {"bos": sp.eod, "eos": sp.eod, "pad": sp.pad})
    if not os.path.isdir(path):
        raise ConversionError(f"tokenizer {path} does not exist (a sentencepiece .model file or a Hugging Face "
                              "tokenizer directory)")
    present = [n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
    if not present or present == ["tokenizer_config.json"]:
        raise ConversionError(f"{path} holds no Hugging Face tokenizer files "
                              f"({', '.join(HF_TOKENIZER_FILES[:3])}, ...)")
    vocab = 0
    if "tokenizer.json" in present:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    ids: dict[str, int] = {}
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):  # the model the tokenizer came with names its special ids
        with open(config) as f:
            raw = json.load(f)
        ids = {k: raw[f"{k}_token_id"] for k in ("bos", "eos", "pad") if isinstance(raw.get(f"{k}_token_id"), int)}
    return TokenizerSource(path, vocab, ids)


def _fast_tokenizer(model_file: str, kind: str):
    """A ``tokenizers.Tokenizer`` segmenting like the sentencepiece model ``model_file``."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    pieces = proto.pieces
    model_type = proto.trainer_spec.model_type
    if model_type == _SP_UNIGRAM:
        vocab = [(p.piece, p.score if p.type == _SP_NORMAL else _UNMATCHABLE) for p in pieces]
    elif model_type == _SP_BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
    else:
        raise ConversionError(f"{model_file}: sentencepiece model type {model_type} (word / char) has no "
                              "tokenizers equivalent here; train it as unigram or bpe")
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if kind == "bert":
        ids = {t: tok.token_to_id(t) for t in (CLS, SEP)}
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=list(ids.items()))
    return tok


def write_tokenizer(source: TokenizerSource, out_dir: str, kind: str, max_length: int) -> list[str]:
    """Write ``source`` into the export directory ``out_dir``; returns the file names written."""
    if not source.is_sentencepiece:
        names = [n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(source.path, n))]
        for name in names:
            shutil.copyfile(os.path.join(source.path, name), os.path.join(out_dir, name))
        return names
    _fast_tokenizer(source.path, kind).save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "pad_token": PAD, "unk_token": UNK}
    if kind == "bert":
        config.update(cls_token=CLS, sep_token=SEP, mask_token=MASK,
                      model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    else:  # GPT-2 would add token-type embeddings (through wte) if it were given token_type_ids
        config.update(bos_token=EOD, eos_token=EOD, model_input_names=["input_ids", "attention_mask"])
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(source.path, os.path.join(out_dir, SP_FILE))
    return ["tokenizer.json", "tokenizer_config.json", SP_FILE]
