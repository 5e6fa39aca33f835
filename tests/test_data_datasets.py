"""Pretraining datasets: determinism in (seed, i), disjoint splits, GPT shift, concurrent builds."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from monarch_megatron.data.datasets import build_pretraining_datasets
from monarch_megatron.data.demo_corpus import prepare_demo_data
from monarch_megatron.data.tokenizer import load_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    prefix, model = prepare_demo_data(str(tmp_path_factory.mktemp("demo")), vocab_size=2048)
    return prefix, load_tokenizer(model)


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_sample_i_is_a_function_of_seed_and_i(demo, tmp_path, kind):
    prefix, tok = demo
    seed = fresh_seed()
    # Separate cache dirs: the second build recomputes its index instead of reading the first's.
    a, va = build_pretraining_datasets(prefix, tok, kind, SEQ, 300, 20, seed,
                                       cache_dir=str(tmp_path / "c1"))
    b, vb = build_pretraining_datasets(prefix, tok, kind, SEQ, 300, 20, seed,
                                       cache_dir=str(tmp_path / "c2"))
    idx = list(range(0, 300, 7))
    first = [a[i] for i in idx]
    # Access order does not matter (a resumed run starts in the middle).
    assert all(same(b[i], s) for i, s in reversed(list(zip(idx, first))))
    assert all(same(va[i], vb[i]) for i in range(20))
    c, _ = build_pretraining_datasets(prefix, tok, kind, SEQ, 300, 20, seed + 1,
                                      cache_dir=str(tmp_path / "c3"))
    key = "text" if kind == "bert" else "tokens"
    differing = sum(not torch.equal(c[i][key], s[key]) for i, s in zip(idx, first))
    assert differing > 0.9 * len(idx)


def test_bert_train_and_valid_share_no_document_or_sentence(demo):
    prefix, tok = demo
    train, valid = build_pretraining_datasets(prefix, tok, "bert", SEQ, 500, 50, fresh_seed(),
                                              split=(90, 10))
    assert set(train.indices.tolist()).isdisjoint(valid.indices.tolist())

    def sentences(ds) -> set[int]:
        return {j for beg, end, _ in ds.sample_index for j in range(beg, end)}

    assert sentences(train).isdisjoint(sentences(valid))
    assert len(train) >= 500 and len(valid) >= 50


def test_gpt_train_and_valid_share_no_document(demo):
    prefix, tok = demo
    train, valid = build_pretraining_datasets(prefix, tok, "gpt", SEQ, 500, 50, fresh_seed(),
                                              split=(90, 10))
    assert set(train.document_index.tolist()).isdisjoint(valid.document_index.tolist())


def test_gpt_labels_are_tokens_shifted_by_one(demo):
    prefix, tok = demo
    train, _ = build_pretraining_datasets(prefix, tok, "gpt", SEQ, 200, 20, fresh_seed())
    saw_eod = False
    for i in range(200):
        s = train[i]
        assert s["tokens"].dtype == torch.int64 and s["tokens"].shape == (SEQ,)
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
        saw_eod |= bool((s["tokens"] == tok.eod).any())
    assert saw_eod  # samples run across document boundaries, separated by [EOD]


def test_bert_sample_keys_and_dtypes(demo):
    prefix, tok = demo
    train, _ = build_pretraining_datasets(prefix, tok, "bert", SEQ, 50, 10, fresh_seed(),
                                          sentence_order=False)
    s = train[0]
    for key in ("text", "types", "labels", "padding_mask", "loss_mask"):
        assert s[key].dtype == torch.int64 and s[key].shape == (SEQ,)
    assert s["is_random"].shape == () and s["is_random"].dtype == torch.int64
    # Without sentence order there is one segment and never a swap.
    assert all(int(train[i]["is_random"]) == 0 and int(train[i]["types"].max()) == 0
               for i in range(50))
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["text"].shape == (4, SEQ) and batch["is_random"].shape == (4,)


def _build_and_fingerprint(args) -> list[int]:
    prefix, model, cache, seed = args
    train, _ = build_pretraining_datasets(prefix, load_tokenizer(model), "bert", SEQ, 400, 20,
                                          seed, cache_dir=cache)
    return [int(train[i]["text"].sum()) for i in range(0, 400, 11)]


def test_two_processes_building_one_cache_agree(demo, tmp_path):
    prefix, tok = demo
    args = (prefix, tok.model_file, str(tmp_path / "shared_cache"), fresh_seed())
    with mp.get_context("fork").Pool(2) as pool:
        a, b = pool.map(_build_and_fingerprint, [args, args])
    assert a == b == _build_and_fingerprint(args)
    leftovers = [f for f in os.listdir(tmp_path / "shared_cache") if ".tmp" in f]
    assert leftovers == []


def test_missing_dataset_names_the_path(tmp_path, demo):
    _, tok = demo
    with pytest.raises(FileNotFoundError, match="launcher/preprocess.py"):
        build_pretraining_datasets(str(tmp_path / "none"), tok, "bert", SEQ, 10, 10, 1)


def _distributed_build(rank: int, world: int, init_file: str, args, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        out.put((rank, _build_and_fingerprint(args)))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_build_on_rank_0_first_then_load(demo, tmp_path):
    """Under torch.distributed (gloo, 2 ranks) megatron's rank-0-first protocol with our BERT
    index build gives every rank the same samples, equal to a single-process build."""
    prefix, tok = demo
    args = (prefix, tok.model_file, str(tmp_path / "cache"), fresh_seed())
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_distributed_build,
                         args=(r, 2, str(tmp_path / "init"), args, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == _build_and_fingerprint(args)
