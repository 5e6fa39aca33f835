"""The in-memory Monarch -> dense conversion is exact: per layer against a float64 reference, and
for whole BERT / GPT models (the converted dense model gives the Monarch model's loss, rel 1e-5,
fp32); the converted state dict loads strictly into megatron-core's stock local-spec models."""

from __future__ import annotations

import pytest
import torch

from monarch_megatron.parallel.densify import dense_state_dict_from_monarch, local_dense_weight
from monarch_megatron.models import ModelConfig, MonarchConfig, build_model, forward_step
from monarch_megatron.monarch import monarch_multiply_torch
from monarch_megatron.parallel import MonarchColumnParallelLinear, MonarchRowParallelLinear
from monarch_megatron.training.distributed import init_distributed, seed_everything, shutdown


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    init_distributed(1)
    yield
    shutdown()


def _model_cfg(kind: str, hidden: int = 48, ffn: int = 96) -> ModelConfig:
    return ModelConfig(kind=kind, num_layers=2, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=ffn,
                       vocab_size=200, max_position_embeddings=32, sentence_order=kind == "bert")


def _batch(kind: str, gen: torch.Generator, b: int = 3, s: int = 16) -> dict[str, torch.Tensor]:
    if kind == "bert":
        pad = torch.ones(b, s, dtype=torch.long)
        pad[0, 12:] = 0
        return dict(text=torch.randint(0, 200, (b, s), generator=gen), types=torch.randint(0, 2, (b, s), generator=gen),
                    labels=torch.randint(0, 200, (b, s), generator=gen), padding_mask=pad,
                    loss_mask=torch.randint(0, 2, (b, s), generator=gen), is_random=torch.randint(0, 2, (b,), generator=gen))
    tokens = torch.randint(0, 200, (b, s), generator=gen)
    return dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(b, s),
                position_ids=torch.arange(s).repeat(b, 1))


@pytest.mark.parametrize("nblocks", [4, 3])  # 3: widths 40 / 88 / 120 are zero-padded
def test_each_layer_dense_weight_equals_float64_monarch_product(nblocks: int) -> None:
    seed_everything(int(torch.randint(0, 2**30, ())))
    model = build_model(_model_cfg("bert", hidden=40, ffn=88), MonarchConfig(nblocks=nblocks), "fp32")
    layers = [m for m in model.modules() if isinstance(m, (MonarchColumnParallelLinear, MonarchRowParallelLinear))]
    assert len(layers) == 8
    for layer in layers:
        x = torch.randn(5, layer.input_size, dtype=torch.float64)
        k, _, p = layer.blkdiag1.shape
        padded = torch.nn.functional.pad(x, (0, k * p - layer.input_size))  # zero-padded input
        ref = monarch_multiply_torch(padded, layer.blkdiag1.double(), layer.blkdiag2.double(),
                                     layer.output_permutation)[:, : layer.output_size]
        w = local_dense_weight(layer)
        assert w.shape == (layer.output_size, layer.input_size)
        torch.testing.assert_close(x @ w.T, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_converted_dense_model_gives_the_monarch_loss(kind: str) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    seed_everything(int(torch.randint(0, 2**30, (), generator=gen)))
    mcfg = _model_cfg(kind)
    monarch = build_model(mcfg, MonarchConfig(layers=("fc1", "fc2", "qkv", "proj"), nblocks=4), "fp32").eval()
    dense = build_model(mcfg, None, "fp32").eval()
    dense.load_state_dict(dense_state_dict_from_monarch(monarch), strict=True)
    batch = _batch(kind, gen)
    with torch.no_grad():
        loss_m, metrics_m = forward_step(monarch, batch, kind)
        loss_d, metrics_d = forward_step(dense, batch, kind)
    assert float(loss_d) == pytest.approx(float(loss_m), rel=1e-5)
    for key in metrics_m:
        assert float(metrics_d[key]) == pytest.approx(float(metrics_m[key]), rel=1e-5)


def test_converted_state_dict_loads_into_stock_megatron_local_spec_models() -> None:
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from monarch_megatron.models import transformer_config

    for kind in ("bert", "gpt"):
        mcfg = _model_cfg(kind)
        state = dense_state_dict_from_monarch(build_model(mcfg, MonarchConfig(nblocks=4), "fp32"))
        config = transformer_config(mcfg, "fp32")
        if kind == "bert":
            stock = BertModel(config=config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec,
                              vocab_size=mcfg.padded_vocab_size, max_sequence_length=32, add_binary_head=True,
                              share_embeddings_and_output_weights=True)
        else:
            stock = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                             vocab_size=mcfg.padded_vocab_size, max_sequence_length=32,
                             share_embeddings_and_output_weights=True)
        result = stock.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
