"""Cheap checks of a run's data before any heavy work: the indexed dataset's files against each
other, and the tokenizer model. Every problem is a :class:`DataError` naming the file.

megatron-core's ``.idx`` (``indexed_dataset._IndexWriter``): a 34-byte header (``MMIDIDX\\0\\0``,
version ``<Q`` = 1, dtype code ``<B``, sequence count ``<Q``, document count ``<Q``), then the
sequence lengths (int32), the sequence byte offsets into ``.bin`` (int64), the document indices
(int64) and, for multimodal data, one mode byte per sequence. So the ``.bin`` holds exactly
``offset[-1] + length[-1] * itemsize`` bytes: a truncated or foreign ``.bin`` is found from the two
last entries, without reading the data.
"""

from __future__ import annotations

import os
import struct

_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 34
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes


class DataError(ValueError):
    """A data file that a run cannot use; the message names it."""


def check_indexed_dataset(path: str) -> int:
    """Check ``<path>.idx`` and ``<path>.bin`` against each other; returns the number of sequences.

    Raises:
        DataError: a file is missing, the index is not megatron-core's, is truncated or empty, or
            the ``.bin`` is not the size the index describes.
    """
    idx, bin_ = path + ".idx", path + ".bin"
    for name in (idx, bin_):
        if not os.path.isfile(name):
            raise DataError(f"{name} not found (run launcher/preprocess.py --output-prefix <data.prefix> first)")
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != _HEADER:
            raise DataError(f"{idx} is not a megatron-core index file (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in _ITEMSIZE:
            raise DataError(f"{idx} has an unknown version {version} or dtype code {code}")
        expected = _HEADER_BYTES + n_seq * 12 + n_doc * 8
        if idx_size not in (expected, expected + n_seq):
            raise DataError(f"{idx} has {idx_size} bytes but its header describes {n_seq} sequences in {n_doc} "
                            f"documents ({expected} bytes): truncated or overwritten; re-run launcher/preprocess.py")
        if n_seq == 0:
            raise DataError(f"{idx} indexes no sequences (an empty corpus?)")
        f.seek(_HEADER_BYTES + (n_seq - 1) * 4)
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(_HEADER_BYTES + n_seq * 4 + (n_seq - 1) * 8)
        (last_offset,) = struct.unpack("<q", f.read(8))
    want = last_offset + last_length * _ITEMSIZE[code]
    have = os.path.getsize(bin_)
    if have != want:
        raise DataError(f"{bin_} has {have} bytes but {idx} indexes {want} ({n_seq} sequences): "
                        f"{'truncated' if have < want else 'not the data this index was written with'}; "
                        "re-run launcher/preprocess.py")
    return n_seq


def check_tokenizer(model_file: str, vocab_size: int | None = None):
    """Load the sentencepiece model ``model_file`` (a :class:`~.tokenizer.SentencePieceTokenizer`)
    and check that the model's vocabulary (``vocab_size``) has room for its tokens.

    Raises:
        DataError: missing, not a sentencepiece model, without BERT's special tokens, or larger
            than ``vocab_size``.
    """
    from .tokenizer import SentencePieceTokenizer

    if not os.path.isfile(model_file):
        raise DataError(f"{model_file} not found")
    try:
        tokenizer = SentencePieceTokenizer(model_file)
    except ValueError as err:
        raise DataError(str(err)) from None
    except RuntimeError as err:  # sentencepiece: "Internal: could not parse ModelProto ..."
        first = (str(err).strip().splitlines() or [""])[0]
        raise DataError(f"{model_file} is not a sentencepiece model ({first})") from None
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(f"{model_file} has {tokenizer.vocab_size} tokens but the model's vocabulary (model.vocab_size "
                        f"or data.vocab_size) is {vocab_size}")
    return tokenizer


__all__ = ["DataError", "check_indexed_dataset", "check_tokenizer"]
