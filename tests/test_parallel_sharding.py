"""split_monarch / merge_monarch against a float64 reference written from DESIGN.md's semantics."""

from __future__ import annotations

import itertools

import pytest
import torch

from monarch_megatron.monarch import monarch_factor_shapes, monarch_multiply
from monarch_megatron.parallel import merge_monarch, split_monarch

TOL = 1e-12  # float64, relative to the output's max magnitude
SHAPES = [(16, 16), (16, 64), (64, 16), (24, 96), (96, 24), (48, 48), (7, 16), (20, 30), (64, 256)]
NBLOCKS = [1, 2, 4, 8]
TP_SIZES = [1, 2, 4, 8]


def reference_monarch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool) -> torch.Tensor:
    """DESIGN.md's formula, one row at a time: u[i] = w1[i] x_i; v = u.reshape(r, l).T;
    y[j] = w2[j] v[j]; out = y.T.reshape(s*l) or y.reshape(l*s). x: (n, <=k*p) -> (n, l*s)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    x = torch.nn.functional.pad(x, (0, k * p - x.shape[-1]))
    rows = []
    for xr in x:
        u = torch.stack([w1[i] @ xr[i * p : (i + 1) * p] for i in range(k)])  # (k, q)
        v = u.reshape(r, l).T
        y = torch.stack([w2[j] @ v[j] for j in range(l)])  # (l, s)
        rows.append(y.T.reshape(s * l) if output_permutation else y.reshape(l * s))
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def layouts():
    for (n_in, n_out), b, t in itertools.product(SHAPES, NBLOCKS, TP_SIZES):
        if b <= min(n_in, n_out):
            yield n_in, n_out, b, t


def column_divides(k: int, q: int, l: int, t: int) -> bool:
    return l % t == 0 and (t == 1 or q % l == 0)


def row_divides(k: int, r: int, t: int) -> bool:
    return k % t == 0 and r % t == 0


def factors(n_in: int, n_out: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = monarch_factor_shapes(n_in, n_out, b)
    return torch.randn(shape.w1_shape, dtype=torch.float64), torch.randn(shape.w2_shape, dtype=torch.float64)


def test_column_shards_compute_contiguous_slices_of_block_major_output():
    checked = 0
    for n_in, n_out, b, t in layouts():
        w1, w2 = factors(n_in, n_out, b)
        if not column_divides(w1.shape[0], w1.shape[1], w2.shape[0], t):
            continue
        x = torch.randn(3, n_in, dtype=torch.float64)
        full = reference_monarch(x, w1, w2, output_permutation=False)
        shards = split_monarch(w1, w2, t, "column")
        width = full.shape[-1] // t
        for rank, (w1_r, w2_r) in enumerate(shards):
            local = monarch_multiply(x, w1_r, w2_r, output_permutation=False, backend="torch")
            assert rel_err(local, full[:, rank * width : (rank + 1) * width]) < TOL, (n_in, n_out, b, t, rank)
        checked += 1
    assert checked > 40


def test_row_shards_sum_to_paper_order_output():
    checked = 0
    for n_in, n_out, b, t in layouts():
        w1, w2 = factors(n_in, n_out, b)
        k, q, p = w1.shape
        if not row_divides(k, w2.shape[2], t):
            continue
        x = torch.randn(3, k * p, dtype=torch.float64)  # row layers take an unpadded, sharded input
        full = reference_monarch(x, w1, w2, output_permutation=True)
        shards = split_monarch(w1, w2, t, "row")
        width = k * p // t
        total = sum(
            monarch_multiply(x[:, r * width : (r + 1) * width], w1_r, w2_r, output_permutation=True, backend="torch")
            for r, (w1_r, w2_r) in enumerate(shards)
        )
        assert rel_err(total, full) < TOL, (n_in, n_out, b, t)
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("style", ["column", "row"])
def test_merge_inverts_split_exactly(style: str):
    for n_in, n_out, b, t in layouts():
        w1, w2 = factors(n_in, n_out, b)
        k, q, _ = w1.shape
        l, _, r = w2.shape
        ok = column_divides(k, q, l, t) if style == "column" else row_divides(k, r, t)
        if not ok:
            continue
        shards = split_monarch(w1, w2, t, style)
        assert len(shards) == t
        m1, m2 = merge_monarch(shards, style)
        assert torch.equal(m1, w1) and torch.equal(m2, w2), (style, n_in, n_out, b, t)


@pytest.mark.parametrize("style", ["column", "row"])
def test_non_dividing_layout_raises_naming_tp_size_nblocks_and_shape(style: str):
    raised = 0
    for n_in, n_out, b, t in layouts():
        w1, w2 = factors(n_in, n_out, b)
        k, q, _ = w1.shape
        l, _, r = w2.shape
        ok = column_divides(k, q, l, t) if style == "column" else row_divides(k, r, t)
        if ok:
            continue
        with pytest.raises(ValueError) as err:
            split_monarch(w1, w2, t, style)
        msg = str(err.value)
        assert f"tp_size={t}" in msg and f"nblocks={b}" in msg and str(tuple(w1.shape)) in msg, msg
        raised += 1
    assert raised > 10


def test_bad_style_and_tp_size_raise():
    w1, w2 = factors(16, 16, 4)
    with pytest.raises(ValueError, match="style"):
        split_monarch(w1, w2, 2, "diagonal")
    with pytest.raises(ValueError, match="tp_size"):
        split_monarch(w1, w2, 0, "row")
