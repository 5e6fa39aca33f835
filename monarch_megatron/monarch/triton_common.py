"""Helpers shared by the Triton Monarch paths (:mod:`.triton_monarch_tma` and
:mod:`.experimental.fused`): interpreter detection, tile arithmetic, the dot both paths use, and
the split weight-gradient reduction (its kernel epilogue, workspace and split count).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides between compiled and interpreted kernels when a kernel module is imported, so
# this is read once, at import, like Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2_dividing(x: int, cap: int) -> int:
    """Largest power of two ``<= cap`` dividing ``x`` (1 if ``x`` is odd)."""
    v = 1
    while v * 2 <= cap and x % (v * 2) == 0:
        v *= 2
    return v


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; ``IEEE``: fp32 without tf32, also the interpreter's
    path (its half-precision dot is wrong)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tile_coords(tile, G, n_nt):
    """(group, column tile, token tile) of a persistent tile index, group fastest."""
    return tile % G, (tile // G) % n_nt, tile // (G * n_nt)


@triton.jit
def reduce_store(acc, d_ptr, d_off, d_mask, loc, ws_ptr, cnt_ptr, tile, sp, n_wtiles, n_split,
                 TS: tl.constexpr, SPLIT1: tl.constexpr):
    """Write ``acc`` (this program's split) into ``D``: directly when there is one split, else through
    the fp32 workspace; the last program to finish the tile sums all partials in split order
    (deterministic), writes ``D`` in its dtype and resets the tile's counter."""
    if SPLIT1:
        tl.store(d_ptr + d_off, acc.to(d_ptr.dtype.element_ty), mask=d_mask)
    else:
        tl.store(ws_ptr + (sp * n_wtiles + tile).to(tl.int64) * TS + loc, acc)
        tl.debug_barrier()  # every thread's partial is issued before the (releasing) count
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            tot = tl.zeros_like(acc)
            for s2 in range(0, n_split):
                tot += tl.load(ws_ptr + (s2 * n_wtiles + tile).to(tl.int64) * TS + loc, cache_modifier=".cg")
            tl.store(d_ptr + d_off, tot.to(d_ptr.dtype.element_ty), mask=d_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


def token_splits(n: int, tiles: int, step: int, forced: int = 0) -> tuple[int, int]:
    """``(splits, tokens_per_split)`` of a weight-gradient reduction over ``n`` tokens into ``tiles``
    output tiles: enough programs to fill the GPU (about two waves of 132 SMs), each reducing
    >= 1024 tokens; ``tokens_per_split`` a multiple of ``step`` (the kernel's token tile).
    ``forced > 0`` fixes the number of splits (:attr:`.options.KernelOptions.weight_grad_splits`)."""
    splits = forced or (1 if INTERPRET else max(1, min(264 // tiles, triton.cdiv(n, 1024))))
    tokens_per_split = triton.cdiv(triton.cdiv(n, splits), step) * step
    return triton.cdiv(n, tokens_per_split), tokens_per_split


_WORKSPACES: dict = {}


def split_workspace(device: torch.device, ws_numel: int, n_cnt: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(ws, cnt, stream)`` for :func:`reduce_store`: an fp32 workspace of >= ``ws_numel`` split
    partials and >= ``n_cnt`` int32 per-tile counters (zero between launches: the last program of a
    tile resets its counter), kept per device and stream so that launches on one stream reuse
    them; plus the raw stream handle for direct launches."""
    if INTERPRET:
        stream = 0
    else:
        stream = triton.runtime.driver.active.get_current_stream(device.index)
    key = (device, stream)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < ws_numel or cnt.numel() < n_cnt:
        ws = torch.empty(max(ws_numel, 1 if ws is None else ws.numel()), device=device, dtype=torch.float32)
        cnt = torch.zeros(max(n_cnt, 4096), device=device, dtype=torch.int32)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt, stream
