"""Tensor-parallel sharding of one global Monarch matrix into per-rank factor pairs, and back.

Semantics (../shared/DESIGN.md, "Monarch semantics"): with ``w1: (k, q, p)`` and ``w2: (l, s, r)``
the intermediate channel ``f = i*q + c`` (row ``c`` of first-stage block ``i``) feeds second-stage
block ``f % l`` at slot ``f // l``. Every shard is itself a Monarch factor pair:

* ``"column"`` (input replicated, block-major output sharded): rank ``t0`` owns second-stage blocks
  ``J = [t0*l/t, (t0+1)*l/t)``. With ``q = a*l`` the rows of block ``i`` feeding them are
  ``c = a'*l + j`` for ``a' < a``, ``j`` in ``J``, i.e. ``w1.view(k, a, l, p)[:, :, J]``, a strided
  ``1/t`` of the rows of *every* first-stage block. Taken in increasing ``f``, local channel
  ``f' = a'' * l/t + j'`` goes to local block ``f' % (l/t) = j - t0*l/t`` at slot ``f' // (l/t)``, the
  same slot as globally, so ``w2_r = w2[J]`` whole. Then
  ``monarch_multiply(x, w1_r, w2_r, output_permutation=False)`` is the rank's contiguous slice of the
  global block-major output. Needs ``l % t == 0`` and ``q % l == 0`` (if ``l`` does not divide ``q``
  the first-stage blocks feed unequal numbers of a rank's channels and no factor pair exists).
* ``"row"`` (input sharded contiguously, outputs summed): rank ``t0`` owns first-stage blocks
  ``I = [t0*k/t, (t0+1)*k/t)``, whose channels ``f`` form the contiguous range
  ``[t0*k*q/t, (t0+1)*k*q/t)``; they reach slots ``m = f // l`` in ``[t0*r/t, (t0+1)*r/t)`` of every
  second-stage block, so ``w2_r = w2[:, :, t0*r/t:(t0+1)*r/t]`` with all ``l`` blocks and the local
  permutation ``f' % l`` equals the global one. The sum over ranks of
  ``monarch_multiply(x_r, w1_r, w2_r, output_permutation=True)`` is the full paper-order output.
  Needs ``k % t == 0`` and ``r % t == 0``.

A block-diagonal factor ``w: (b, s, p)`` (:mod:`monarch_megatron.monarch.blockdiag`) shards the same
way in both styles: block ``j`` reads input block ``j`` and writes output block ``j``, so a rank that
owns the contiguous output blocks ``J = [t0*b/t, (t0+1)*b/t)`` (column: its contiguous output slice)
or the contiguous input blocks ``J`` (row: its contiguous input slice) holds ``w[J]``, and the rank's
product touches nothing else. Column: the rank reads input blocks ``J`` of the replicated input;
row: the rank writes output blocks ``J`` of its partial output and zeros elsewhere, which megatron's
all-reduce sums into the full output. Needs ``b % t == 0``.
"""

from __future__ import annotations

import torch

from ..monarch import check_factors

STYLES = ("column", "row")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got style={style!r}")


def check_monarch_split(
    w1_shape: tuple[int, int, int],
    w2_shape: tuple[int, int, int],
    tp_size: int,
    style: str,
    layer: str = "",
) -> None:
    """Raise a ``ValueError`` unless factors of these shapes shard over ``tp_size`` ranks in ``style``.

    Args:
        w1_shape: ``(k, q, p)``.
        w2_shape: ``(l, s, r)``.
        tp_size: number of tensor-parallel ranks.
        style: ``"column"`` or ``"row"``.
        layer: optional description of the layer (e.g. ``"in_features=768, out_features=3072"``)
            added to the error message.
    """
    _check_style(style)
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got tp_size={tp_size!r}")
    k, q, _ = w1_shape
    l, _, r = w2_shape
    if style == "column":
        ok = l % tp_size == 0 and (tp_size == 1 or q % l == 0)
        need = f"l % tp_size == 0 and q % l == 0 (l={l} second-stage blocks, q={q})"
    else:
        ok = k % tp_size == 0 and r % tp_size == 0
        need = f"k % tp_size == 0 and r % tp_size == 0 (k={k} first-stage blocks, r={r})"
    if not ok:
        where = f" {layer}" if layer else ""
        raise ValueError(
            f"cannot shard Monarch layer{where} with nblocks={max(k, l)} (w1 {tuple(w1_shape)}, "
            f"w2 {tuple(w2_shape)}) {style}-parallel over tp_size={tp_size}: needs {need}"
        )


def split_monarch(
    w1: torch.Tensor, w2: torch.Tensor, tp_size: int, style: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split global factors ``w1: (k, q, p)``, ``w2: (l, s, r)`` into ``tp_size`` factor pairs.

    Returns:
        ``[(w1_r, w2_r) for r in range(tp_size)]``, new contiguous tensors. ``"column"``:
        ``w1_r: (k, q/t, p)``, ``w2_r: (l/t, s, r)``. ``"row"``: ``w1_r: (k/t, q, p)``,
        ``w2_r: (l, s, r/t)``. See the module docstring for what each shard computes.

    Raises:
        ValueError: the layout does not divide (message names tp_size, nblocks and the shapes).
    """
    check_factors(w1, w2)
    check_monarch_split(tuple(w1.shape), tuple(w2.shape), tp_size, style)
    k, q, p = w1.shape
    l, s, r = w2.shape
    if tp_size == 1:
        return [(w1.detach().clone(), w2.detach().clone())]
    shards = []
    if style == "column":
        lt = l // tp_size
        w1_4d = w1.detach().reshape(k, q // l, l, p)
        for rank in range(tp_size):
            blocks = slice(rank * lt, (rank + 1) * lt)
            w1_r = w1_4d[:, :, blocks, :].reshape(k, (q // l) * lt, p).clone()
            shards.append((w1_r, w2.detach()[blocks].clone()))
    else:
        kt, rt = k // tp_size, r // tp_size
        for rank in range(tp_size):
            w1_r = w1.detach()[rank * kt : (rank + 1) * kt].clone()
            w2_r = w2.detach()[:, :, rank * rt : (rank + 1) * rt].clone()
            shards.append((w1_r, w2_r))
    return shards


def merge_monarch(
    shards: list[tuple[torch.Tensor, torch.Tensor]] | tuple[tuple[torch.Tensor, torch.Tensor], ...],
    style: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`split_monarch`: the global ``(w1, w2)`` from the per-rank factor pairs.

    Args:
        shards: ``[(w1_r, w2_r)]`` in rank order, all of the same shapes.
        style: the style they were split with.

    Returns:
        ``(w1: (k, q, p), w2: (l, s, r))``, exactly the tensors ``split_monarch`` was given.
    """
    _check_style(style)
    if len(shards) == 0:
        raise ValueError("merge_monarch needs at least one shard")
    for w1_r, w2_r in shards:
        check_factors(w1_r, w2_r)
        if w1_r.shape != shards[0][0].shape or w2_r.shape != shards[0][1].shape:
            raise ValueError(
                "shards differ in shape: "
                f"{[(tuple(a.shape), tuple(b.shape)) for a, b in shards]}"
            )
    t = len(shards)
    if t == 1:
        return shards[0][0].detach().clone(), shards[0][1].detach().clone()
    w1s = [w1_r.detach() for w1_r, _ in shards]
    w2s = [w2_r.detach() for _, w2_r in shards]
    if style == "column":
        k, q_r, p = w1s[0].shape
        lt = w2s[0].shape[0]
        if q_r % lt != 0:
            raise ValueError(
                f"column shards with w1 {tuple(w1s[0].shape)}, w2 {tuple(w2s[0].shape)} did not "
                f"come from split_monarch: q/t={q_r} is not a multiple of l/t={lt}"
            )
        a = q_r // lt
        w1 = torch.cat([w.reshape(k, a, lt, p) for w in w1s], dim=2).reshape(k, a * lt * t, p)
        return w1, torch.cat(w2s, dim=0)
    return torch.cat(w1s, dim=0), torch.cat(w2s, dim=2)


def check_blockdiag_split(w_shape: tuple[int, int, int], tp_size: int, style: str, layer: str = "") -> None:
    """Raise a ``ValueError`` unless a block-diagonal factor ``w: (b, s, p)`` shards over ``tp_size``
    ranks (``b % tp_size == 0``; the same in both styles, module docstring)."""
    _check_style(style)
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got tp_size={tp_size!r}")
    if w_shape[0] % tp_size:
        where = f" {layer}" if layer else ""
        raise ValueError(f"cannot shard block-diagonal layer{where} with nblocks={w_shape[0]} (w {tuple(w_shape)}) "
                         f"{style}-parallel over tp_size={tp_size}: nblocks must be a multiple of tp_size")


def split_blockdiag(w: torch.Tensor, tp_size: int, style: str) -> list[torch.Tensor]:
    """The ``tp_size`` shards ``w[J]`` (``(b/t, s, p)``, new contiguous tensors) of a global
    block-diagonal factor ``w: (b, s, p)``, for either style (module docstring)."""
    check_blockdiag_split(tuple(w.shape), tp_size, style)
    return [part.clone() for part in w.detach().chunk(tp_size, dim=0)]


def merge_blockdiag(shards: list[torch.Tensor] | tuple[torch.Tensor, ...], style: str) -> torch.Tensor:
    """Inverse of :func:`split_blockdiag`: the global ``w: (b, s, p)`` from the per-rank shards."""
    _check_style(style)
    if len(shards) == 0 or any(w.dim() != 3 or w.shape != shards[0].shape for w in shards):
        raise ValueError(f"block-diagonal shards must be 3-D and of one shape, got {[tuple(w.shape) for w in shards]}")
    return torch.cat([w.detach() for w in shards], dim=0)
