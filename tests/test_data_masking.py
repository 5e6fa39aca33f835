"""BERT masked-LM samples: 15% of eligible tokens, 80/10/10, whole words, specials untouched."""

from __future__ import annotations

import numpy as np
import pytest

from monarch_megatron.data.demo_corpus import prepare_demo_data
from monarch_megatron.data.masking import create_masked_lm_predictions, whole_word_candidates
from monarch_megatron.data.tokenizer import WORD_START, load_tokenizer

N_SAMPLES = 2000
SEQ = 128


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from monarch_megatron.data.datasets import build_pretraining_datasets

    prefix, model = prepare_demo_data(str(tmp_path_factory.mktemp("demo")), vocab_size=2048)
    tok = load_tokenizer(model)
    seed = int(np.random.default_rng().integers(2**31))  # fresh data each run
    train, _ = build_pretraining_datasets(prefix, tok, "bert", SEQ, N_SAMPLES, 50, seed)
    samples = [{k: v.numpy() for k, v in train[i].items()} for i in range(N_SAMPLES)]
    return tok, samples


def original_tokens(s: dict) -> np.ndarray:
    """The unmasked sequence: labels hold the originals where the loss mask is set."""
    return np.where(s["loss_mask"] == 1, s["labels"], s["text"])


def words_by_piece_strings(tok, ids: np.ndarray) -> list[list[int]]:
    """Independent word segmentation from piece strings: a word is a "▁" piece plus following
    non-"▁" pieces; special tokens separate words and belong to none."""
    specials = {tok.pad, tok.unk, tok.cls, tok.sep, tok.mask, tok.eod}
    words, prev_special = [], True
    for pos, i in enumerate(ids.tolist()):
        if i in specials:
            prev_special = True
            continue
        if tok.id_to_piece(i).startswith(WORD_START) or prev_special:
            words.append([pos])
        else:
            words[-1].append(pos)
        prev_special = False
    return words


def test_fifteen_percent_of_eligible_tokens_are_targets(bert):
    tok, samples = bert
    masked = eligible = 0.0
    for s in samples:
        n = int(s["padding_mask"].sum())
        orig = original_tokens(s)[:n]
        eligible += float(np.sum(~tok.is_special[orig], dtype=np.float64))
        masked += float(s["loss_mask"].sum(dtype=np.float64))
    assert masked / eligible == pytest.approx(0.15, abs=0.01)


def test_targets_split_80_10_10_mask_random_keep(bert):
    tok, samples = bert
    n_mask = n_keep = n_total = 0
    for s in samples:
        sel = s["loss_mask"] == 1
        n_total += int(sel.sum())
        n_mask += int(np.sum(s["text"][sel] == tok.mask))
        n_keep += int(np.sum(s["text"][sel] == s["labels"][sel]))
    assert n_total > 10000
    frac = np.array([n_mask, n_total - n_mask - n_keep, n_keep], dtype=np.float64) / n_total
    # ~6 standard deviations of a binomial proportion at n > 10^4
    np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.015)


def test_special_tokens_are_never_targets_or_replacements(bert):
    tok, samples = bert
    for s in samples:
        sel = s["loss_mask"] == 1
        assert not tok.is_special[s["labels"][sel]].any()
        replaced = s["text"][sel]
        assert not tok.is_special[replaced[replaced != tok.mask]].any()
        assert np.all(s["labels"][~sel] == -1)
        n = int(s["padding_mask"].sum())
        # padding_mask: 1 on the real prefix, 0 on padding; sequence = [CLS] A [SEP] (B [SEP])
        assert np.all(s["padding_mask"][:n] == 1) and np.all(s["padding_mask"][n:] == 0)
        assert s["text"][0] == tok.cls and s["text"][n - 1] == tok.sep
        assert np.all(s["text"][n:] == tok.pad) and np.all(s["loss_mask"][n:] == 0)


def test_whole_words_are_masked_together(bert):
    tok, samples = bert
    multi_piece_masked = 0
    for s in samples:
        lm = s["loss_mask"]
        for word in words_by_piece_strings(tok, original_tokens(s)):
            states = lm[word]
            assert states.min() == states.max(), "a word was partly masked"
            multi_piece_masked += int(len(word) > 1 and states[0] == 1)
    assert multi_piece_masked > 100  # the property is not vacuous


def test_sentence_order_label_is_balanced_and_matches_segments(bert):
    _, samples = bert
    is_random = np.array([int(s["is_random"]) for s in samples], dtype=np.float64)
    assert is_random.mean() == pytest.approx(0.5, abs=0.05)
    for s in samples:
        n = int(s["padding_mask"].sum())
        types = s["types"][:n]
        assert types[0] == 0 and types[-1] == 1 and np.all(np.diff(types) >= 0)


def test_masking_budget_on_fresh_random_sequence():
    """Single-piece words only: the budget round(0.15 * eligible) is met exactly."""
    rng = np.random.default_rng()
    vocab = 500
    word_start = np.ones(vocab, dtype=bool)
    is_special = np.zeros(vocab, dtype=bool)
    is_special[:6] = True
    for _ in range(50):
        body = rng.integers(6, vocab, size=rng.integers(20, 200)).tolist()
        ids = [2, *body, 3]
        masked, pos, labels = create_masked_lm_predictions(
            ids, word_start=word_start, is_special=is_special, mask_id=4,
            replacement_ids=np.arange(6, vocab), rng=np.random.RandomState(rng.integers(2**31)),
        )
        assert len(pos) == max(1, round(0.15 * len(body)))
        assert 0 not in pos and len(ids) - 1 not in pos
        assert labels == [ids[p] for p in pos]
        assert [m for i, m in enumerate(masked) if i not in set(pos)] == [
            t for i, t in enumerate(ids) if i not in set(pos)
        ]


def test_word_candidates_follow_the_word_start_marker():
    #        [CLS]  ▁a   b   c  ▁d  [SEP]  e   ▁f  [SEP]
    ids = [2, 10, 11, 12, 13, 3, 14, 15, 3]
    word_start = np.zeros(20, dtype=bool)
    word_start[[10, 13, 15]] = True
    is_special = np.zeros(20, dtype=bool)
    is_special[:6] = True
    # "e" after [SEP] starts a word (a truncated segment may begin mid-word)
    assert whole_word_candidates(ids, word_start, is_special) == [[1, 2, 3], [4], [6], [7]]
