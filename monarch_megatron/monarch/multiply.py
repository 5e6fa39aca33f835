"""The Monarch multiply ``x -> x @ M^T`` for ``M = P L P^T R`` given as two block-diagonal factors:
the public entry point, which checks and pads its arguments and hands them to the dispatcher.

Semantics (fixed; ../shared/DESIGN.md): with ``w1: (k, q, p)`` and ``w2: (l, s, r)``, for one row x

    u[i] = w1[i] @ x[i*p:(i+1)*p]          i < k
    v    = u.reshape(r, l).T                (l, r)
    y[j] = w2[j] @ v[j]                     j < l
    out  = y.T.reshape(s*l)  if output_permutation  else  y.reshape(l*s)

Which implementation runs is decided in one place, :func:`.backends.resolve_backend`, from a
:class:`.options.MonarchOptions`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import resolve_backend, run_backend
from .options import MonarchOptions, default_options
from .shapes import check_factors


def _call_options(options: MonarchOptions | None, backend: str | None) -> MonarchOptions:
    """The options of one call: ``options``, or ``MonarchOptions(backend=backend)`` for the
    shorthand, or the run's :func:`.options.default_options`."""
    if backend is not None:
        if options is not None:
            raise TypeError("pass the backend inside options, not both options and backend")
        return MonarchOptions(backend=backend)
    if options is None:
        return default_options()
    if not isinstance(options, MonarchOptions):
        raise TypeError(f"options must be a MonarchOptions or None, got {type(options).__name__}")
    return options


def monarch_multiply(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    output_permutation: bool = True,
    options: MonarchOptions | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Multiply ``x`` by the Monarch matrix given by factors ``w1`` and ``w2``.

    Args:
        x: ``(..., n)`` input with ``n <= k*p``; it is zero-padded to ``k*p`` when shorter.
        w1: ``(k, q, p)`` first block-diagonal factor (``R``).
        w2: ``(l, s, r)`` second block-diagonal factor (``L``), ``l*r == k*q``.
        output_permutation: ``True`` for the paper's order ``M = P L P^T R``; ``False`` for
            block-major output (``y.reshape(l*s)``).
        options: backend, CUDA-graph hint and kernel knobs; ``None``: the run's defaults
            (``MonarchOptions()`` with the ``MONARCH_MULTIPLY_BACKEND`` override, read once).
        backend: shorthand for ``options=MonarchOptions(backend=backend)``.

    Returns:
        ``(..., l*s)`` output, differentiable with respect to ``x``, ``w1`` and ``w2``.
    """
    check_factors(w1, w2)
    padded_in = w1.shape[0] * w1.shape[2]
    if x.shape[-1] > padded_in:
        raise ValueError(
            f"x has {x.shape[-1]} features but the factors take at most k*p={padded_in} "
            f"(w1 shape {tuple(w1.shape)})"
        )
    if x.shape[-1] < padded_in:
        x = F.pad(x, (0, padded_in - x.shape[-1]))
    if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(
            f"dtypes differ: x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype} (cast them, or use autocast)"
        )
    options = _call_options(options, backend)
    path = resolve_backend(options, x, w1, w2, output_permutation)
    return run_backend(path, x, w1, w2, output_permutation, options.kernel)
