"""SentencePiece tokenizer with BERT's special tokens, usable by megatron-core's datasets.

Special tokens have fixed ids in every model this module trains:

    [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4  [EOD]=5

[PAD] is 0 because megatron-core's BERT dataset writes the pad id into ``padding_mask`` and
``types`` and maps pad tokens to id 0; with pad = 0 ``padding_mask`` is exactly "1 = real token".
[CLS] [SEP] [MASK] [EOD] are *control* symbols: sentencepiece never produces them from text, so a
corpus containing the literal string "[MASK]" cannot inject a mask token.

Megatron-core's datasets take the tokenizer duck-typed (``config.tokenizer``): they read ``cls``,
``sep``, ``pad``, ``mask``, ``eod``, ``vocab_size``, ``inv_vocab`` and ``unique_identifiers`` (the
latter keys their on-disk index caches). This class provides those directly instead of
subclassing megatron's ``MegatronLegacyTokenizer``, which logs a deprecation warning on every
construction and adds nothing we use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

PAD, UNK, CLS, SEP, MASK, EOD = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOD]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK, EOD)
WORD_START = "\u2581"  # sentencepiece's word-start marker "▁"


class VocabSizeError(ValueError):
    """The requested vocab size is more than the training corpus supports."""


class SentencePieceTokenizer:
    """A trained sentencepiece model plus the special-token ids megatron-core needs.

    Args:
        model_file: path to a sentencepiece ``.model`` file containing the pieces of
            ``SPECIAL_TOKENS`` (any ids; the ones trained here are 0..5).
    """

    def __init__(self, model_file: str) -> None:
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"tokenizer model not found: {model_file}")
        self.model_file = os.path.abspath(model_file)
        with open(model_file, "rb") as f:
            proto = f.read()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        n = self._sp.get_piece_size()
        self._pieces = [self._sp.id_to_piece(i) for i in range(n)]
        ids = {piece: self._sp.piece_to_id(piece) for piece in SPECIAL_TOKENS}
        missing = [p for p, i in ids.items() if self._pieces[i] != p]
        if missing:
            raise ValueError(
                f"{model_file} lacks the special tokens {missing}; train it with "
                "monarch_megatron.data.tokenizer.train_tokenizer"
            )
        self.pad, self.unk, self.cls, self.sep, self.mask, self.eod = (
            ids[p] for p in SPECIAL_TOKENS
        )
        self.special_ids: frozenset[int] = frozenset(ids.values())
        # Per-id flags for whole-word masking: a word is a piece starting with "▁" plus the
        # following pieces that do not. Special tokens always delimit words.
        self.word_start = np.array([p.startswith(WORD_START) for p in self._pieces], dtype=bool)
        self.is_special = np.zeros(n, dtype=bool)
        self.is_special[list(self.special_ids)] = True
        # Cache key for megatron's index caches: the model's content, not its path, so that a
        # copied model reuses the caches and a retrained one does not.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("model_md5", hashlib.md5(proto).hexdigest())]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    # -- the megatron-core tokenizer surface -------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def vocab(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self._pieces)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return dict(enumerate(self._pieces))

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.decode(ids)

    # -- plain API ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> piece ids (no special tokens added)."""
        return self._sp.encode(text)

    def encode_as_pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Piece ids -> text. Control symbols ([CLS], [SEP], ...) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]

    def normalize(self, text: str) -> str:
        """The text as the model sees it (NFKC, collapsed whitespace): ``decode(encode(t))``
        equals ``normalize(t)`` for every t, since byte fallback leaves nothing unknown."""
        return self._sp.normalize(text).replace(WORD_START, " ").strip()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    sentences: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    num_threads: int = 1,
    input_sentence_size: int = 2_000_000,
    seed: int = 1234,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on ``sentences`` and save it as ``<model_prefix>.model``.

    The special tokens get ids 0..5 (module docstring). Byte fallback is on, so no text ever maps
    to [UNK] and ``decode(encode(t)) == normalize(t)`` exactly. At most ``input_sentence_size``
    sentences (sampled by sentencepiece) are used, which bounds memory on large corpora.
    """
    if vocab_size < 300:
        # 256 byte-fallback pieces + specials + a few characters is the floor.
        raise ValueError(f"vocab_size must be at least 300 with byte fallback, got {vocab_size}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)  # sentence sampling is otherwise time-seeded
    # sentencepiece turns an exception raised by the iterator into an opaque RuntimeError; keep
    # the original (e.g. a CorpusFormatError naming the bad line) and raise it instead.
    failure: list[BaseException] = []

    def guarded() -> Iterator[str]:
        try:
            yield from sentences
        except Exception as err:  # noqa: BLE001 - re-raised below, unchanged
            failure.append(err)

    try:
        _train(guarded(), model_prefix, vocab_size, model_type, num_threads, input_sentence_size)
    except RuntimeError as err:
        if failure:
            raise failure[0] from None
        if "Vocabulary size too high" in str(err):
            limit = str(err).split("Please set it to a value", 1)[-1].strip(" .")
            raise VocabSizeError(
                f"vocab size {vocab_size} is too large for this corpus (sentencepiece: {limit})"
            ) from None
        raise
    if failure:
        raise failure[0]
    return SentencePieceTokenizer(model_prefix + ".model")


def _train(
    sentences: Iterator[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str,
    num_threads: int,
    input_sentence_size: int,
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        pad_piece=PAD,
        unk_piece=UNK,
        control_symbols=[CLS, SEP, MASK, EOD],
        byte_fallback=True,
        num_threads=max(1, num_threads),
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        minloglevel=2,
    )


def load_tokenizer(model_file: str) -> SentencePieceTokenizer:
    """Load a model trained by ``train_tokenizer`` (or any with the same special pieces)."""
    return SentencePieceTokenizer(model_file)
