"""Preprocessing: corpus -> sentencepiece -> megatron .bin/.idx, read back through megatron."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from monarch_megatron.data.corpus import iter_documents, split_sentences
from monarch_megatron.data.demo_corpus import prepare_demo_data
from monarch_megatron.data.preprocess import indexed_prefix, main, preprocess_corpus
from monarch_megatron.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launcher", "preprocess.py")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_demo_data(str(tmp_path_factory.mktemp("demo")), vocab_size=2048)


def random_documents(rng: np.random.Generator, n: int) -> list[str]:
    """Fresh random text: random words (ASCII, accents, CJK, emoji), punctuation, messy spacing
    and line breaks inside documents, so normalisation and byte fallback are exercised."""
    alphabet = list("abcdefghijklmnopqrstuvwxyz") * 4 + list("éüßçø中文字😀")
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.integers(1, 6)):
            words = [
                "".join(rng.choice(alphabet, size=rng.integers(1, 10)))
                for _ in range(rng.integers(2, 14))
            ]
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + str(rng.choice([".", "!", "?", ".", ","])))
        seps = rng.choice(["  ", " ", "\n", "\t "], size=len(sentences))
        docs.append("".join(s + sep for s, sep in zip(sentences, seps)).strip())
    return docs


def test_roundtrip_jsonl_through_megatron_indexed_dataset(demo, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, model = demo
    tok = load_tokenizer(model)
    docs = random_documents(np.random.default_rng(), 40)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    summary = preprocess_corpus(str(corpus), str(tmp_path / "out"), tokenizer_model=model,
                                progress=False)
    sent = IndexedDataset(indexed_prefix(str(tmp_path / "out"), "bert"))
    whole = IndexedDataset(indexed_prefix(str(tmp_path / "out"), "gpt"))

    assert summary.documents == len(docs) == len(whole) == len(sent.document_indices) - 1
    assert summary.sentences == len(sent)
    assert summary.tokens == int(sent.sequence_lengths.sum())
    for i, doc in enumerate(docs):
        expected = tok.normalize(doc)
        lo, hi = sent.document_indices[i], sent.document_indices[i + 1]
        sentence_ids = [np.asarray(sent[j]) for j in range(lo, hi)]
        assert hi - lo == len(split_sentences(doc))  # one item per sentence
        flat = np.concatenate(sentence_ids)
        assert tok.decode(flat) == expected
        item = np.asarray(whole[i])
        assert item[-1] == tok.eod and tok.eod not in item[:-1]
        np.testing.assert_array_equal(item[:-1], flat)  # the document = its sentences + [EOD]


def test_plain_text_documents_are_blank_line_paragraphs(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First doc line one\nline two.\n\n\n  \nSecond doc.\n\t\nThird\n")
    assert list(iter_documents(str(path))) == ["First doc line one line two.", "Second doc.",
                                               "Third"]


def test_trained_tokenizer_has_fixed_special_ids_and_exact_roundtrip(tmp_path):
    docs = random_documents(np.random.default_rng(), 300)
    tok = train_tokenizer((s for d in docs for s in split_sentences(d)), str(tmp_path / "t"), 400)
    assert [tok.pad, tok.unk, tok.cls, tok.sep, tok.mask, tok.eod] == [0, 1, 2, 3, 4, 5]
    assert [tok.id_to_piece(i) for i in range(6)] == list(SPECIAL_TOKENS)
    assert tok.vocab_size == 400
    # Control symbols cannot be produced from text.
    ids = tok.encode("a [MASK] b [CLS] [SEP] [PAD] [EOD]")
    assert not set(ids) & {tok.pad, tok.cls, tok.sep, tok.mask, tok.eod}
    for doc in random_documents(np.random.default_rng(), 20):  # unseen text, byte fallback
        assert tok.decode(tok.encode(doc)) == tok.normalize(doc)
        assert tok.unk not in tok.encode(doc)


def test_cli_missing_input_is_one_clear_error_exit_2(tmp_path):
    missing = tmp_path / "nope.jsonl"
    r = subprocess.run(
        [sys.executable, LAUNCHER, "--input", str(missing), "--output-prefix",
         str(tmp_path / "x"), "--train-tokenizer", "500"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: input file not found: {missing}"


def test_cli_malformed_jsonl_names_the_line_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "Fine. Really."}\n\n{"text": 3}\n')
    r = subprocess.run(
        [sys.executable, LAUNCHER, "--input", str(path), "--output-prefix", str(tmp_path / "x"),
         "--train-tokenizer", "500"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert f"{path}:3:" in r.stderr and "'text'" in r.stderr
    assert not list(tmp_path.glob("x_text_*"))  # nothing half-written


def test_cli_prints_summary_and_writes_both_datasets(demo, tmp_path, capsys):
    docs = random_documents(np.random.default_rng(), 30)
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs) + "\n")
    prefix = str(tmp_path / "d" / "wiki")
    assert main(["--input", str(path), "--output-prefix", prefix, "--train-tokenizer", "400",
                 "--workers", "2", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"preprocess: {len(docs)} documents, ")
    assert " sentences, " in line and " tokens, " in line and " seconds" in line
    for kind in ("bert", "gpt"):
        for ext in (".bin", ".idx"):
            assert os.path.isfile(indexed_prefix(prefix, kind) + ext)
    assert load_tokenizer(prefix + ".model").vocab_size == 400


def test_vocab_size_larger_than_corpus_supports_is_a_clear_error(tmp_path):
    from monarch_megatron.data.tokenizer import VocabSizeError

    docs = random_documents(np.random.default_rng(), 20)
    with pytest.raises(VocabSizeError, match="too large for this corpus"):
        train_tokenizer((s for d in docs for s in split_sentences(d)), str(tmp_path / "t"), 50000)
