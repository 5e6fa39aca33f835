"""Block-diagonal layer kind, plain torch (CPU): multiply and gradients, dense conversion, optimal
projection, BlockdiagLinear, TP split/merge and the kind records.

The references below are written from the semantics in monarch_megatron/monarch/blockdiag.py's
docstring (``y[j*s:(j+1)*s] = w[j] @ x[j*p:(j+1)*p]`` on the zero-padded input, output cut to
``out``) with explicit loops over blocks in float64, independently of the batched implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from monarch_megatron.monarch import (
    BlockdiagLinear,
    blockdiag_multiply,
    blockdiag_shape,
    blockdiag_to_dense,
    project_to_blockdiag,
)
from monarch_megatron.parallel import KINDS, PARALLEL_LINEARS, layer_kind, merge_blockdiag, split_blockdiag

# (in_features, out_features): square, 4x, 1/4x, non-divisible both ways.
SHAPES = [(32, 32), (16, 64), (64, 16), (30, 50), (50, 30)]
NBLOCKS = [1, 2, 4, 8]
F64_TOL = 1e-12


def reference_blockdiag(x: torch.Tensor, w: torch.Tensor, n_out: int, in_block: int = 0, in_blocks: int | None = None,
                        out_block: int = 0, out_blocks: int | None = None) -> torch.Tensor:
    """Block by block, row by row, float64: w[i] reads input block in_block + i, writes output block
    out_block + i; other output blocks are zero; output cut to n_out."""
    b, s, p = w.shape
    in_blocks = b if in_blocks is None else in_blocks
    out_blocks = b if out_blocks is None else out_blocks
    x = x.double()
    xp = torch.zeros(*x.shape[:-1], in_blocks * p, dtype=torch.float64)
    xp[..., : x.shape[-1]] = x
    rows = []
    for row in xp.reshape(-1, in_blocks * p):
        y = torch.zeros(out_blocks * s, dtype=torch.float64)
        for i in range(b):
            j_in, j_out = in_block + i, out_block + i
            y[j_out * s:(j_out + 1) * s] = w[i].double() @ row[j_in * p:(j_in + 1) * p]
        rows.append(y[:n_out])
    return torch.stack(rows).reshape(*x.shape[:-1], n_out)


def reference_dense(w: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """The (n_out, n_in) matrix with block j at rows j*s.., columns j*p.., zero elsewhere."""
    b, s, p = w.shape
    full = torch.zeros(b * s, b * p, dtype=w.dtype)
    for j in range(b):
        full[j * s:(j + 1) * s, j * p:(j + 1) * p] = w[j]
    return full[:n_out, :n_in]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def random_w(n_in: int, n_out: int, b: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(blockdiag_shape(n_in, n_out, b).w_shape, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("nblocks", NBLOCKS)
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_forward_and_gradients_match_float64_reference(n_in, n_out, nblocks):
    w = random_w(n_in, n_out, nblocks, requires_grad=True)
    x = torch.randn(3, 5, n_in, dtype=torch.float64, requires_grad=True)  # two leading batch dims
    dy = torch.randn(3, 5, n_out, dtype=torch.float64)
    out = blockdiag_multiply(x, w)[..., :n_out]
    gx, gw = torch.autograd.grad((out * dy).sum(), (x, w))
    w_ref = w.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_blockdiag(x_ref, w_ref, n_out)
    rx, rw = torch.autograd.grad((ref * dy).sum(), (x_ref, w_ref))
    assert rel_err(out, ref) < F64_TOL
    assert rel_err(gx, rx) < F64_TOL and rel_err(gw, rw) < F64_TOL


@pytest.mark.parametrize("blocks", [dict(in_blocks=4, in_block=2), dict(out_blocks=4, out_block=1),
                                    dict(in_blocks=3, in_block=1, out_blocks=5, out_block=3)])
def test_block_range_forward_and_gradients_match_reference(blocks):
    """The rank's view of a TP-sharded layer: w[i] on input block in_block + i, output block out_block + i."""
    w = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    n_in = blocks.get("in_blocks", 2) * 5 - 1  # one padded input feature
    n_out = blocks.get("out_blocks", 2) * 3
    x = torch.randn(4, n_in, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, n_out, dtype=torch.float64)
    out = blockdiag_multiply(x, w, **blocks)
    ref = reference_blockdiag(x, w, n_out, **blocks)
    assert rel_err(out, ref) < F64_TOL
    got = torch.autograd.grad((out * dy).sum(), (x, w))
    want = torch.autograd.grad((ref * dy).sum(), (x, w))
    assert all(rel_err(a, b) < F64_TOL for a, b in zip(got, want))
    assert torch.autograd.gradcheck(lambda a, c: blockdiag_multiply(a, c, **blocks), (x, w))


def test_multiply_writes_into_its_output_layout_without_copies():
    """One bmm per product on views: the forward's output and the input gradient are the buffers the
    products wrote (out= into (n, b, s) / (n, b, p)), not copies of them."""
    w = torch.randn(4, 8, 6, requires_grad=True)
    x = torch.randn(10, 24, requires_grad=True)
    y = blockdiag_multiply(x, w)
    assert y.is_contiguous() and y.shape == (10, 32) and y._base is not None and y._base.shape == (10, 4, 8)
    y.backward(torch.ones_like(y))
    assert x.grad.shape == (10, 24) and w.grad.shape == (4, 8, 6)


@pytest.mark.parametrize("nblocks", NBLOCKS)
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_to_dense_is_exact(n_in, n_out, nblocks):
    w = random_w(n_in, n_out, nblocks)
    dense = blockdiag_to_dense(w, n_in, n_out)
    assert dense.shape == (n_out, n_in)
    assert torch.equal(dense, reference_dense(w, n_in, n_out))  # bitwise: each entry is one entry of w
    layer = BlockdiagLinear(n_in, n_out, nblocks, bias=False, dtype=torch.float64)
    x = torch.randn(7, n_in, dtype=torch.float64)
    assert rel_err(x @ layer.to_dense().t(), layer(x)) < F64_TOL


@pytest.mark.parametrize("nblocks", NBLOCKS)
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_projection_keeps_the_diagonal_blocks_and_is_exact_on_blockdiag_inputs(n_in, n_out, nblocks):
    target = torch.randn(n_out, n_in, dtype=torch.float64)
    w = project_to_blockdiag(target, nblocks)
    b, s, p = w.shape
    for j in range(b):  # the blocks as the docstring says, padded entries zero
        block = torch.zeros(s, p, dtype=torch.float64)
        rows, cols = target[j * s:(j + 1) * s, j * p:(j + 1) * p].shape
        block[:rows, :cols] = target[j * s:(j + 1) * s, j * p:(j + 1) * p]
        assert torch.equal(w[j], block)
    exact = reference_dense(random_w(n_in, n_out, nblocks), n_in, n_out)
    assert torch.equal(blockdiag_to_dense(project_to_blockdiag(exact, nblocks), n_in, n_out), exact)


@pytest.mark.parametrize("n_in,n_out,nblocks", [(32, 32, 4), (16, 64, 4), (50, 30, 4), (64, 64, 8)])
def test_projection_is_optimal(n_in, n_out, nblocks):
    """The error is the norm of the off-diagonal blocks, and no perturbation within the subspace of
    block-diagonal matrices (random, any step size) lowers it."""
    target = torch.randn(n_out, n_in, dtype=torch.float64)
    w = project_to_blockdiag(target, nblocks)
    err = (blockdiag_to_dense(w, n_in, n_out) - target).pow(2).sum().item()
    off = target.clone()
    off[reference_dense(torch.ones_like(w), n_in, n_out) != 0] = 0
    assert err == pytest.approx(off.pow(2).sum().item(), rel=1e-12)
    for step in (1.0, 1e-1, 1e-3):
        for _ in range(4):
            moved = blockdiag_to_dense(w + step * torch.randn_like(w), n_in, n_out)
            assert (moved - target).pow(2).sum().item() >= err


def test_blockdiag_linear_state_dict_from_dense_and_bias():
    a = BlockdiagLinear(30, 50, 4)
    assert set(a.state_dict()) == {"blkdiag", "bias"} and a.blkdiag.shape == (4, 13, 8)
    b = BlockdiagLinear.from_dense(a.to_dense(), a.bias.detach(), nblocks=4)
    x = torch.randn(6, 30)
    # The same matrix (padded entries, which act on nothing, come out zero).
    assert torch.equal(a.to_dense(), b.to_dense()) and rel_err(b(x), a(x)) < 1e-6
    with pytest.raises(ValueError, match="nblocks=9"):
        BlockdiagLinear(16, 8, 9)
    with pytest.raises(ValueError, match="features"):
        blockdiag_multiply(torch.randn(2, 20), torch.randn(4, 4, 4))


def test_init_matches_dense_output_variance():
    torch.manual_seed(1234)
    layer = BlockdiagLinear(1024, 4096, 4, bias=False)
    x = torch.randn(512, 1024)
    with torch.no_grad():
        var = layer(x).var().item()
    assert var == pytest.approx(1024 / (3 * 1024), rel=0.15)  # nn.Linear's default: 1 / (3 * in) per weight


def test_bf16_autocast_keeps_bf16():
    layer = BlockdiagLinear(64, 128, 4)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and rel_err(out, layer(x)) < 2e-2


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("style", ["column", "row"])
def test_split_merge_round_trip_and_rank_products(tp, style):
    """Each shard, run as the rank runs it, gives the rank's part of the global product."""
    w = random_w(32, 48, 4)
    shards = split_blockdiag(w, tp, style)
    assert torch.equal(merge_blockdiag(shards, style), w)
    x = torch.randn(5, 32, dtype=torch.float64)
    full = reference_blockdiag(x, w, 48)
    bt = 4 // tp
    for rank, w_r in enumerate(shards):
        if style == "column":  # replicated input, the rank's contiguous output slice
            out = blockdiag_multiply(x, w_r, in_blocks=4, in_block=rank * bt)
            assert rel_err(out, full[:, rank * 48 // tp:(rank + 1) * 48 // tp]) < F64_TOL
        else:  # the rank's input slice, a partial sum of the full output
            part = blockdiag_multiply(x[:, rank * 32 // tp:(rank + 1) * 32 // tp], w_r, out_blocks=4, out_block=rank * bt)
            mask = torch.zeros(48, dtype=torch.bool)
            mask[rank * bt * 12:(rank + 1) * bt * 12] = True
            assert rel_err(part[:, mask], full[:, mask]) < F64_TOL and not part[:, ~mask].any()
    with pytest.raises(ValueError, match="nblocks=4.*tp_size=8"):
        split_blockdiag(w, 8, style)


def test_kind_records_agree_with_the_layers():
    """One record per kind, one TP class per (kind, style); shapes, parameter counts, dense matrix and
    projection of the blockdiag record are the module functions'."""
    assert set(KINDS) == set(PARALLEL_LINEARS) == {"monarch", "blockdiag"}
    for name, kind in KINDS.items():
        for style, cls in PARALLEL_LINEARS[name].items():
            assert cls.kind is kind and cls.style == style
    kind = layer_kind("blockdiag")
    assert kind.shapes(1024, 4096, 4) == ((4, 1024, 256),) and kind.num_params(1024, 4096, 4) == 1024 * 4096 // 4
    assert layer_kind("monarch").num_params(1024, 4096, 4) == 4 * 256 * 256 + 4 * 1024 * 256
    target = torch.randn(12, 20, dtype=torch.float64)
    (w,) = kind.project(target, 4, "row")
    assert torch.equal(kind.dense((w,), 20, 12, "row"), blockdiag_to_dense(w, 20, 12))
    with pytest.raises(ValueError, match="unknown layer kind 'butterfly'"):
        layer_kind("butterfly")
    assert math.isclose(kind.num_params(1024, 4096, 4) / (1024 * 4096), 0.25)


def test_flops_and_parameter_counts_count_the_blocks():
    """A block-diagonal MLP costs 1/nblocks of the dense MLP's weights and linear FLOPs (BERT-large)."""
    from monarch_megatron.models.config import MonarchConfig
    from monarch_megatron.training.config import ModelSection
    from monarch_megatron.training.flops import count_parameters, train_flops_per_sequence

    m = ModelSection(kind="bert", num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096)
    mlp = MonarchConfig(layers=("fc1", "fc2"), nblocks=4, kind="blockdiag")
    saved = 24 * 2 * 1024 * 4096 * 3 // 4  # per model: fc1 + fc2, 3/4 of each dense matrix
    dense, sparse = count_parameters(m, 32768, None), count_parameters(m, 32768, mlp)
    assert dense["total"] - sparse["total"] == saved and sparse["monarch"] == 24 * 2 * 1024 * 4096 // 4
    assert sparse["dense_equivalent"] == dense["total"]
    seq = 128
    assert train_flops_per_sequence(m, 32768, None, seq) - train_flops_per_sequence(m, 32768, mlp, seq) == 3 * 2 * seq * saved
