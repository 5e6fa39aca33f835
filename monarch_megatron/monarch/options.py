"""What a caller can ask of a Monarch multiply: the backend, whether it runs under CUDA graphs, and
the kernel knobs of the Triton paths, as frozen (hashable) records.

A record is passed down explicitly to every launch and is part of every launch-plan cache key, so
two option sets never share a cached plan and nothing is switched by assigning module globals.
This module imports nothing from the package: every path can depend on it without a cycle.

The environment variable ``MONARCH_MULTIPLY_BACKEND`` (``auto|torch|triton|tma|fused``) is the
user's whole-run override of ``backend="auto"``. It is read in one place,
:meth:`MonarchOptions.from_env`, when options are built, never inside a multiply call.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# "triton" is the alias kept from before the paths had names of their own: the TMA path where
# it applies (Hopper), else the fused kernel.
BACKENDS = ("auto", "torch", "tma", "fused", "triton")
BACKEND_ENV = "MONARCH_MULTIPLY_BACKEND"
# The TMA path's kernels whose tiles can be overridden: stage one, the input gradient, dw1.
TMA_KERNELS = ("s1", "dx", "dw1")


@dataclass(frozen=True)
class KernelOptions:
    """Knobs of the Triton kernels, for experiments and tests; the defaults are the measured best
    (benchmarks/KERNEL_NOTES.md). Every field enters the launch-plan cache keys."""

    weight_grad_splits: int = 0
    """Token ranges the weight-gradient reductions of both Triton paths are split over; 0: chosen
    from the shape (about two waves of programs). Tests force 2 to exercise the in-kernel sum of
    the split partials at tiny token counts."""

    tma_tile_overrides: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """TMA path: ``(kernel, tiles)`` pairs replacing the tile choice of ``"s1"``
    ``(BM, JB, MB, BK, warps, stages)``, ``"dx"`` ``(BM, BN, BK, warps, stages)`` or ``"dw1"``
    ``(BA, BT, BKN, warps, stages, TRANS)`` (``monarch_layer.py --tile-sweep``). A mapping is
    accepted and stored as sorted pairs."""

    tma_paper_kernel: bool = True
    """TMA path: the paper order's second stage by the interleaving kernel (where ``l == 4`` and
    ``r <= 256``); ``False``: cuBLAS and a copy of ``y``."""

    tma_dw1_cublas: bool = False
    """TMA path: ``dw1`` by ``l`` cuBLAS products and a copy of the gradient instead of the kernel
    (slower at every measured shape: KERNEL_NOTES v5)."""

    fused_direct_launch: bool = True
    """Fused kernel: after its first launch, launch the compiled kernel directly (skips Triton's
    argument binding; no measurable gain on the H100 host: KERNEL_NOTES v4)."""

    fused_merged_launches: bool = True
    """Fused kernel: the two independent products of each backward launch share one launch."""

    fused_dw1_cublas: bool | None = None
    """Fused kernel: ``dw1`` by cuBLAS ``bmm`` (``True``) or the kernel's weight-gradient role
    (``False``); ``None``: ``bmm`` for blocks of >= 2**20 weights, where cuBLAS's reduction is
    faster (KERNEL_NOTES v4, 4e)."""

    def __post_init__(self) -> None:
        if isinstance(self.weight_grad_splits, bool) or not isinstance(self.weight_grad_splits, int) \
                or self.weight_grad_splits < 0:
            raise ValueError(f"weight_grad_splits must be an integer >= 0, got {self.weight_grad_splits!r}")
        pairs: Iterable = self.tma_tile_overrides
        if isinstance(pairs, Mapping):
            pairs = pairs.items()
        normal = tuple(sorted((str(name), tuple(tiles)) for name, tiles in pairs))
        for name, _ in normal:
            if name not in TMA_KERNELS:
                raise ValueError(f"tma_tile_overrides: unknown kernel {name!r}; one of {TMA_KERNELS}")
        # Equal overrides given in another order or as a dict must hash alike (one cached plan).
        object.__setattr__(self, "tma_tile_overrides", normal)


@dataclass(frozen=True)
class MonarchOptions:
    """How a Monarch multiply runs; ``monarch_multiply(..., options)`` and ``MonarchLinear(...,
    options=...)`` take it, and :func:`.backends.resolve_backend` turns it into a concrete path."""

    backend: str = "auto"
    """``"auto"`` (the fastest correct path for the operands: :func:`.backends.resolve_backend`),
    ``"torch"`` (batched cuBLAS products, any device), ``"tma"`` (Hopper: TMA Triton kernels for the
    permuted side, cuBLAS for the plain products), ``"fused"`` (experimental fused Triton kernel,
    any CUDA GPU) or ``"triton"`` (``"tma"`` where it applies, else ``"fused"``)."""

    graphed: bool = False
    """The caller runs under CUDA graphs, so host launch cost is free and ``"auto"`` chooses by GPU
    time alone."""

    kernel: KernelOptions = KernelOptions()
    """Knobs of the Triton kernels (experiments, tests)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got backend={self.backend!r}")
        if not isinstance(self.kernel, KernelOptions):
            raise TypeError(f"kernel must be a KernelOptions, got {type(self.kernel).__name__}")

    @classmethod
    def from_env(cls, base: MonarchOptions | None = None) -> MonarchOptions:
        """``base`` (default ``MonarchOptions()``) with ``MONARCH_MULTIPLY_BACKEND`` applied: when the
        variable is set and ``base.backend`` is ``"auto"``, the variable's backend replaces it (an
        explicit backend in code is kept). The one place the variable is read."""
        base = cls() if base is None else base
        name = os.environ.get(BACKEND_ENV, "")
        if not name:
            return base
        if name not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {name!r}")
        return dataclasses.replace(base, backend=name) if base.backend == "auto" else base


@functools.lru_cache(maxsize=None)
def default_options() -> MonarchOptions:
    """The options of a call that passes none: ``MonarchOptions.from_env()``, read once per process
    (the override is for a whole run; the multiply itself never reads the environment)."""
    return MonarchOptions.from_env()
