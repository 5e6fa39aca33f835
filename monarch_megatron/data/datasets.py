"""BERT (masked LM + sentence order) and GPT pretraining datasets on megatron-core's classes.

``build_pretraining_datasets`` runs megatron-core's ``BlendedMegatronDatasetBuilder`` over the
indexed datasets written by ``preprocess`` (``<prefix>_text_sentence`` for BERT,
``<prefix>_text_document`` for GPT). Documents are split between train and valid by contiguous
ranges (megatron's ``split``), so the two share no document. Sample i is a pure function of
(seed, i): megatron shuffles with the seed when building the index, and BERT seeds each sample's
masking RNG with ``seed + i``. So a resumed run that skips the consumed samples sees exactly the
order an uninterrupted one would.

Sample dicts are megatron-core's own, as torch tensors (S = seq_length):
    BERT: text, types, labels, padding_mask, loss_mask: int64 [S]; is_random, truncated: int64 []
          labels = -1 where loss_mask == 0; padding_mask 1 = real token; is_random = 1 when the
          two segments were swapped (sentence-order label), always 0 without sentence order.
    GPT:  tokens, labels, position_ids: int64 [S]; loss_mask: float32 [S]; labels[t] = tokens[t+1]
          within the sample (the causal attention mask is left to the model).

Index caches go to ``<data_prefix>_cache/`` (or ``cache_dir``). Two processes may build at once:
under torch.distributed, megatron's builder builds on rank 0 first while the others wait at a
barrier (so *every* rank must call this function); without it, a file lock serialises the
builds and the later process loads what the first one wrote.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import numpy
import torch
from megatron.core.datasets.bert_dataset import (
    BERTMaskedWordPieceDataset,
    BERTMaskedWordPieceDatasetConfig,
)
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from monarch_megatron.data.masking import create_masked_lm_predictions
from monarch_megatron.data.preprocess import indexed_prefix
from monarch_megatron.data.tokenizer import SentencePieceTokenizer

logger = logging.getLogger(__name__)


class SentencePieceBERTDataset(BERTMaskedWordPieceDataset):
    """Megatron-core's BERT dataset with whole-word masking for sentencepiece pieces.

    Megatron's sample construction (sentence runs, A/B segments, swap for sentence order,
    truncation, padding) is inherited unchanged; only the choice of masked positions is replaced
    (``masking.create_masked_lm_predictions``), and the sample index build is made safe without
    torch.distributed (megatron's calls ``torch.distributed.get_rank()`` unconditionally).
    """

    def __init__(self, *args, **kwargs) -> None:  # megatron's MegatronDataset arguments
        super().__init__(*args, **kwargs)
        tok: SentencePieceTokenizer = self.config.tokenizer
        self._replacement_ids = numpy.flatnonzero(~tok.is_special)

    def _create_masked_lm_predictions(
        self,
        token_ids: list[int],
        target_sequence_length: int,
        numpy_random_state: numpy.random.RandomState,
    ) -> tuple[list[int], list[int], list[int], None, None]:
        """(masked ids, masked positions, original ids, -, -); megatron's signature, whose last
        two results (word boundaries, N-gram spans) its BERT dataset does not use."""
        tok: SentencePieceTokenizer = self.config.tokenizer
        masked, positions, labels = create_masked_lm_predictions(
            token_ids,
            word_start=tok.word_start,
            is_special=tok.is_special,
            mask_id=tok.mask,
            replacement_ids=self._replacement_ids,
            rng=numpy_random_state,
            masking_probability=self.config.masking_probability,
            max_ngram=self.config.masking_max_ngram,
            whole_word=self.config.masking_do_full_word,
        )
        return masked, positions, labels, None, None

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        return {k: torch.as_tensor(v, dtype=torch.int64) for k, v in sample.items()}

    def _build_sample_index(
        self, sequence_length: int, min_sentences_per_sample: int
    ) -> numpy.ndarray:
        """Megatron's sample index (runs of whole sentences, shuffled by the seed), cached under
        the same file names; written atomically so a concurrent reader never sees half a file."""
        from megatron.core.datasets import helpers  # compiled; shipped in the megatron-core wheel

        cache = self.config.path_to_cache
        stem = f"{self.unique_description_hash}-{type(self).__name__}-"
        path_desc = os.path.join(cache, stem + "description.txt")
        path_index = os.path.join(cache, stem + "sample_index.npy")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0 and not (os.path.isfile(path_desc) and os.path.isfile(path_index)):
            os.makedirs(cache, exist_ok=True)
            t0 = time.time()
            indices = numpy.append(self.indices, self.indices[-1] + 1)  # + document upper bound
            sample_index = helpers.build_mapping(
                self.dataset.document_indices[indices],
                self.dataset.sequence_lengths,
                numpy.iinfo(numpy.int32).max - 1 if self.num_samples is not None else 1,
                self.num_samples,
                sequence_length,
                self.config.short_sequence_probability,
                self.config.random_seed,
                False,
                min_sentences_per_sample,
            )
            _atomic_save(path_index, sample_index)
            with open(path_desc + ".tmp", "w") as f:
                f.write(self.unique_description)
            os.replace(path_desc + ".tmp", path_desc)
            logger.info(
                "built %s %s sample index: %d samples in %.2fs",
                type(self).__name__, self.index_split.name, len(sample_index), time.time() - t0,
            )
            return sample_index
        return numpy.load(path_index, allow_pickle=True, mmap_mode="r")


def _atomic_save(path: str, array: numpy.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    numpy.save(tmp, array, allow_pickle=True)
    os.replace(tmp, path)


@contextmanager
def _file_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_pretraining_datasets(
    data_prefix: str,
    tokenizer: SentencePieceTokenizer,
    kind: str,
    seq_length: int,
    num_train_samples: int,
    num_valid_samples: int,
    seed: int,
    split: tuple[float, float] = (98, 2),
    masked_lm_prob: float = 0.15,
    short_seq_prob: float = 0.1,
    sentence_order: bool = True,
    cache_dir: Optional[str] = None,
    masking_max_ngram: int = 1,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """Train and valid map-style datasets of at least the requested lengths.

    Args:
        data_prefix: the ``--output-prefix`` given to preprocessing (e.g. ``data/wiki``).
        kind: "bert" (masked LM, 80/10/10, whole-word; sentence order when ``sentence_order``)
            or "gpt" (next-token).
        split: train/valid weights over documents, e.g. (98, 2).
        masking_max_ngram: 1 = standard whole-word masking; N > 1 masks N-grams of whole words
            with P(n) ∝ 1/n as megatron does.

    Returns:
        (train, valid); the sample format is in the module docstring.
    """
    if kind not in ("bert", "gpt"):
        raise ValueError(f"kind must be 'bert' or 'gpt', got {kind!r}")
    path = indexed_prefix(data_prefix, kind)
    if not IndexedDataset.exists(path):
        raise FileNotFoundError(
            f"no indexed dataset at {path}.bin/.idx; run launcher/preprocess.py "
            f"--output-prefix {data_prefix} first"
        )
    if num_train_samples < 1 or num_valid_samples < 1:
        raise ValueError("num_train_samples and num_valid_samples must be >= 1")
    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([path], None),
        split=",".join(str(float(w)) for w in (*split, 0)),
        path_to_cache=cache_dir or f"{data_prefix}_cache",
        tokenizer=tokenizer,
    )
    if kind == "bert":
        cls = SentencePieceBERTDataset
        config = BERTMaskedWordPieceDatasetConfig(
            **common,
            masking_probability=masked_lm_prob,
            short_sequence_probability=short_seq_prob,
            masking_max_ngram=masking_max_ngram,
            masking_do_full_word=True,
            masking_do_permutation=False,
            masking_use_longer_ngrams=False,
            masking_use_geometric_distribution=False,
            classification_head=sentence_order,
        )
    else:
        cls = GPTDataset
        config = GPTDatasetConfig(
            **common,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
    builder = BlendedMegatronDatasetBuilder(
        cls, [num_train_samples, num_valid_samples, None], lambda: True, config
    )
    # Under torch.distributed megatron orders the ranks itself; a lock held across its barrier
    # would deadlock, so the lock is only for independent processes.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    lock = nullcontext() if distributed else _file_lock(os.path.join(config.path_to_cache, ".lock"))
    with lock:
        train, valid, _ = builder.build()
    if train is None or valid is None or len(valid) == 0:
        raise ValueError(
            f"split {split} leaves an empty train or valid set for {path}; "
            "use more documents or a larger valid share"
        )
    return train, valid
