"""Monarch core: multiply, dense conversion, projection, init, MonarchLinear (CPU, plain torch).

The reference below is written from ../shared/DESIGN.md's semantics with explicit loops in float64,
independently of the library's batched-matmul implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from monarch_megatron.monarch import (
    MonarchLinear,
    MonarchOptions,
    monarch_factor_shapes,
    monarch_multiply,
    monarch_to_dense,
    project_to_monarch,
)

TORCH = MonarchOptions(backend="torch")
# (in_features, out_features): square, 4x, 1/4x, non-divisible.
SHAPES = [(32, 32), (16, 64), (64, 16), (30, 50), (50, 30)]
NBLOCKS = [1, 2, 4, 8]
F64_TOL = 1e-12  # relative error bound for float64 paths


def reference_monarch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool) -> torch.Tensor:
    """Row-by-row, block-by-block evaluation of DESIGN.md's definition, float64."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    x = x.double()
    x = torch.nn.functional.pad(x, (0, k * p - x.shape[-1]))
    outs = []
    for row in x.reshape(-1, k * p):
        u = torch.cat([w1[i].double() @ row[i * p:(i + 1) * p] for i in range(k)])  # (k*q,)
        v = u.reshape(r, l).t()  # (l, r)
        y = torch.stack([w2[j].double() @ v[j] for j in range(l)])  # (l, s)
        outs.append(y.t().reshape(s * l) if output_permutation else y.reshape(l * s))
    return torch.stack(outs).reshape(*x.shape[:-1], l * s)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def random_factors(in_f: int, out_f: int, b: int, dtype=torch.float64, requires_grad=False):
    shp = monarch_factor_shapes(in_f, out_f, b)
    w1 = torch.randn(shp.w1_shape, dtype=dtype, requires_grad=requires_grad)
    w2 = torch.randn(shp.w2_shape, dtype=dtype, requires_grad=requires_grad)
    return w1, w2


@pytest.mark.parametrize("output_permutation", [True, False])
@pytest.mark.parametrize("nblocks", NBLOCKS)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_forward_matches_float64_reference(in_f, out_f, nblocks, output_permutation):
    w1, w2 = random_factors(in_f, out_f, nblocks)
    x = torch.randn(3, 5, in_f, dtype=torch.float64)  # two leading batch dims
    out = monarch_multiply(x, w1, w2, output_permutation, TORCH)
    assert rel_err(out, reference_monarch(x, w1, w2, output_permutation)) < F64_TOL


@pytest.mark.parametrize("output_permutation", [True, False])
@pytest.mark.parametrize("nblocks", NBLOCKS)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_to_dense_equals_forward_on_identity(in_f, out_f, nblocks, output_permutation):
    layer = MonarchLinear(in_f, out_f, nblocks, bias=False, output_permutation=output_permutation, dtype=torch.float64)
    dense = layer.to_dense()
    assert dense.shape == (out_f, in_f)
    expected = layer(torch.eye(in_f, dtype=torch.float64)).t()
    assert rel_err(dense, expected) < F64_TOL
    x = torch.randn(7, in_f, dtype=torch.float64)
    assert rel_err(x @ dense.t(), layer(x)) < F64_TOL


@pytest.mark.parametrize("output_permutation", [True, False])
@pytest.mark.parametrize("in_f,out_f,nblocks", [(12, 20, 2), (20, 12, 4), (9, 13, 3)])
def test_gradcheck_float64(in_f, out_f, nblocks, output_permutation):
    w1, w2 = random_factors(in_f, out_f, nblocks, requires_grad=True)
    x = torch.randn(4, in_f, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: monarch_multiply(a, b, c, output_permutation, TORCH), (x, w1, w2)
    )


@pytest.mark.parametrize("output_permutation", [True, False])
@pytest.mark.parametrize("nblocks", NBLOCKS)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_projection_recovers_exact_monarch_matrices(in_f, out_f, nblocks, output_permutation):
    w1, w2 = random_factors(in_f, out_f, nblocks)
    dense = monarch_to_dense(w1, w2, in_f, out_f, output_permutation)
    p1, p2 = project_to_monarch(dense, nblocks, output_permutation)
    assert p1.shape == w1.shape and p2.shape == w2.shape
    assert rel_err(monarch_to_dense(p1, p2, in_f, out_f, output_permutation), dense) < 1e-10


def projection_error(w1, w2, target, output_permutation):
    out_f, in_f = target.shape
    return (monarch_to_dense(w1, w2, in_f, out_f, output_permutation) - target).pow(2).sum()


@pytest.mark.parametrize("output_permutation", [True, False])
@pytest.mark.parametrize("in_f,out_f,nblocks", [(32, 32, 4), (16, 64, 4), (64, 16, 2), (30, 50, 4), (64, 64, 8)])
def test_projection_is_optimal(in_f, out_f, nblocks, output_permutation):
    """At the projection the error is stationary and no step (gradient or random) lowers it."""
    target = torch.randn(out_f, in_f, dtype=torch.float64)
    w1, w2 = project_to_monarch(target, nblocks, output_permutation)
    w1.requires_grad_(True)
    w2.requires_grad_(True)
    err = projection_error(w1, w2, target, output_permutation)
    g1, g2 = torch.autograd.grad(err, (w1, w2))
    grad_norm = math.sqrt(g1.pow(2).sum().item() + g2.pow(2).sum().item())
    assert grad_norm < 1e-9 * max(1.0, err.item())
    with torch.no_grad():
        for step in (1e-1, 1e-2, 1e-3):
            for _ in range(4):
                d1, d2 = torch.randn_like(w1), torch.randn_like(w2)
                moved = projection_error(w1 + step * d1, w2 + step * d2, target, output_permutation)
                assert moved.item() >= err.item() * (1 - 1e-12)


def test_projection_error_equals_sum_of_discarded_singular_values():
    """Square case nblocks^2 = width: each block pair gets its best rank-1 approximation."""
    n, b = 16, 4
    target = torch.randn(n, n, dtype=torch.float64)
    w1, w2 = project_to_monarch(target, b, True)
    err = projection_error(w1, w2, target, True).item()
    expected = 0.0
    perm_rows = torch.arange(n).view(b, b).t().reshape(-1)  # output a*l + j for block j, slot a
    rows = target[perm_rows].view(b, b, b, b).permute(0, 2, 1, 3)  # (j, i, s, p)
    for j in range(b):
        for i in range(b):
            sv = torch.linalg.svdvals(rows[j, i])
            expected += sv[1:].pow(2).sum().item()
    assert err == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)]
)  # half precision with fp32 accumulation: bf16 has 8 mantissa bits, fp16 has 11
def test_half_precision_within_tolerance_of_fp32(dtype, tol):
    w1, w2 = random_factors(256, 512, 4, dtype=torch.float32)
    x = torch.randn(64, 256)
    ref = monarch_multiply(x, w1, w2)
    out = monarch_multiply(x.to(dtype), w1.to(dtype), w2.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol


def test_bf16_autocast_keeps_bf16():
    """The paper authors' multiply casts to fp16 under bf16 autocast; ours stays bf16."""
    layer = MonarchLinear(64, 128, 4)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, layer(x)) < 2e-2


def test_state_dict_round_trip():
    a = MonarchLinear(30, 50, 4)
    b = MonarchLinear(30, 50, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 30)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"blkdiag1", "blkdiag2", "bias"}


def test_from_dense_reproduces_monarch_layer_with_bias():
    src = MonarchLinear(48, 24, 4, output_permutation=False, dtype=torch.float64)
    dst = MonarchLinear.from_dense(src.to_dense(), src.bias.detach(), nblocks=4, output_permutation=False)
    x = torch.randn(5, 48, dtype=torch.float64)
    assert rel_err(dst(x), src(x)) < 1e-10


@pytest.mark.parametrize("in_f,out_f,nblocks", [(1024, 4096, 4), (4096, 1024, 4), (1000, 1000, 8)])
def test_init_matches_dense_output_variance(in_f, out_f, nblocks):
    torch.manual_seed(1234)
    std = 0.02
    layer = MonarchLinear(in_f, out_f, nblocks, bias=False)
    from monarch_megatron.monarch import init_monarch_

    init_monarch_(layer.blkdiag1, layer.blkdiag2, in_f, std)
    x = torch.randn(512, in_f)
    with torch.no_grad():
        var = layer(x).var().item()
    expected = in_f * std**2  # dense layer with N(0, std^2) weights on unit-variance input
    assert var == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"in_features": 16, "out_features": 16, "nblocks": 0}, "nblocks=0"),
        ({"in_features": 16, "out_features": 8, "nblocks": 9}, "nblocks=9"),
        ({"in_features": 0, "out_features": 8, "nblocks": 2}, "in_features=0"),
        ({"in_features": 16, "out_features": 8, "nblocks": 2.0}, "nblocks=2.0"),
    ],
)
def test_impossible_layer_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MonarchLinear(**kwargs)


def test_non_2d_weight_rejected():
    with pytest.raises(ValueError, match="2-D"):
        project_to_monarch(torch.randn(4, 4, 4), 2)
    with pytest.raises(ValueError, match="2-D"):
        MonarchLinear.from_dense(torch.randn(16), nblocks=2)


def test_mismatched_factor_shapes_rejected():
    with pytest.raises(ValueError, match="do not chain"):
        monarch_multiply(torch.randn(2, 16), torch.randn(4, 4, 4), torch.randn(4, 8, 5))
    with pytest.raises(ValueError, match="features"):
        monarch_multiply(torch.randn(2, 20), torch.randn(4, 4, 4), torch.randn(4, 8, 4))
    with pytest.raises(ValueError, match="backend"):
        monarch_multiply(torch.randn(2, 16), torch.randn(4, 4, 4), torch.randn(4, 8, 4), backend="cuda")
    with pytest.raises(TypeError, match="options"):
        monarch_multiply(torch.randn(2, 16), torch.randn(4, 4, 4), torch.randn(4, 8, 4), True, "torch")


def test_auto_backend_uses_reference_path_on_cpu():
    from monarch_megatron.monarch import resolve_backend

    w1, w2 = random_factors(16, 16, 4, dtype=torch.float32)
    assert resolve_backend(MonarchOptions(), torch.randn(2, 16), w1, w2) == "torch"


def test_backend_shorthand_and_layer_options_run_the_same_multiply():
    """``backend=`` is shorthand for ``options=MonarchOptions(backend=...)``; a layer's options
    reach its multiply and change no result."""
    w1, w2 = random_factors(30, 50, 4)
    x = torch.randn(3, 30, dtype=torch.float64)
    assert torch.equal(monarch_multiply(x, w1, w2, backend="torch"), monarch_multiply(x, w1, w2, True, TORCH))
    with pytest.raises(TypeError, match="not both"):
        monarch_multiply(x, w1, w2, True, TORCH, backend="torch")
    auto = MonarchLinear(30, 50, 4, dtype=torch.float64)
    torch_layer = MonarchLinear(30, 50, 4, dtype=torch.float64, options=TORCH)
    torch_layer.load_state_dict(auto.state_dict())
    assert auto.options is None and torch_layer.options is TORCH
    assert torch.equal(auto(x), torch_layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("ch", [2, 3, 6, 48, 64])
def test_swap_chunk_axes_is_a_transposed_copy(dtype, ch):
    """The torch path's chunked middle permutation (moved as wider words where the run allows):
    bitwise ``t.transpose(1, 2).contiguous()``, same dtype, contiguous (seed 7)."""
    from monarch_megatron.monarch.stages import swap_chunk_axes

    t = (torch.randn(5, 4, 3, ch, generator=torch.Generator().manual_seed(7)) * 100).to(dtype)
    out = swap_chunk_axes(t)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, t.transpose(1, 2).contiguous())
