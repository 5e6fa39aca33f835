"""Tiny BERT and GPT (Monarch specs, block-diagonal BERT MLP and GPT, and BERT dense) give the same
losses over 3 optimizer steps at TP=1 and TP=2 (gloo, 2 processes; dropout 0; same seed -> same
global initial weights); fp32, relative tolerance 1e-5. Also the parameter report is TP-invariant."""

from __future__ import annotations

import pytest
import torch

from monarch_megatron.models import ModelConfig, MonarchConfig, build_model, forward_step, parameter_report
from monarch_megatron.parallel import init_tensor_parallel, spawn

TOL = 1e-5
STEPS = 3
SEQ, BATCH, VOCAB = 16, 4, 200
RUNS = {
    "bert_monarch": ("bert", MonarchConfig(nblocks=4)),
    "gpt_monarch": ("gpt", MonarchConfig(nblocks=4)),
    "bert_blockdiag_mlp": ("bert", MonarchConfig(layers=("fc1", "fc2"), nblocks=4, kind="blockdiag")),
    "gpt_blockdiag": ("gpt", MonarchConfig(nblocks=2, kind="blockdiag")),
    "bert_dense": ("bert", None),
}


def _model_cfg(kind: str) -> ModelConfig:
    return ModelConfig(
        kind=kind, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0,
    )


def make_batches(kind: str, n: int, seed: int = 11) -> list[dict[str, torch.Tensor]]:
    """Fresh random batches in megatron's sample-dict layout ([B, S]), identical for one seed."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        loss_mask = (torch.rand(BATCH, SEQ, generator=g) < 0.5).float()
        if kind == "bert":
            padding = torch.ones(BATCH, SEQ, dtype=torch.long)
            padding[1, SEQ - 5 :] = 0  # a padded sample exercises the attention mask
            loss_mask = loss_mask * padding
            batches.append(dict(
                text=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
                types=(torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone(),
                labels=labels, padding_mask=padding, loss_mask=loss_mask,
                is_random=torch.randint(0, 2, (BATCH,), generator=g),
            ))
        else:
            batches.append(dict(
                tokens=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), labels=labels,
                loss_mask=loss_mask, position_ids=torch.arange(SEQ).expand(BATCH, SEQ).clone(),
            ))
    return batches


def train_losses(kind: str, monarch: MonarchConfig | None, seed: int = 1234) -> tuple[list[float], dict]:
    """Losses of STEPS Adam steps from the global init of ``seed`` (parallel_state initialised)."""
    torch.manual_seed(seed)
    model = build_model(_model_cfg(kind), monarch, "fp32")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for batch in make_batches(kind, STEPS):
        opt.zero_grad()
        loss, metrics = forward_step(model, batch, kind)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, parameter_report(model)


def _worker(rank: int, world_size: int) -> dict:
    out = {}
    for tp in (2, 1):
        init_tensor_parallel(tp)
        for name, (kind, monarch) in RUNS.items():
            out[(name, tp)] = train_losses(kind, monarch)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return spawn(_worker, 2)


@pytest.mark.parametrize("name", list(RUNS))
def test_losses_over_three_steps_match_at_tp1_and_tp2(results, name):
    for res in results:
        tp1, _ = res[(name, 1)]
        tp2, _ = res[(name, 2)]
        assert len(tp1) == STEPS
        for step, (a, b) in enumerate(zip(tp2, tp1)):
            assert abs(a - b) / abs(b) < TOL, f"{name} step {step}: TP=2 loss {a} vs TP=1 {b}"


@pytest.mark.parametrize("name", list(RUNS))
def test_parameter_report_is_tp_invariant(results, name):
    for res in results:
        assert res[(name, 1)][1] == res[(name, 2)][1]
