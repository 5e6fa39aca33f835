"""Correctness of the Triton Monarch paths (the fused kernel, and the TMA kernels with cuBLAS for
the plain products) under the Triton interpreter (CPU).

The kernels run in a subprocess with ``TRITON_INTERPRET=1``: Triton decides between compiled and
interpreted kernels when a kernel module is imported, and other tests in the same pytest process
may already have imported it without the interpreter. The subprocess draws fresh random inputs,
runs forward and backward through ``monarch_multiply_triton`` and through an independent float64
reference written here (explicit loops over blocks, not the library's torch path), and reports the
relative errors ``||got - ref|| / ||ref||`` of the output and of every gradient.

Tolerances: fp32 inputs use IEEE fp32 dots (errors ~1e-7; bound 1e-5); bf16 inputs and a bf16
intermediate give errors of a few 1e-3 (bound 2e-2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (w1 shape (k, q, p), w2 shape (l, s, r)); l*r == k*q.
SHAPES = {
    "tp_local_rect": ((4, 8, 16), (4, 32, 8)),  # TP-local shard of a 4x-wide layer, q/l = 2
    "square_batched_kernel": ((4, 16, 16), (4, 16, 16)),  # paper order uses the batched-dot kernel
    "wide_out": ((2, 16, 16), (2, 48, 16)),  # l = 2, s not a power of two
    "narrow_out": ((4, 16, 32), (4, 16, 16)),  # 4x narrower output (w1 q < p)
    "l_not_dividing_q": ((2, 6, 5), (4, 7, 3)),  # q % l != 0: natural layout, stride-l gather
}
# Shapes of the TMA path (chunks q/l of >= 16 channels, rows of >= 16 elements).
TMA_SHAPES = {
    "tma_4x_wide": ((4, 64, 16), (4, 32, 64)),  # q/l = 16, dw1 tile of every chunk
    "tma_l2_wide_out": ((2, 32, 32), (2, 48, 32)),  # l = 2, s not a power of two
    "tma_narrow_out": ((4, 128, 32), (4, 16, 128)),  # q/l = 32, two dw1 channel tiles
    "tma_k2_l4": ((2, 64, 16), (4, 16, 32)),  # k != l
}
BOUND = {"float32": 1e-5, "bfloat16": 2e-2}
CASES = ([("fused", name, perm, dtype) for name in SHAPES for perm in (True, False) for dtype in BOUND]
         + [("tma", name, perm, dtype) for name in TMA_SHAPES for perm in (True, False) for dtype in BOUND])


def reference_monarch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, perm: bool) -> torch.Tensor:
    """Float64 Monarch multiply straight from the definition (../shared/DESIGN.md), row by block.

    x: (n, k*p), w1: (k, q, p), w2: (l, s, r) -> (n, l*s).
    """
    k, q, p = w1.shape
    l, s, r = w2.shape
    n = x.shape[0]
    u = torch.cat([x[:, i * p:(i + 1) * p] @ w1[i].T for i in range(k)], dim=1)  # (n, k*q)
    v = u.reshape(n, r, l)  # v[:, t, j] = u[:, t*l + j]
    y = torch.stack([v[:, :, j] @ w2[j].T for j in range(l)], dim=1)  # (n, l, s)
    return y.transpose(1, 2).reshape(n, s * l) if perm else y.reshape(n, l * s)


def _worker() -> None:
    """Run every case (interpreted kernels) and print one JSON line of relative errors."""
    sys.path.insert(0, REPO)
    from monarch_megatron.monarch import triton_monarch as tm
    from monarch_megatron.monarch import triton_monarch_tma as tma

    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs each run
    results = {}
    for idx, (path, name, perm, dtype) in enumerate(CASES):
        (k, q, p), (l, s, r) = (SHAPES if path == "fused" else TMA_SHAPES)[name]
        # Every other case (the fp32 ones) splits the weight-gradient reductions over two token
        # ranges, so that the in-kernel sum of the split partials (last program per tile) is tested.
        tm._SPLIT_OVERRIDE = 2 if idx % 2 == 0 else 0
        tm._PLANS.clear()
        n = 20  # two token tiles of 16, the second partial
        x = torch.randn(2, n // 2, k * p, dtype=torch.float64)  # leading batch dims
        w1 = torch.randn(k, q, p, dtype=torch.float64) / p ** 0.5
        w2 = torch.randn(l, s, r, dtype=torch.float64) / r ** 0.5
        dy = torch.randn(2, n // 2, l * s, dtype=torch.float64)
        ref_in = [t.clone().requires_grad_() for t in (x, w1, w2)]
        ref = reference_monarch(ref_in[0].reshape(n, k * p), ref_in[1], ref_in[2], perm)
        ref.backward(dy.reshape(n, l * s))
        dt = getattr(torch, dtype)
        ins = [t.to(dt).detach().requires_grad_() for t in (x, w1, w2)]
        # The dispatcher (backend="triton") must pick the path named by the case.
        assert tma.supports(ins[0], ins[1], ins[2]) == (path == "tma"), (path, name)
        out = tm.monarch_multiply_triton(*ins, perm)
        out.backward(dy.to(dt))
        pairs = [(out.reshape(n, l * s), ref)] + [(a.grad, b.grad) for a, b in zip(ins, ref_in)]
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in pairs]
        results[f"{path}|{name}|{perm}|{dtype}"] = {"shape": list(out.shape), "dtype": str(out.dtype),
                                             "errs": errs}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("path,name,perm,dtype", CASES)
def test_triton_forward_and_all_gradients_match_float64_reference(interpreted_results, path, name, perm, dtype):
    res = interpreted_results[f"{path}|{name}|{perm}|{dtype}"]
    (k, q, p), (l, s, r) = (SHAPES if path == "fused" else TMA_SHAPES)[name]
    assert res["shape"] == [2, 10, l * s]
    assert res["dtype"] == f"torch.{dtype}"
    for what, err in zip(("out", "dx", "dw1", "dw2"), res["errs"]):
        assert err == err and err < BOUND[dtype], f"{what}: relative error {err:.2e} (bound {BOUND[dtype]})"


def test_triton_path_under_autocast_casts_like_a_matmul():
    """Under CPU autocast (bf16) the fp32 operands are cast to bf16, as ``torch.matmul`` would."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    code = (
        "import torch\n"
        "from monarch_megatron.monarch.triton_monarch import monarch_multiply_triton\n"
        "x = torch.randn(20, 64, requires_grad=True); w1 = torch.randn(4, 16, 16, requires_grad=True)\n"
        "w2 = torch.randn(4, 16, 16, requires_grad=True)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    y = monarch_multiply_triton(x, w1, w2, True)\n"
        "y.float().sum().backward()\n"
        "print('DT', y.dtype, x.grad.dtype, w1.grad.dtype, w2.grad.dtype)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DT torch.bfloat16 torch.float32 torch.float32 torch.float32" in proc.stdout


def test_prefers_triton_is_false_on_cpu():
    from monarch_megatron.monarch.triton_monarch import prefers_triton

    x = torch.randn(8, 64)
    assert not prefers_triton(x, torch.randn(4, 16, 16), torch.randn(4, 16, 16))


@pytest.mark.parametrize("n_in,n_out,nblocks,tokens,expected", [
    (4096, 16384, 4, 16384, True),  # GPU-bound: 2.1 TFLOP per fwd+bwd, measured 2.8x dense eager
    (4096, 16384, 4, 4096, False),  # same layer, too little work per call: host-bound
    (1024, 4096, 4, 16384, False),  # 0.13 TFLOP: host-bound on the measured machine
    (768, 3072, 4, 1 << 20, False),  # chunks of 48: the TMA tiles lose to the torch path
])
def test_auto_takes_the_tma_path_only_for_gpu_bound_calls_with_full_tiles(n_in, n_out, nblocks, tokens, expected):
    from monarch_megatron.monarch.shapes import monarch_factor_shapes
    from monarch_megatron.monarch.triton_monarch import tma_pays_off

    sh = monarch_factor_shapes(n_in, n_out, nblocks)
    assert tma_pays_off(tokens, sh.w1_shape, sh.w2_shape) is expected


def test_tma_path_is_refused_off_hopper_and_for_unsupported_shapes():
    from monarch_megatron.monarch.triton_monarch_tma import supports

    w1, w2 = torch.randn(4, 64, 16), torch.randn(4, 32, 64)
    assert not supports(torch.randn(8, 64, dtype=torch.bfloat16), w1, w2)  # CPU tensor, not interpreted
    assert not supports(torch.randn(8, 64), w1, w2, torch.float32)


def test_backend_environment_variable_overrides_auto_and_rejects_unknown_names(monkeypatch):
    from monarch_megatron.monarch.multiply import BACKEND_ENV, resolve_backend

    x, w1, w2 = torch.randn(8, 64), torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("auto", x, w1, w2) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend("auto", x, w1, w2)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
