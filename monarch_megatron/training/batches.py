"""Per-phase datasets and the deterministic, resumable order in which ranks read them.

Every phase has its own train/valid datasets (its sequence length) from
:func:`monarch_megatron.data.datasets.build_pretraining_datasets`, where sample ``i`` is a pure
function of (seed, i). Step ``k`` of a phase consumes train samples ``[k*G, (k+1)*G)`` (``G`` =
global batch); within the step, micro-batch ``a`` of data-parallel rank ``d`` is samples
``k*G + (a*DP + d)*m + [0, m)`` (``m`` = micro batch). So the data order is fixed by the step
alone: a resumed run that starts at step ``k`` reads exactly what an uninterrupted one would, and
every TP rank of a DP rank reads the same samples (no broadcast needed). Validation always uses
the first ``eval_iters`` micro-batches of each DP rank, so validation losses are comparable over
the run and deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from .config import RunConfig
from .distributed import Layout
from .phases import Phase, grad_accumulation
from .schema_io import ConfigError


@dataclass(frozen=True)
class DataSource:
    """Where the indexed data and tokenizer of the run are."""

    prefix: str
    tokenizer_model: str


def prepare_data(cfg: RunConfig) -> DataSource:
    """Build (once) or locate the run's data, and check it (:func:`check_data_source`). The demo
    source builds its corpus, tokenizer and indexed datasets under ``data.cache_dir`` (default
    ``<output_dir>/data``); safe on every rank."""
    if cfg.data.source == "demo":
        from ..data.demo_corpus import prepare_demo_data

        out = cfg.data.cache_dir or os.path.join(cfg.output_dir, "data")
        source = DataSource(*prepare_demo_data(out, vocab_size=cfg.data.vocab_size or cfg.vocab_size))
    else:
        source = DataSource(cfg.data.prefix, cfg.data.tokenizer_model)  # type: ignore[arg-type]
    check_data_source(cfg, source)
    return source


def check_data_source(cfg: RunConfig, source: DataSource) -> None:
    """The tokenizer loads and fits the model's vocabulary, and the model kind's indexed dataset is
    whole (``.bin`` the size its ``.idx`` describes): cheap, no data read.

    Raises:
        ConfigError: naming ``data.tokenizer_model`` or ``data.prefix`` and the file.
    """
    from ..data.preprocess import indexed_prefix
    from ..data.validate import DataError, check_indexed_dataset, check_tokenizer

    try:
        check_tokenizer(source.tokenizer_model, cfg.vocab_size)
    except DataError as err:
        raise ConfigError("data.tokenizer_model", str(err)) from None
    try:
        check_indexed_dataset(indexed_prefix(source.prefix, cfg.model.kind))
    except DataError as err:
        raise ConfigError("data.prefix", str(err)) from None


class StepSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of sample indices) for steps ``start..end-1``."""

    def __init__(self, start: int, end: int, global_batch: int, micro: int, dp: int, dp_rank: int) -> None:
        self.start, self.end = start, end
        self.global_batch, self.micro, self.dp, self.dp_rank = global_batch, micro, dp, dp_rank
        self.accumulation = grad_accumulation(global_batch, micro, dp)

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.end):
            for a in range(self.accumulation):
                base = k * self.global_batch + (a * self.dp + self.dp_rank) * self.micro
                yield list(range(base, base + self.micro))

    def __len__(self) -> int:
        return (self.end - self.start) * self.accumulation


class PhaseData:
    """Train/valid datasets of one phase and this rank's view of them."""

    def __init__(self, cfg: RunConfig, phase: Phase, layout: Layout, source: DataSource, tokenizer) -> None:
        from ..data.datasets import build_pretraining_datasets

        self.cfg, self.phase, self.layout = cfg, phase, layout
        self.valid_micro = phase.micro_batch_size
        n_valid = cfg.training.eval_iters * self.valid_micro * layout.dp
        d = cfg.data
        self.train, self.valid = build_pretraining_datasets(
            source.prefix, tokenizer, cfg.model.kind, phase.seq_length,
            num_train_samples=phase.steps * phase.global_batch_size, num_valid_samples=n_valid,
            seed=cfg.seed + phase.index, split=tuple(d.split), masked_lm_prob=d.masked_lm_prob,
            short_seq_prob=d.short_seq_prob, sentence_order=cfg.model.sentence_order,
            masking_max_ngram=d.masking_max_ngram,
        )

    def train_micro_batches(self, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches ``[micro, seq]`` of this rank from phase-local step ``start_step`` on."""
        ph, lay = self.phase, self.layout
        sampler = StepSampler(start_step, ph.steps, ph.global_batch_size, ph.micro_batch_size, lay.dp, lay.dp_rank)
        workers = self.cfg.data.num_workers
        loader = DataLoader(self.train, batch_sampler=sampler, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            prefetch_factor=4 if workers > 0 else None)
        return iter(loader)

    def valid_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The fixed validation micro-batches of this rank (``eval_iters`` of them)."""
        lay, m = self.layout, self.valid_micro
        out = []
        for a in range(self.cfg.training.eval_iters):
            base = (a * lay.dp + lay.dp_rank) * m
            out.append(torch.utils.data.default_collate([self.valid[i] for i in range(base, base + m)]))
        return out
