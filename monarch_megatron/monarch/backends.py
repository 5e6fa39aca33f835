"""The one place that decides which path runs a Monarch multiply, and runs it.

Paths (each a module that knows nothing of this one):

- ``"torch"``: :mod:`.torch_path`, two batched cuBLAS products and permutation copies; any device.
- ``"tma"``: :mod:`.triton_monarch_tma`, TMA Triton kernels for the three products that touch the
  permuted intermediate and cuBLAS for the plain ones; Hopper, bf16/fp16 (:func:`supports`).
- ``"fused"``: :mod:`.experimental.fused`, the experimental fused Triton kernel; any CUDA GPU.

``MonarchOptions.backend`` names one of them, or ``"triton"`` (``"tma"`` where it applies, else
``"fused"``), or ``"auto"``, whose rule comes from the measurements of benchmarks/RESULTS.md
("Issue 7, v5"; H100, bf16, 16384 tokens):

- CPU, the Triton interpreter, GPUs without TMA, fp32, complex dtypes or shapes the TMA path
  refuses: ``"torch"``.
- Hopper, bf16/fp16, :func:`supports` and the shape rule of :func:`tma_pays_off` (power-of-two
  chunks ``q/l``, blocks ``p`` a multiple of 64): in GPU time the TMA path beat or tied the torch
  path at every such shape, nblocks 2, 4 and 8, both output orders. So under CUDA graphs
  (``graphed=True``: host launch cost is free) it is ``"tma"``. Run eagerly it also costs more host
  time per call (three Triton launches with TMA descriptors: 0.75-1.4 ms per fwd+bwd on the measured
  host against 0.55-1.0 ms for the torch path), so it is ``"tma"`` only where the call is GPU-bound,
  at ``GPU_BOUND_FLOPS`` of fwd+bwd work or more, and ``"torch"`` below.
- ``"fused"`` never: on an H100 it lost to the torch path at every measured shape.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .options import KernelOptions, MonarchOptions
from .torch_path import monarch_multiply_torch

# Per-call fwd+bwd work above which a Monarch layer is GPU-bound on the measured H100 machine
# (>= ~1.5 ms of GPU time against ~0.6-1.4 ms of host time to issue it; benchmarks/RESULTS.md).
GPU_BOUND_FLOPS = 1.0e12


def tma_pays_off(tokens: int, w1_shape: tuple, w2_shape: tuple, graphed: bool = False) -> bool:
    """The shape part of the ``"auto"`` rule for the TMA path: power-of-two chunks ``q/l``, blocks
    ``p`` that are multiples of 64 and, unless ``graphed``, at least ``GPU_BOUND_FLOPS`` of fwd+bwd
    work for ``tokens`` rows. ``w1_shape``: ``(k, q, p)``; ``w2_shape``: ``(l, s, r)``."""
    k, q, p = w1_shape
    l, s, r = w2_shape
    ch = q // l
    if not (ch > 0 and ch & (ch - 1) == 0 and p % 64 == 0):
        return False
    return graphed or 6.0 * tokens * (k * q * p + l * s * r) >= GPU_BOUND_FLOPS


@functools.lru_cache(maxsize=None)
def _tma_module():
    """:mod:`.triton_monarch_tma`, or ``None`` where Triton is not importable. Imported on first
    need only: Triton fixes compiled vs interpreted kernels when a kernel module is imported."""
    try:
        from . import triton_monarch_tma
    except ImportError:
        return None
    return triton_monarch_tma


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's where it is on (the operands are cast to it)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def supports(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the TMA path can run these operands (``x: (..., k*p)``, ``w1: (k, q, p)``,
    ``w2: (l, s, r)``) in their compute dtype: :func:`.triton_monarch_tma.supports`; ``False``
    where Triton is not importable."""
    tma = _tma_module()
    return tma is not None and tma.supports(x, w1, w2, _compute_dtype(x))


def resolve_backend(options: MonarchOptions, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    output_permutation: bool | None = None) -> str:
    """The concrete path (``"torch"``, ``"tma"`` or ``"fused"``) that ``options`` selects for these
    operands: ``x: (..., k*p)`` (already padded), ``w1: (k, q, p)``, ``w2: (l, s, r)``. The rule
    (module docstring) does not depend on ``output_permutation``; it is taken so that a rule that
    does can be added without changing callers.

    Raises ``RuntimeError`` for a Triton path where Triton is not importable and ``ValueError`` for
    ``backend="tma"`` on operands the TMA path cannot run, or for a Triton path (``"tma"``,
    ``"fused"``, ``"triton"``) on complex operands (only the torch path takes them; ``"auto"`` picks it).
    """
    backend = options.backend
    if backend == "torch" or (backend == "auto" and x.is_complex()):
        return "torch"
    if x.is_complex():
        raise ValueError(f"backend={backend!r} does not support complex dtype {x.dtype} (the Triton kernels are "
                         "real-valued); use backend='torch' or 'auto', which run complex Monarch matrices")
    if backend == "auto":
        if not x.is_cuda:  # before any Triton import: a CPU run never loads the kernels
            return "torch"
        tma = _tma_module()
        if tma is None or tma.INTERPRET:
            return "torch"
        k, _, p = w1.shape
        return ("tma" if tma.supports(x, w1, w2, _compute_dtype(x))
                and tma_pays_off(x.numel() // (k * p), w1.shape, w2.shape, options.graphed) else "torch")
    if _tma_module() is None:
        raise RuntimeError(f"backend={backend!r} needs the triton package, which is not importable")
    if backend == "fused":
        return "fused"
    if supports(x, w1, w2):
        return "tma"
    if backend == "triton":
        return "fused"
    raise ValueError(
        f"backend='tma' cannot run these operands (x {tuple(x.shape)} {_compute_dtype(x)} on {x.device}, "
        f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}): it needs a Hopper GPU (or the Triton interpreter), "
        "bf16/fp16, l a power of two <= 16 dividing q, chunks q/l and p multiples of 16, s of 8; "
        "backend='triton' falls back to the fused kernel, 'torch' runs anywhere"
    )


@functools.lru_cache(maxsize=None)
def _triton_path(path: str) -> Callable:
    if path == "tma":
        from .triton_monarch_tma import monarch_multiply_tma

        return monarch_multiply_tma
    if path == "fused":
        from .experimental.fused import monarch_multiply_fused

        return monarch_multiply_fused
    raise ValueError(f"path must be 'torch', 'tma' or 'fused', got {path!r}")


def run_backend(path: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool,
                kernel: KernelOptions = KernelOptions()) -> torch.Tensor:
    """Run the concrete ``path`` (from :func:`resolve_backend`): ``x: (..., k*p)`` (already padded),
    ``w1: (k, q, p)``, ``w2: (l, s, r)`` -> ``(..., l*s)`` in the (autocast) compute dtype, with
    autograd. ``kernel``: the Triton paths' knobs (the torch path has none)."""
    if path == "torch":
        return monarch_multiply_torch(x, w1, w2, output_permutation)
    multiply = _triton_path(path)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Cast as autocast casts a matmul's operands; the kernels themselves ignore autocast.
        dt = torch.get_autocast_dtype(dev)
        x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
        with torch.autocast(dev, enabled=False):
            return multiply(x, w1, w2, output_permutation, kernel)
    return multiply(x, w1, w2, output_permutation, kernel)
