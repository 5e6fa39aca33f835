"""Monarch matrices in plain torch: multiply, dense conversion, optimal projection, init, layer.

No megatron-core or DeepSpeed imports here (../shared/DESIGN.md, "Layers of the code").
"""

from .dense import monarch_to_dense, project_to_monarch
from .init import init_monarch_
from .linear import MonarchLinear
from .multiply import BACKENDS, monarch_multiply, monarch_multiply_torch, resolve_backend
from .shapes import MonarchShape, check_factors, monarch_factor_shapes

__all__ = [
    "BACKENDS",
    "MonarchLinear",
    "MonarchShape",
    "check_factors",
    "init_monarch_",
    "monarch_factor_shapes",
    "monarch_multiply",
    "monarch_multiply_torch",
    "monarch_to_dense",
    "project_to_monarch",
    "resolve_backend",
]
