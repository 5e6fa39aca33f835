"""Corpus (jsonl / text) -> sentencepiece model -> megatron-core indexed datasets (.bin/.idx).

One preprocessing run writes two indexed datasets from one tokenisation pass, because BERT and
GPT need different item granularities and megatron-core's dataset classes read the granularity
off the file (BERT splits by document and draws runs of *sentences*; GPT treats every item as a
document):

    <prefix>_text_sentence.{bin,idx}   BERT: one item per sentence, documents marked by
                                       end_document (megatron's --split-sentences layout);
                                       no end-of-document token.
    <prefix>_text_document.{bin,idx}   GPT: one item per document with [EOD] appended.
    <prefix>.model                     the sentencepiece model, when trained here.

Sentence splits are at spaces and sentencepiece never lets a piece cross a space, so the
document item is exactly the concatenation of its sentence items (plus [EOD]): each document is
encoded once, sentence by sentence.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing as mp
import os
import sys
import time
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from monarch_megatron.data.corpus import CorpusFormatError, iter_documents, split_sentences
from monarch_megatron.data.tokenizer import (
    SentencePieceTokenizer,
    VocabSizeError,
    train_tokenizer,
)

KIND_SUFFIX = {"bert": "_text_sentence", "gpt": "_text_document"}


def indexed_prefix(data_prefix: str, kind: str) -> str:
    """The .bin/.idx path prefix of the ``kind`` ("bert" | "gpt") dataset under ``data_prefix``."""
    if kind not in KIND_SUFFIX:
        raise ValueError(f"kind must be one of {sorted(KIND_SUFFIX)}, got {kind!r}")
    return data_prefix + KIND_SUFFIX[kind]


@dataclasses.dataclass
class PreprocessSummary:
    documents: int
    sentences: int
    tokens: int  # sentence tokens, i.e. excluding the appended [EOD]s
    seconds: float
    tokenizer_model: str
    outputs: dict[str, str]  # kind -> indexed dataset prefix

    def line(self) -> str:
        return (
            f"preprocess: {self.documents} documents, {self.sentences} sentences, "
            f"{self.tokens} tokens, {self.seconds:.1f} seconds -> "
            + ", ".join(self.outputs.values())
        )


# Worker state for multiprocessing: the tokenizer is loaded once per worker process.
_WORKER_TOKENIZER: Optional[SentencePieceTokenizer] = None
_WORKER_SPLIT = True


def _init_worker(model_file: str, split: bool) -> None:
    global _WORKER_TOKENIZER, _WORKER_SPLIT
    _WORKER_TOKENIZER = SentencePieceTokenizer(model_file)
    _WORKER_SPLIT = split


def _encode_document(text: str) -> list[list[int]]:
    """Document -> list of non-empty sentence id lists."""
    sentences = split_sentences(text) if _WORKER_SPLIT else [" ".join(text.split())]
    encoded = (_WORKER_TOKENIZER.encode(s) for s in sentences)
    return [ids for ids in encoded if ids]


def _training_sentences(path: str, split: bool) -> Iterator[str]:
    for doc in iter_documents(path):
        yield from (split_sentences(doc) if split else [doc])


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _encode_corpus(
    input_path: str,
    tokenizer: SentencePieceTokenizer,
    split: bool,
    workers: int,
    progress: bool,
    sent_builder,
    doc_builder,
) -> tuple[int, int, int]:
    """Encode every document into both builders; returns (documents, sentences, tokens)."""
    n_docs = n_sents = n_tokens = 0
    pool = None
    if workers > 1:
        pool = mp.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(tokenizer.model_file, split)
        )
    else:
        _init_worker(tokenizer.model_file, split)
    bar = tqdm(unit=" docs", desc="tokenizing", disable=not progress, mininterval=1.0)
    try:
        # Batches bound memory: Pool.imap would otherwise read the whole corpus ahead.
        for batch in _batched(iter_documents(input_path), 4096):
            results = (
                pool.imap(_encode_document, batch, chunksize=64)
                if pool is not None
                else map(_encode_document, batch)
            )
            for sentences in results:
                if not sentences:
                    continue
                lengths = [len(s) for s in sentences]
                flat = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int64)
                sent_builder.add_document(flat, lengths)
                doc_builder.add_document(np.append(flat, tokenizer.eod), [len(flat) + 1])
                n_docs += 1
                n_sents += len(sentences)
                n_tokens += len(flat)
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return n_docs, n_sents, n_tokens


def preprocess_corpus(
    input_path: str,
    output_prefix: str,
    *,
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
    workers: int = 1,
    split_sentences_: bool = True,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenise ``input_path`` into the indexed datasets described in the module docstring.

    Exactly one of ``tokenizer_model`` (use this model) and ``vocab_size`` (train one on the
    corpus, saved as ``<output_prefix>.model``) must be given. Outputs are written under
    temporary names and renamed at the end, so an interrupted run leaves no half-written
    dataset behind under the final names.
    """
    t0 = time.time()
    if (tokenizer_model is None) == (vocab_size is None):
        raise ValueError("give exactly one of tokenizer_model and vocab_size")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input file not found: {input_path}")
    if next(iter_documents(input_path), None) is None:
        raise CorpusFormatError(f"{input_path} holds no documents (no non-empty text): nothing to preprocess")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    if tokenizer_model is None:
        tokenizer = train_tokenizer(
            _training_sentences(input_path, split_sentences_),
            output_prefix,
            vocab_size,
            num_threads=workers,
        )
    else:
        tokenizer = SentencePieceTokenizer(tokenizer_model)

    # Imported here, not at module level: importing megatron.core takes several seconds, and a
    # bad command line or a malformed corpus (found while training) should fail at once.
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    outputs = {kind: indexed_prefix(output_prefix, kind) for kind in KIND_SUFFIX}
    tmp = {kind: f"{p}.tmp{os.getpid()}" for kind, p in outputs.items()}
    sent_builder = IndexedDatasetBuilder(get_bin_path(tmp["bert"]), dtype=dtype)
    doc_builder = IndexedDatasetBuilder(get_bin_path(tmp["gpt"]), dtype=dtype)

    try:
        n_docs, n_sents, n_tokens = _encode_corpus(
            input_path, tokenizer, split_sentences_, workers, progress, sent_builder, doc_builder
        )
        for kind, builder in (("bert", sent_builder), ("gpt", doc_builder)):
            builder.finalize(get_idx_path(tmp[kind]))
    except BaseException:
        for kind in tmp:
            for leftover in (get_bin_path(tmp[kind]), get_idx_path(tmp[kind])):
                if os.path.exists(leftover):
                    os.remove(leftover)
        raise
    for kind in tmp:
        # .bin first, then .idx: a reader needs both, and .idx is what marks completeness.
        os.replace(get_bin_path(tmp[kind]), get_bin_path(outputs[kind]))
        os.replace(get_idx_path(tmp[kind]), get_idx_path(outputs[kind]))

    return PreprocessSummary(
        n_docs, n_sents, n_tokens, time.time() - t0, tokenizer.model_file, outputs
    )


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess.py",
        description="jsonl/text corpus -> sentencepiece model -> megatron .bin/.idx datasets",
    )
    p.add_argument("--input", required=True, help="corpus.jsonl (field 'text') or corpus.txt "
                   "(documents separated by blank lines)")
    p.add_argument("--output-prefix", required=True, help="e.g. data/wiki -> data/wiki_text_"
                   "sentence.{bin,idx} (BERT), data/wiki_text_document.{bin,idx} (GPT)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                     help="train a sentencepiece model of this vocab size, saved as PREFIX.model")
    tok.add_argument("--tokenizer-model", metavar="PATH", help="an existing sentencepiece model")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--split-sentences", action=argparse.BooleanOptionalAction, default=True,
                   help="one BERT item per sentence (default); --no-split-sentences: per document")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (2 for a bad input file or argument)."""
    args = build_arg_parser().parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"error: input file not found: {args.input}", file=sys.stderr)
        return 2
    if args.tokenizer_model is not None:
        from monarch_megatron.data.validate import DataError, check_tokenizer

        try:
            check_tokenizer(args.tokenizer_model)
        except DataError as err:
            print(f"error: tokenizer model: {err}", file=sys.stderr)
            return 2
    if args.train_tokenizer is not None and args.train_tokenizer < 300:
        print(f"error: --train-tokenizer {args.train_tokenizer}: the vocabulary needs at least 300 pieces "
              "(256 byte-fallback pieces, the special tokens and some text)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers {args.workers}: must be at least 1", file=sys.stderr)
        return 2
    try:
        summary = preprocess_corpus(
            args.input,
            args.output_prefix,
            tokenizer_model=args.tokenizer_model,
            vocab_size=args.train_tokenizer,
            workers=args.workers,
            split_sentences_=args.split_sentences,
            progress=not args.no_progress,
        )
    except (CorpusFormatError, VocabSizeError) as err:  # bad input, not a bug: exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0
