"""Monarch column/row-parallel linears at TP=2 (gloo, 2 processes) against a single-device
MonarchLinear in float64 holding the merged weights: forward and all gradients, fp32 layers,
relative error < 1e-5; TP-invariant initialisation; parameter attributes; layout errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from monarch_megatron.monarch import MonarchLinear
from monarch_megatron.parallel import (
    MonarchColumnParallelLinear,
    MonarchRowParallelLinear,
    init_tensor_parallel,
    merge_monarch,
    spawn,
    split_monarch,
)

TOL = 1e-5
TP = 2
SEQ, BATCH = 6, 3

# name: (style, in, out, nblocks, extra constructor kwargs, sequence_parallel)
CASES = {
    "fc1": ("column", 32, 128, 4, {}, False),
    "qkv_bias_inside": ("column", 32, 96, 4, {"skip_bias_add": False}, False),
    "column_gather_output": ("column", 64, 64, 8, {"gather_output": True, "skip_bias_add": False}, False),
    "column_padded_input": ("column", 7, 16, 2, {}, False),
    "column_no_bias": ("column", 32, 64, 4, {"bias": False}, False),
    "fc2": ("row", 128, 32, 4, {}, False),
    "row_scatter_input": ("row", 64, 64, 8, {"input_is_parallel": False, "skip_bias_add": False}, False),
    "row_padded_output": ("row", 32, 22, 4, {}, False),
    "fc1_sequence_parallel": ("column", 32, 128, 4, {}, True),
    "fc2_sequence_parallel": ("row", 128, 32, 4, {}, True),
}


def _build(style, n_in, n_out, nblocks, kwargs, sequence_parallel):
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=tp,
        use_cpu_initialization=True, sequence_parallel=sequence_parallel and tp > 1,
    )
    kw = dict(config=config, init_method=config.init_method, bias=True, skip_bias_add=True, nblocks=nblocks)
    if style == "column":
        kw.update(gather_output=False)
        kw.update(kwargs)
        return MonarchColumnParallelLinear(n_in, n_out, **kw)
    kw.update(input_is_parallel=True, init_method=config.output_layer_init_method)
    kw.update(kwargs)
    return MonarchRowParallelLinear(n_in, n_out, **kw)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _check_case(rank: int, name: str) -> dict[str, float]:
    style, n_in, n_out, nblocks, kwargs, sp = CASES[name]
    torch.manual_seed(100)
    layer = _build(style, n_in, n_out, nblocks, kwargs, sp)
    w1, w2 = merge_monarch(list(zip(_gather(layer.blkdiag1.data), _gather(layer.blkdiag2.data))), style)
    has_bias = layer.bias is not None
    if has_bias:
        bias = torch.cat(_gather(layer.bias.data)) if style == "column" else layer.bias.data
    ref = MonarchLinear(n_in, n_out, nblocks, bias=has_bias, output_permutation=(style == "row"), dtype=torch.float64)
    with torch.no_grad():
        ref.blkdiag1.copy_(w1)
        ref.blkdiag2.copy_(w2)
        if has_bias:
            ref.bias.copy_(bias)

    # Fresh inputs and output cotangent, identical on all ranks (same generator seed).
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SEQ, BATCH, n_in, generator=g, dtype=torch.float64)
    dy = torch.randn(SEQ, BATCH, n_out, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref.bias.normal_(generator=g) if has_bias else None
        if has_bias:  # a non-zero bias, so that its handling is checked
            layer.bias.copy_(ref.bias.chunk(TP)[rank] if style == "column" else ref.bias)
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    (y_ref * dy).sum().backward()

    skip_bias_add = kwargs.get("skip_bias_add", True)
    if style == "column":
        x_in = x.chunk(TP, dim=0)[rank] if sp else x
    else:
        x_in = x if kwargs.get("input_is_parallel", True) is False else x.chunk(TP, dim=-1)[rank]
    x_loc = x_in.float().clone().requires_grad_(True)
    out, out_bias = layer(x_loc)
    if skip_bias_add and has_bias:
        assert out_bias is layer.bias
        out = out + out_bias
    else:
        assert out_bias is None
    # The slice of the global output this rank holds.
    if style == "column":
        gathered = kwargs.get("gather_output", False)
        y_exp = y_ref if gathered else y_ref.chunk(TP, dim=-1)[rank]
        dy_loc = dy if gathered else dy.chunk(TP, dim=-1)[rank]
    else:
        y_exp = y_ref.chunk(TP, dim=0)[rank] if sp else y_ref
        dy_loc = dy.chunk(TP, dim=0)[rank] if sp else dy
    errs = {"forward": _rel(out, y_exp)}
    (out * dy_loc.float()).sum().backward()

    g1, g2 = split_monarch(ref.blkdiag1.grad, ref.blkdiag2.grad, TP, style)[rank]
    errs["grad_blkdiag1"] = _rel(layer.blkdiag1.grad, g1)
    errs["grad_blkdiag2"] = _rel(layer.blkdiag2.grad, g2)
    if has_bias:
        gb = ref.bias.grad.chunk(TP)[rank] if style == "column" else ref.bias.grad
        got = layer.bias.grad
        if sp and style == "row":
            # Under sequence parallelism each rank sees its sequence shard; megatron sums the grads
            # of parameters marked `sequence_parallel` over the TP group (finalize_model_grads).
            assert layer.bias.sequence_parallel is True
            got = got.clone()
            dist.all_reduce(got)
        errs["grad_bias"] = _rel(got, gb)
    if style == "column":
        dx_exp = xr.grad.chunk(TP, dim=0)[rank] if sp else xr.grad
    else:
        dx_exp = xr.grad if kwargs.get("input_is_parallel", True) is False else xr.grad.chunk(TP, dim=-1)[rank]
    errs["grad_input"] = _rel(x_loc.grad, dx_exp)

    # Attributes megatron / DeepSpeed read.
    for p in (layer.blkdiag1, layer.blkdiag2):
        assert p.tensor_model_parallel is True and hasattr(p, "partition_dim") and hasattr(p, "partition_stride")
    return errs


def _worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    init_tensor_parallel(TP)
    results = {name: _check_case(rank, name) for name in CASES}

    # Global init is TP-invariant: merge of the TP=2 shards == the TP=1 layer for the same seed.
    merged = {}
    for name in ("fc1", "fc2"):
        style, n_in, n_out, nblocks, kwargs, sp = CASES[name]
        torch.manual_seed(5)
        layer = _build(style, n_in, n_out, nblocks, kwargs, sp)
        merged[name] = merge_monarch(list(zip(_gather(layer.blkdiag1.data), _gather(layer.blkdiag2.data))), style)
    layer = _build("column", 32, 128, 4, {}, False)
    sd = layer.sharded_state_dict(prefix="fc1.", metadata={"dp_cp_group": parallel_state.get_data_parallel_group()})
    sharded = {k: (tuple(v.global_shape), tuple(v.global_offset)) for k, v in sd.items() if hasattr(v, "global_shape")}

    # A layout that does not divide over TP=2: column needs q % nblocks == 0 (here q=4, nblocks=16).
    try:
        _build("column", 64, 64, 16, {}, False)
        layout_error = None
    except ValueError as e:
        layout_error = str(e)

    init_tensor_parallel(1)
    invariant = {}
    for name in ("fc1", "fc2"):
        style, n_in, n_out, nblocks, kwargs, sp = CASES[name]
        torch.manual_seed(5)
        layer = _build(style, n_in, n_out, nblocks, kwargs, sp)
        w1, w2 = merged[name]
        invariant[name] = bool(torch.equal(layer.blkdiag1.data, w1) and torch.equal(layer.blkdiag2.data, w2))
    return {"errs": results, "invariant": invariant, "layout_error": layout_error, "sharded": sharded}


@pytest.fixture(scope="module")
def tp2_results() -> list[dict]:
    return spawn(_worker, TP)


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_layer_matches_merged_single_device_monarch_linear(tp2_results, name):
    for rank, res in enumerate(tp2_results):
        for what, err in res["errs"][name].items():
            assert err < TOL, f"{name} rank {rank} {what}: rel err {err:.2e} >= {TOL}"


def test_global_init_is_the_same_at_tp1_and_tp2(tp2_results):
    for res in tp2_results:
        assert res["invariant"] == {"fc1": True, "fc2": True}


def test_non_dividing_layout_raises_with_tp_size_nblocks_and_shape(tp2_results):
    msg = tp2_results[0]["layout_error"]
    assert msg is not None
    assert "tp_size=2" in msg and "nblocks=16" in msg and "in_features=64" in msg and "out_features=64" in msg


def test_sharded_state_dict_shards_global_factors(tp2_results):
    # fc1 32 -> 128, nblocks 4: w1 (4, 8, 8) stored as (k, q/l, l, p) = (4, 2, 4, 8) split on axis 2.
    for rank, res in enumerate(tp2_results):
        sh = res["sharded"]
        assert sh["fc1.blkdiag1"] == ((4, 2, 4, 8), (0, 0, 2 * rank, 0))
        assert sh["fc1.blkdiag2"] == ((4, 32, 8), (2 * rank, 0, 0))
        assert sh["fc1.bias"] == ((128,), (64 * rank,))
