"""Monarch multiply for Hopper: TMA Triton kernels where the permutation is, cuBLAS for the rest.

Semantics are those of :func:`.torch_path.monarch_multiply_torch` (../shared/DESIGN.md): ``x: (n, k*p)``,
``w1: (k, q, p)``, ``w2: (l, s, r)``, output ``(n, l*s)``. Requires ``q % l == 0``; ``ch = q / l``.

Why this split (benchmarks/KERNEL_NOTES.md, v5). On an H100 the second stage, ``dv`` and ``dw2``
are plain strided batched products that cuBLAS runs at 450-630 TFLOP/s, and a persistent TMA Triton
kernel only matches it. What costs is the middle permutation: the torch path moves the whole
intermediate through two copies (20-25% of its GPU time at 1024->4096). Here the three products that
touch the permuted side run as Triton kernels that read and write it in chunks of ``ch`` contiguous
channels through TMA descriptors, so the intermediate is never copied. The rows of the small factor
``w1`` are put in the order ``(j, m)`` once per forward (:func:`chunk_rows`, ``w1p``):

- stage one writes ``v`` (the second stage's input, ``(n, l, r)``, block ``j`` contiguous) directly:
  first-stage block ``i``'s output channel ``m*l + j`` is ``v[:, j, i*ch + m]``, i.e. column
  ``j*ch + m`` of ``x_i @ w1p[i]^T``; a tile of whole chunks is one box store into ``v`` viewed as
  ``(n, l, k, ch)``;
- ``dx_i = du_i @ w1[i]`` with the reduction taken in the order ``(j, m)``: ``du_i`` is read from
  ``dv`` (the ``v`` layout, one contiguous run per K step) against the rows of ``w1p[i]``;
- ``dw1[i][m*l + j, :] = sum_n dv[n, j, i*ch + m] x_i[n, :]``, split over token ranges and finished
  in the kernel (:func:`.triton_common.reduce_store`), written in ``w1``'s row order.

Both output orders: the paper order permutes ``y`` / ``dy`` with one copy each, as the torch path
(the forward's copy is avoided by an interleaving kernel where ``l == 4`` and ``r <= 256``).
Experiment knobs come in a :class:`.options.KernelOptions`, which keys every cached tile choice.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .options import KernelOptions
from .stages import chunk_rows, second_stage, second_stage_grads
from .triton_common import INTERPRET, dot, pow2_dividing, reduce_store, split_workspace, tile_coords, token_splits

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton without host-side tensor descriptors
    TensorDescriptor = None


@triton.jit
def _stage_one_kernel(x_desc, w_desc, v_desc, N, P, Q, G, CH, BM: tl.constexpr, JB: tl.constexpr,
                      MB: tl.constexpr, BK: tl.constexpr, NUM_SMS: tl.constexpr, IEEE: tl.constexpr):
    """``v[n, j, g*CH + m] = sum_t x[n, g*P + t] * w1p[g, j*CH + m, t]`` (``w1p``: the rows of ``w1`` in
    the order ``(j, m)``), a tile of ``BN = JB*MB`` columns = ``JB`` chunks of ``MB`` channels stored
    as one box; persistent over tiles (group fastest), the tile loop flattened with the K loop so
    loads overlap the previous tile's store."""
    BN: tl.constexpr = JB * MB
    start = tl.program_id(0)
    n_nt = Q // BN
    n_tiles = tl.cdiv(N, BM) * n_nt * G
    tile_c = start - NUM_SMS
    for tile in tl.range(start, n_tiles, NUM_SMS, flatten=True):
        g, nt, mt = tile_coords(tile, G, n_nt)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, P, BK):
            a = x_desc.load([mt * BM, g * P + k0])
            b = w_desc.load([g * Q + nt * BN, k0])
            acc = dot(a, b.T, acc, IEEE)
        tile_c += NUM_SMS
        gc, ntc, mtc = tile_coords(tile_c, G, n_nt)
        c0 = ntc * BN
        v_desc.store([mtc * BM, c0 // CH, gc, c0 % CH], tl.reshape(acc.to(v_desc.dtype), (BM, JB, 1, MB)))


@triton.jit
def _stage_two_paper_kernel(v_desc, w_desc, y_desc, N, S, R, BM: tl.constexpr, BA: tl.constexpr,
                            BK: tl.constexpr, NUM_SMS: tl.constexpr, IEEE: tl.constexpr):
    """Second stage in the paper's output order for ``L = 4``: ``y[n, a*4 + j] = sum_t v[n, j, t] *
    w2[j, a, t]``. A tile computes the four blocks' outputs for ``BA`` columns ``a`` in four
    accumulators and interleaves them on chip (``tl.join``), so ``y`` is written once, contiguously,
    instead of written block-major and copied."""
    start = tl.program_id(0)
    n_at = S // BA
    n_tiles = tl.cdiv(N, BM) * n_at
    tile_c = start - NUM_SMS
    for tile in tl.range(start, n_tiles, NUM_SMS, flatten=True):
        at = tile % n_at
        mt = tile // n_at
        acc0 = tl.zeros((BM, BA), dtype=tl.float32)
        acc1 = tl.zeros((BM, BA), dtype=tl.float32)
        acc2 = tl.zeros((BM, BA), dtype=tl.float32)
        acc3 = tl.zeros((BM, BA), dtype=tl.float32)
        for k0 in range(0, R, BK):
            acc0 = dot(v_desc.load([mt * BM, k0]), w_desc.load([at * BA, k0]).T, acc0, IEEE)
            acc1 = dot(v_desc.load([mt * BM, R + k0]), w_desc.load([S + at * BA, k0]).T, acc1, IEEE)
            acc2 = dot(v_desc.load([mt * BM, 2 * R + k0]), w_desc.load([2 * S + at * BA, k0]).T, acc2, IEEE)
            acc3 = dot(v_desc.load([mt * BM, 3 * R + k0]), w_desc.load([3 * S + at * BA, k0]).T, acc3, IEEE)
        tile_c += NUM_SMS
        # join(join(a0, a2), join(a1, a3))[m, a, i, d] is block 2*i + d: column a*4 + j after reshape.
        out = tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3))
        y_desc.store([(tile_c // n_at) * BM, (tile_c % n_at) * BA * 4],
                     tl.reshape(out, (BM, BA * 4)).to(y_desc.dtype))


@triton.jit
def _dx_kernel(dv_desc, w_desc, dx_desc, N, P, Q, G, L: tl.constexpr, CH, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, NUM_SMS: tl.constexpr, IEEE: tl.constexpr):
    """``dx[n, g*P + t] = sum_{j, m} dv[n, j, g*CH + m] * w1p[g, j*CH + m, t]`` (K in the order j, m;
    ``dv`` read as ``(n, L*G*CH)``: a K tile is one contiguous run inside a chunk)."""
    start = tl.program_id(0)
    n_nt = P // BN
    n_tiles = tl.cdiv(N, BM) * n_nt * G
    tile_c = start - NUM_SMS
    for tile in tl.range(start, n_tiles, NUM_SMS, flatten=True):
        g, nt, mt = tile_coords(tile, G, n_nt)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, L * CH, BK):
            j = k0 // CH
            m0 = k0 % CH
            a = dv_desc.load([mt * BM, (j * G + g) * CH + m0])
            b = w_desc.load([g * Q + k0, nt * BN])
            acc = dot(a, b, acc, IEEE)
        tile_c += NUM_SMS
        gc, ntc, mtc = tile_coords(tile_c, G, n_nt)
        dx_desc.store([mtc * BM, gc * P + ntc * BN], acc.to(dx_desc.dtype))


@triton.jit
def _dw1_kernel(dv_desc, x_desc, d_ptr, ws_ptr, cnt_ptr, N, P, Q, G, L: tl.constexpr, CH, tokens_per_split,
                n_split, BA: tl.constexpr, BT: tl.constexpr, BKN: tl.constexpr, SPLIT1: tl.constexpr,
                TRANS: tl.constexpr, IEEE: tl.constexpr):
    """``dw1[g, m*L + j, t] = sum_n dv[n, j, g*CH + m] * x[n, g*P + t]`` for one (tile, token split);
    a tile is ``BA`` channels ``m`` of one chunk ``j`` by ``BT`` columns ``t``, ``dv`` read as
    ``(n, L*G*CH)`` (2-D boxes: one contiguous run per step). Tiles of one ``x`` block are adjacent,
    so the ``L`` reads of each ``x`` tile mostly hit L2."""
    wid = tl.program_id(0)
    n_at = CH // BA
    n_tt = P // BT
    n_wtiles = G * L * n_at * n_tt
    tile = wid % n_wtiles
    sp = wid // n_wtiles
    tt = tile % n_tt
    at = (tile // n_tt) % n_at
    j = (tile // (n_tt * n_at)) % L
    g = tile // (n_tt * n_at * L)
    n_start = sp * tokens_per_split
    n_end = tl.minimum(n_start + tokens_per_split, N)
    ra = at * BA + tl.arange(0, BA)
    rt = tt * BT + tl.arange(0, BT)
    if TRANS:  # the tile transposed, (BT, BA): the long side of the tile is the MMA's M
        acc = tl.zeros((BT, BA), dtype=tl.float32)
        for n0 in range(n_start, n_end, BKN):
            pt = dv_desc.load([n0, (j * G + g) * CH + at * BA])
            qv = x_desc.load([n0, g * P + tt * BT])
            acc = dot(qv.T, pt, acc, IEEE)
        d_off = (g * Q + ra * L + j).to(tl.int64)[None, :] * P + rt[:, None]
        loc = tl.arange(0, BT)[:, None] * BA + tl.arange(0, BA)[None, :]
        d_mask = (ra < CH)[None, :] & (rt < P)[:, None]
    else:
        acc = tl.zeros((BA, BT), dtype=tl.float32)
        for n0 in range(n_start, n_end, BKN):
            pt = dv_desc.load([n0, (j * G + g) * CH + at * BA])
            qv = x_desc.load([n0, g * P + tt * BT])
            acc = dot(pt.T, qv, acc, IEEE)
        d_off = (g * Q + ra * L + j).to(tl.int64)[:, None] * P + rt[None, :]
        loc = tl.arange(0, BA)[:, None] * BT + tl.arange(0, BT)[None, :]
        d_mask = (ra < CH)[:, None] & (rt < P)[None, :]
    reduce_store(acc, d_ptr, d_off, d_mask, loc, ws_ptr, cnt_ptr, tile, sp, n_wtiles, n_split, BA * BT, SPLIT1)


@functools.lru_cache(maxsize=None)
def _is_hopper_or_newer(device_index: int | None) -> bool:
    """Compute capability >= 9.0 (TMA and wgmma); cached: this sits on every call's dispatch."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def supports(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether these operands can take the TMA path: Hopper or newer (or the interpreter), compute
    dtype (``dtype``, default ``x.dtype``) bf16/fp16 (fp32 only interpreted), ``l`` a power of two
    dividing ``q``, chunks ``q/l`` of >= 16 channels, 16-byte aligned rows.
    ``x: (..., k*p)``, ``w1: (k, q, p)``, ``w2: (l, s, r)``."""
    if TensorDescriptor is None:
        return False
    k, q, p = w1.shape
    l, s, r = w2.shape
    dtype = dtype or x.dtype
    if INTERPRET:
        dtype_ok = dtype in (torch.float32, torch.bfloat16, torch.float16)
    else:
        dtype_ok = x.is_cuda and _is_hopper_or_newer(x.device.index) and dtype in (torch.bfloat16, torch.float16)
    return (dtype_ok and l & (l - 1) == 0 and l <= 16 and q % l == 0 and (q // l) % 16 == 0 and p % 16 == 0
            and s % 8 == 0 and q % 16 == 0)


@functools.lru_cache(maxsize=None)
def _tiles(k: int, q: int, p: int, l: int, kernel: KernelOptions) -> dict:
    """Tiles of ``"s1"``, ``"dx"`` and ``"dw1"`` for ``w1: (k, q, p)`` and ``l`` second-stage
    blocks: the measured choice (:func:`_default_tiles`) with ``kernel.tma_tile_overrides`` applied;
    cached per shape and options, so an override never leaks into another option set's launches."""
    tiles = _default_tiles(k, q, p, l)
    tiles.update(kernel.tma_tile_overrides)
    return tiles


def _default_tiles(k: int, q: int, p: int, l: int) -> dict:
    """Tile sizes per kernel on an H100 (benchmarks/grouped_gemm_probe.py and ``monarch_layer.py
    --tile-sweep``: 128x256x64, 8 warps, 3 stages unless a sweep found better); 16 when interpreted."""
    ch = q // l
    # Stage one: chunks of MB channels (a power of two dividing ch); JB whole chunks per tile when
    # ch itself is a power of two, up to 256 columns (one box store either way).
    mb = pow2_dividing(ch, 16 if INTERPRET else 256)
    jb = min(l, (32 if INTERPRET else 256) // mb) if mb == ch else 1
    if INTERPRET:
        return dict(s1=(16, jb, mb, 16, 1, 1), dx=(16, 16, 16, 1, 1), dw1=(16, 16, 16, 1, 1, ch <= 16))
    if mb == ch <= 64:  # tile sweep (--tile-sweep): 128 columns and K steps of 128 win here
        s1 = (128, min(l, 128 // ch), ch, pow2_dividing(p, 128), 8, 3)
    else:
        s1 = (128, jb, mb, pow2_dividing(p, 64), 8 if jb * mb >= 128 else 4, 3)
    # dx: 128x128 tiles, 4 warps, 4 stages for long rows with short chunks (4096->1024: 0.083 vs 0.090).
    dx = ((128, 128, pow2_dividing(ch, 64), 4, 4) if ch <= 64 and p >= 1024 and p % 128 == 0
          else (128, pow2_dividing(p, 256), pow2_dividing(ch, 64), 8, 3))
    return dict(s1=s1, dx=dx, dw1=_dw1_tiles(ch, p))


@functools.lru_cache(maxsize=None)
def _sm_count() -> int:
    """Programs of the persistent kernels: one per SM (4 when interpreted)."""
    return 4 if INTERPRET else torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _dw1_tiles(ch: int, p: int) -> tuple:
    """``(BA, BT, BKN, warps, stages, TRANS)`` of the dw1 kernel, from the H100 sweep
    (``monarch_layer.py --tile-sweep``): chunks of <= 64 channels take transposed 64x128 tiles
    (1024-wide layers: 0.037 vs 0.064 ms with 64x256), larger chunks 128x256 (4096->16384: 0.211 ms)."""
    if ch <= 64:
        return (pow2_dividing(ch, 64), pow2_dividing(p, 128), 64, 8, 3, True)
    return (pow2_dividing(ch, 128), pow2_dividing(p, 256), 64, 8, 3, False)


def _ieee(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


def stage_one(x2: torch.Tensor, w1p: torch.Tensor, l: int,
              kernel: KernelOptions = KernelOptions()) -> torch.Tensor:
    """``v: (n, l, r)`` (the second stage's input) from ``x2: (n, k*p)`` and ``w1p: (k, q, p)``
    (:func:`chunk_rows` of ``w1``)."""
    k, q, p = w1p.shape
    n, ch = x2.shape[0], q // l
    BM, JB, MB, BK, warps, stages = _tiles(k, q, p, l, kernel)["s1"]
    sms = _sm_count()
    v = x2.new_empty(n, l, k * ch)
    x_desc = TensorDescriptor.from_tensor(x2, [BM, BK])
    w_desc = TensorDescriptor.from_tensor(w1p.view(k * q, p), [JB * MB, BK])
    v_desc = TensorDescriptor(v, [n, l, k, ch], [l * k * ch, k * ch, ch, 1], [BM, JB, 1, MB])
    tiles = triton.cdiv(n, BM) * (q // (JB * MB)) * k
    _stage_one_kernel[(min(sms, tiles),)](x_desc, w_desc, v_desc, n, p, q, k, ch, BM=BM, JB=JB, MB=MB, BK=BK,
                                          NUM_SMS=sms, IEEE=_ieee(x2.dtype), num_warps=warps, num_stages=stages)
    return v


def stage_two_paper(v: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``y: (n, s*4)`` in the paper's order from ``v: (n, 4, r)`` and ``w2: (4, s, r)`` (``l == 4``,
    ``s`` a multiple of 16); the output permutation costs no pass of its own."""
    l, s, r = w2.shape
    n = v.shape[0]
    BA = pow2_dividing(s, 16 if INTERPRET else 64)
    BM, BK, warps, stages = (16, 16, 1, 1) if INTERPRET else (64, pow2_dividing(r, 64), 4, 2)
    sms = _sm_count()
    y = v.new_empty(n, s * l)
    v_desc = TensorDescriptor.from_tensor(v.view(n, l * r), [BM, BK])
    w_desc = TensorDescriptor.from_tensor(w2.view(l * s, r), [BA, BK])
    y_desc = TensorDescriptor.from_tensor(y, [BM, BA * 4])
    tiles = triton.cdiv(n, BM) * (s // BA)
    _stage_two_paper_kernel[(min(sms, tiles),)](v_desc, w_desc, y_desc, n, s, r, BM=BM, BA=BA, BK=BK, NUM_SMS=sms,
                                                IEEE=_ieee(v.dtype), num_warps=warps, num_stages=stages)
    return y


def input_grad(dv: torch.Tensor, w1p: torch.Tensor, kernel: KernelOptions = KernelOptions()) -> torch.Tensor:
    """``dx: (n, k*p)`` from ``dv: (n, l, r)`` (gradient of ``v``) and ``w1p: (k, q, p)``
    (:func:`chunk_rows` of ``w1``)."""
    k, q, p = w1p.shape
    n, l = dv.shape[0], dv.shape[1]
    ch = q // l
    BM, BN, BK, warps, stages = _tiles(k, q, p, l, kernel)["dx"]
    sms = _sm_count()
    dx = dv.new_empty(n, k * p)
    dv_desc = TensorDescriptor.from_tensor(dv.view(n, l * k * ch), [BM, BK])
    w_desc = TensorDescriptor.from_tensor(w1p.view(k * q, p), [BK, BN])
    dx_desc = TensorDescriptor.from_tensor(dx, [BM, BN])
    tiles = triton.cdiv(n, BM) * (p // BN) * k
    _dx_kernel[(min(sms, tiles),)](dv_desc, w_desc, dx_desc, n, p, q, k, L=l, CH=ch, BM=BM, BN=BN, BK=BK,
                                   NUM_SMS=sms, IEEE=_ieee(dv.dtype), num_warps=warps, num_stages=stages)
    return dx


def weight_grad_one(dv: torch.Tensor, x2: torch.Tensor, w1_shape: torch.Size,
                    kernel: KernelOptions = KernelOptions()) -> torch.Tensor:
    """``dw1: (k, q, p)`` from ``dv: (n, l, r)`` and ``x2: (n, k*p)``, reduced over tokens."""
    k, q, p = w1_shape
    n, l = dv.shape[0], dv.shape[1]
    ch = q // l
    if kernel.tma_dw1_cublas:
        # Rows in the order (j, m): one batched product per j (chunk j of every block is a uniform
        # stride ch apart), then the (small) weight gradient is permuted to rows m*l + j.
        dwp = dv.new_empty(k, l, ch, p)
        dvv = dv.view(n, l, k, ch)
        xv = x2.view(n, k, p).transpose(0, 1)
        for j in range(l):
            torch.bmm(dvv[:, j].permute(1, 2, 0), xv, out=dwp[:, j])
        return dwp.transpose(1, 2).reshape(k, q, p)
    BA, BT, BKN, warps, stages, trans = _tiles(k, q, p, l, kernel)["dw1"]
    tiles = k * l * (ch // BA) * (p // BT)
    split, tps = token_splits(n, tiles, BKN, kernel.weight_grad_splits)
    ws, cnt, _ = split_workspace(dv.device, split * tiles * BA * BT if split > 1 else 0, tiles if split > 1 else 0)
    dw1 = dv.new_empty(k, q, p)
    dv_desc = TensorDescriptor.from_tensor(dv.view(n, l * k * ch), [BKN, BA])
    x_desc = TensorDescriptor.from_tensor(x2, [BKN, BT])
    _dw1_kernel[(tiles * split,)](dv_desc, x_desc, dw1, ws, cnt, n, p, q, k, L=l, CH=ch, tokens_per_split=tps,
                                  n_split=split, BA=BA, BT=BT, BKN=BKN, SPLIT1=(split == 1),
                                  TRANS=trans, IEEE=_ieee(dv.dtype), num_warps=warps, num_stages=stages)
    return dw1


class _MonarchTMA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool,
                kernel: KernelOptions):
        w1p = chunk_rows(w1, w2.shape[0])
        v = stage_one(x2, w1p, w2.shape[0], kernel)
        ctx.save_for_backward(x2, w1p, w2, v)
        ctx.output_permutation = output_permutation
        ctx.kernel = kernel
        l, s, r = w2.shape
        # The interleaving kernel wins where the second stage is bound by writing y (r <= 256:
        # 1024->4096 0.62 vs 0.68 ms fwd+bwd) and loses where it is bound by its FLOPs (4096->16384,
        # r = 1024: 5.9 vs 4.6 ms, cuBLAS is faster there): KERNEL_NOTES v5g.
        if output_permutation and kernel.tma_paper_kernel and l == 4 and s % 16 == 0 and r <= 256:
            return stage_two_paper(v, w2)
        return second_stage(v, w2, output_permutation)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, w1p, w2, v = ctx.saved_tensors
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dw2, dv = second_stage_grads(grad_out, v, w2, ctx.output_permutation, need_w2, need_x or need_w1)
        dx = input_grad(dv, w1p, ctx.kernel) if need_x else None
        dw1 = weight_grad_one(dv, x2, w1p.shape, ctx.kernel) if need_w1 else None
        return dx, dw1, dw2, None, None


def monarch_multiply_tma(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool = True,
                         kernel: KernelOptions = KernelOptions()) -> torch.Tensor:
    """Monarch multiply through the TMA kernels and cuBLAS, with autograd (operands of one dtype;
    :func:`supports` must hold). ``x: (..., k*p)``, ``w1: (k, q, p)``, ``w2: (l, s, r)``;
    returns ``(..., l*s)``. ``kernel``: the ``tma_*`` knobs and ``weight_grad_splits``. Real dtypes
    only (complex Monarch matrices run on the torch path)."""
    if x.is_complex():
        raise ValueError(f"the TMA path does not support complex dtype {x.dtype}; use backend='torch'")
    k, _, p = w1.shape
    l, s, _ = w2.shape
    x2 = x.reshape(-1, k * p)
    if x2.stride(1) != 1 or x2.stride(0) != k * p or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    out = _MonarchTMA.apply(x2, w1.contiguous(), w2.contiguous(), bool(output_permutation), kernel)
    return out.view(*x.shape[:-1], l * s)
