"""SDPACoreAttention against megatron-core's DotProductAttention (float64 on CPU, rel 1e-10):
padding masks ([b,1,s,s] and [b,1,1,s]), causal, grouped-query attention, gradients; attention
dropout is applied in training only and draws from megatron's tensor-parallel RNG stream."""

from __future__ import annotations

import pytest
import torch

from monarch_megatron.parallel import SDPACoreAttention

TOL = 1e-10
S, B, HEADS, HN = 12, 3, 4, 8


def _pair(mask_type, groups: int = HEADS, dropout: float = 0.0):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HN, num_attention_heads=HEADS,
                               num_query_groups=groups, attention_dropout=dropout,
                               masked_softmax_fusion=False, params_dtype=torch.float64)
    kw = dict(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    return SDPACoreAttention(**kw), DotProductAttention(**kw)


def _qkv(groups: int = HEADS):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(S, B, HEADS, HN, generator=g, dtype=torch.float64)
    k = torch.randn(S, B, groups, HN, generator=g, dtype=torch.float64)
    v = torch.randn(S, B, groups, HN, generator=g, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (q, k, v)]


def _padding():
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, S - 4 :] = False
    real[2, S - 7 :] = False
    return real


def _compare(ours, theirs, mask_ours, mask_theirs, groups=HEADS, rows=None):
    """Forward and q/k/v gradients; ``rows`` [b, s] selects the query rows that must agree."""
    outs = []
    for module, mask in ((ours, mask_ours), (theirs, mask_theirs)):
        q, k, v = _qkv(groups)
        out = module(q, k, v, mask)  # [s, b, h]
        sel = out if rows is None else out * rows.T[..., None]
        sel.square().sum().backward()
        outs.append((sel.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*outs):
        assert ((a - b).abs().max() / b.abs().max()).item() < TOL


def test_padding_mask_b1ss_matches_dot_product_attention(tp1):
    from megatron.core.transformer.enums import AttnMaskType

    real = _padding()
    b1ss = ~(real[:, None, :, None] & real[:, None, None, :])  # BertModel's local layout, True = masked
    ours, theirs = _pair(AttnMaskType.padding)
    # Padding query rows see no key: megatron averages uniformly there; they never reach the loss.
    _compare(ours, theirs, b1ss, b1ss, rows=real)


def test_key_padding_mask_b11s_equals_b1ss_on_real_rows(tp1):
    from megatron.core.transformer.enums import AttnMaskType

    real = _padding()
    b1ss = ~(real[:, None, :, None] & real[:, None, None, :])
    b11s = ~real[:, None, None, :]
    ours, theirs = _pair(AttnMaskType.padding)
    _compare(ours, theirs, b11s, b1ss, rows=real)


def test_causal_matches_dot_product_attention_with_and_without_explicit_mask(tp1):
    from megatron.core.transformer.enums import AttnMaskType

    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)[None, None]
    ours, theirs = _pair(AttnMaskType.causal)
    _compare(ours, theirs, causal, causal)
    _compare(ours, theirs, None, causal)  # ours: SDPA's causal kernel, no mask tensor


def test_grouped_query_attention_matches(tp1):
    from megatron.core.transformer.enums import AttnMaskType

    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)[None, None]
    ours, theirs = _pair(AttnMaskType.causal, groups=2)
    _compare(ours, theirs, None, causal, groups=2)


def test_attention_dropout_in_training_only_on_the_tensor_parallel_rng_stream(tp1):
    from megatron.core.transformer.enums import AttnMaskType

    ours, theirs = _pair(AttnMaskType.causal, dropout=0.5)
    q, k, v = (t.detach() for t in _qkv())
    ours.eval()
    no_dropout, _ = _pair(AttnMaskType.causal, dropout=0.0)
    assert torch.equal(ours(q, k, v, None), no_dropout(q, k, v, None))
    ours.train()
    before = torch.get_rng_state()
    first = ours(q, k, v, None)
    # Drawn under the tracker's fork: the default stream is untouched, the TP stream advances.
    assert torch.equal(torch.get_rng_state(), before)
    second = ours(q, k, v, None)
    assert not torch.allclose(first, no_dropout(q, k, v, None))
    assert not torch.allclose(first, second)
