"""Monarch matrices in plain torch: multiply, dense conversion, optimal projection, init, layer.

No megatron-core or DeepSpeed imports here (../shared/DESIGN.md, "Layers of the code").

Modules: :mod:`.multiply` (the public multiply), :mod:`.options` (what a caller can ask of it),
:mod:`.backends` (the one place that picks and runs a path), the paths :mod:`.torch_path`,
:mod:`.triton_monarch_tma` (Hopper) and :mod:`.experimental.fused`, their shared pieces
:mod:`.stages` (cuBLAS second stage) and :mod:`.triton_common`; :mod:`.dense`, :mod:`.init`,
:mod:`.linear`, :mod:`.shapes`. :mod:`.blockdiag`: the block-diagonal sibling layer (one factor,
one batched GEMM per product, exact dense conversion, optimal projection).
"""

from .backends import resolve_backend
from .blockdiag import (
    BlockdiagShape,
    blockdiag_multiply,
    blockdiag_shape,
    blockdiag_to_dense,
    init_blockdiag_,
    project_to_blockdiag,
)
from .dense import monarch_to_dense, project_to_monarch
from .init import init_monarch_
from .linear import BlockdiagLinear, MonarchLinear
from .multiply import monarch_multiply
from .options import BACKEND_ENV, BACKENDS, KernelOptions, MonarchOptions
from .shapes import MonarchShape, check_factors, monarch_factor_shapes
from .torch_path import monarch_multiply_torch

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "BlockdiagLinear",
    "BlockdiagShape",
    "KernelOptions",
    "MonarchLinear",
    "MonarchOptions",
    "MonarchShape",
    "blockdiag_multiply",
    "blockdiag_shape",
    "blockdiag_to_dense",
    "check_factors",
    "init_blockdiag_",
    "init_monarch_",
    "monarch_factor_shapes",
    "monarch_multiply",
    "monarch_multiply_torch",
    "monarch_to_dense",
    "project_to_blockdiag",
    "project_to_monarch",
    "resolve_backend",
]
