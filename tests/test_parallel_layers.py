"""Structured column/row-parallel linears (Monarch and block-diagonal) at TP=2 (gloo, 2 processes)
against a single-device MonarchLinear / BlockdiagLinear in float64 holding the merged weights:
forward, all gradients and the rank's dense weight shard, fp32 layers, relative error < 1e-5;
TP-invariant initialisation; parameter attributes; sharded state dicts; layout errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from monarch_megatron.monarch import BlockdiagLinear, MonarchLinear
from monarch_megatron.parallel import KINDS, PARALLEL_LINEARS, init_tensor_parallel, spawn

TOL = 1e-5
TP = 2
SEQ, BATCH = 6, 3

# name: (style, in, out, nblocks, extra constructor kwargs, sequence_parallel)
LAYOUTS = {
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
# "<kind>/<layout>": (kind, *layout), every layout for both kinds.
CASES = {f"{kind}/{name}": (kind, *layout) for kind in KINDS for name, layout in LAYOUTS.items()}
REFERENCE = {"monarch": MonarchLinear, "blockdiag": BlockdiagLinear}


def _build(kind, style, n_in, n_out, nblocks, kwargs, sequence_parallel):
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
    else:
        kw.update(input_is_parallel=True, init_method=config.output_layer_init_method)
    kw.update(kwargs)
    return PARALLEL_LINEARS[kind][style](n_in, n_out, **kw)


def _merged(layer) -> tuple[torch.Tensor, ...]:
    """The global factors of a TP layer (every rank's shard gathered, merged by its kind)."""
    shards = list(zip(*(_gather(f.data) for f in layer.factors())))
    return layer.kind.merge(shards, layer.style)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _check_case(rank: int, name: str) -> dict[str, float]:
    kind, style, n_in, n_out, nblocks, kwargs, sp = CASES[name]
    torch.manual_seed(100)
    layer = _build(kind, style, n_in, n_out, nblocks, kwargs, sp)
    factors = _merged(layer)
    has_bias = layer.bias is not None
    if has_bias:
        bias = torch.cat(_gather(layer.bias.data)) if style == "column" else layer.bias.data
    extra = {"output_permutation": style == "row"} if kind == "monarch" else {}
    ref = REFERENCE[kind](n_in, n_out, nblocks, bias=has_bias, dtype=torch.float64, **extra)
    with torch.no_grad():
        for name_, factor in zip(layer.kind.factor_names, factors):
            getattr(ref, name_).copy_(factor)
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

    grads = layer.kind.split(tuple(getattr(ref, n).grad for n in layer.kind.factor_names), TP, style)[rank]
    for name_, param, grad in zip(layer.kind.factor_names, layer.factors(), grads):
        errs[f"grad_{name_}"] = _rel(param.grad, grad)
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
    # The in-job switch's conversion: this rank's shard of the exact dense matrix, in megatron's layout.
    dense = ref.to_dense()
    errs["local_dense"] = _rel(layer.local_dense_weight(), dense.chunk(TP, dim=0 if style == "column" else 1)[rank])

    # Attributes megatron / DeepSpeed read.
    for p in layer.factors():
        assert p.tensor_model_parallel is True and hasattr(p, "partition_dim") and hasattr(p, "partition_stride")
    return errs


def _worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    init_tensor_parallel(TP)
    results = {name: _check_case(rank, name) for name in CASES}

    # Global init is TP-invariant: merge of the TP=2 shards == the TP=1 layer for the same seed.
    merged = {}
    for name in INVARIANT:
        torch.manual_seed(5)
        merged[name] = _merged(_build(*CASES[name]))
    meta = {"dp_cp_group": parallel_state.get_data_parallel_group()}
    sharded = {}
    for kind in KINDS:
        for style, (n_in, n_out) in (("column", (32, 128)), ("row", (128, 32))):
            sd = _build(kind, style, n_in, n_out, 4, {}, False).sharded_state_dict(prefix=f"{kind}.{style}.", metadata=meta)
            sharded.update({k: (tuple(v.global_shape), tuple(v.global_offset)) for k, v in sd.items()
                            if hasattr(v, "global_shape")})

    # Layouts that do not divide over TP=2: a Monarch column layer needs q % nblocks == 0 (here q=4,
    # nblocks=16); a block-diagonal one needs whole blocks per rank (nblocks=3).
    layout_errors = {}
    for kind, nblocks in (("monarch", 16), ("blockdiag", 3)):
        try:
            _build(kind, "column", 64, 64 if kind == "monarch" else 66, nblocks, {}, False)
        except ValueError as e:
            layout_errors[kind] = str(e)

    init_tensor_parallel(1)
    invariant = {}
    for name in INVARIANT:
        torch.manual_seed(5)
        layer = _build(*CASES[name])
        invariant[name] = all(torch.equal(p.data, m) for p, m in zip(layer.factors(), merged[name]))
    return {"errs": results, "invariant": invariant, "layout_errors": layout_errors, "sharded": sharded}


INVARIANT = [f"{kind}/{name}" for kind in KINDS for name in ("fc1", "fc2")]


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
        assert res["invariant"] == {name: True for name in INVARIANT}


def test_non_dividing_layout_raises_with_tp_size_nblocks_and_shape(tp2_results):
    errors = tp2_results[0]["layout_errors"]
    assert set(errors) == {"monarch", "blockdiag"}
    msg = errors["monarch"]
    assert "tp_size=2" in msg and "nblocks=16" in msg and "in_features=64" in msg and "out_features=64" in msg
    msg = errors["blockdiag"]
    assert "block-diagonal" in msg and "tp_size=2" in msg and "nblocks=3" in msg and "out_features=66" in msg


def test_sharded_state_dict_shards_global_factors(tp2_results):
    for rank, res in enumerate(tp2_results):
        sh = res["sharded"]
        # Monarch fc1 32 -> 128, nblocks 4: w1 (4, 8, 8) stored as (k, q/l, l, p) = (4, 2, 4, 8) split on axis 2.
        assert sh["monarch.column.blkdiag1"] == ((4, 2, 4, 8), (0, 0, 2 * rank, 0))
        assert sh["monarch.column.blkdiag2"] == ((4, 32, 8), (2 * rank, 0, 0))
        assert sh["monarch.column.bias"] == ((128,), (64 * rank,))
        assert sh["monarch.row.blkdiag1"] == ((4, 8, 32), (2 * rank, 0, 0))
        assert sh["monarch.row.blkdiag2"] == ((4, 8, 8), (0, 0, 4 * rank))
        # Block-diagonal, both styles: whole blocks on axis 0; the column bias on axis 0, the row bias replicated.
        assert sh["blockdiag.column.blkdiag"] == ((4, 32, 8), (2 * rank, 0, 0))
        assert sh["blockdiag.column.bias"] == ((128,), (64 * rank,))
        assert sh["blockdiag.row.blkdiag"] == ((4, 8, 32), (2 * rank, 0, 0))
        assert sh["blockdiag.row.bias"] == ((32,), (0,))
