"""Whole-word masked-LM selection for sentencepiece pieces.

Megatron-core's ``MaskedWordPieceDataset._create_masked_lm_predictions`` finds words through
WordPiece's "##" continuation prefix and treats only [CLS]/[SEP] as special. With sentencepiece the
marker is the opposite: a word is a piece starting with "▁" plus the following pieces that do not.
This module is that logic for sentencepiece, with megatron's selection scheme otherwise kept
(shuffle whole-word candidates, optional N-grams of words with P(N) ∝ 1/N, stop at the budget,
80/10/10 per token) and two corrections: every special token is excluded (not just [CLS]/[SEP]),
and random replacements are drawn from non-special ids only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def whole_word_candidates(
    token_ids: Sequence[int], word_start: np.ndarray, is_special: np.ndarray
) -> list[list[int]]:
    """Group the non-special positions of ``token_ids`` into words.

    A word starts at a piece flagged in ``word_start`` (indexed by token id), or at the first
    non-special piece after a special token or the sequence start (a segment may begin mid-word
    after truncation), and continues over the following non-word-start, non-special pieces.

    Returns:
        list of words, each a list of positions in ``token_ids`` (ascending).
    """
    words: list[list[int]] = []
    in_word = False
    for pos, tok in enumerate(token_ids):
        if is_special[tok]:
            in_word = False
        elif word_start[tok] or not in_word:
            words.append([pos])
            in_word = True
        else:
            words[-1].append(pos)
    return words


def masked_positions_bound(seq_length: int, masking_probability: float) -> int:
    """The most positions :func:`create_masked_lm_predictions` masks in a sequence of
    ``seq_length`` tokens: its budget ``max(1, round(p * eligible))`` with ``eligible <= seq_length``
    (whole words and N-grams are taken only while they fit the budget)."""
    return min(seq_length, max(1, int(round(masking_probability * seq_length))))


def create_masked_lm_predictions(
    token_ids: Sequence[int],
    *,
    word_start: np.ndarray,
    is_special: np.ndarray,
    mask_id: int,
    replacement_ids: np.ndarray,
    rng: np.random.RandomState,
    masking_probability: float = 0.15,
    max_ngram: int = 1,
    whole_word: bool = True,
) -> tuple[list[int], list[int], list[int]]:
    """Choose masked-LM targets among the non-special tokens of one sequence.

    The budget is ``max(1, round(masking_probability * eligible))`` tokens, where ``eligible`` is
    the number of non-special tokens; whole words (or N-grams of whole words) are taken in random
    order while they fit the budget. Each chosen token becomes [MASK] with probability 0.8, a
    uniformly random id from ``replacement_ids`` with 0.1, and stays itself with 0.1.

    Args:
        token_ids: the sequence, special tokens included ([CLS] ... [SEP] ... [SEP]).
        word_start, is_special: bool arrays over the vocabulary (see ``SentencePieceTokenizer``).
        rng: the per-sample random state (its draws make the sample deterministic in its seed).

    Returns:
        (masked token ids, masked positions ascending, original ids at those positions)
    """
    if whole_word:
        candidates = whole_word_candidates(token_ids, word_start, is_special)
    else:
        candidates = [[p] for p, t in enumerate(token_ids) if not is_special[t]]
    eligible = sum(len(c) for c in candidates)
    budget = max(1, int(round(masking_probability * eligible))) if eligible else 0

    ngram_sizes = np.arange(1, max_ngram + 1)
    ngram_probs = 1.0 / ngram_sizes

    masked = list(token_ids)
    chosen: set[int] = set()
    for start in rng.permutation(len(candidates)):
        if len(chosen) >= budget:
            break
        # Longest N available from this start, N drawn with P(N) ∝ 1/N, then shrunk until the
        # span fits the remaining budget (megatron's scheme).
        n_max = min(max_ngram, len(candidates) - start)
        p = ngram_probs[:n_max] / ngram_probs[:n_max].sum()
        n = int(rng.choice(ngram_sizes[:n_max], p=p)) if n_max > 1 else 1
        span: list[int] = []
        while n > 0:
            span = [pos for word in candidates[start : start + n] for pos in word]
            if len(chosen) + len(span) <= budget:
                break
            n -= 1
        if n == 0 or any(pos in chosen for pos in span):
            continue
        for pos in span:
            chosen.add(pos)
            r = rng.random_sample()
            if r < 0.8:
                masked[pos] = mask_id
            elif r < 0.9:
                masked[pos] = int(replacement_ids[rng.randint(len(replacement_ids))])
            # else: keep the original token (it is still a prediction target)
    positions = sorted(chosen)
    return masked, positions, [int(token_ids[p]) for p in positions]
