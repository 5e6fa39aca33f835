"""Triton kernels of the experimental fused Monarch multiply (host side: :mod:`.fused`).

One kernel, :func:`monarch_kernel`, with up to two roles in one launch (programs ``< n_gemm`` take
the first, the rest the second), so that two independent products of the backward share a launch:

- GEMM role: ``C[n, colC(c, g)] = sum_kk A[n, colA(kk, g)] * B[g, brow(kk), brow(c)]`` for each
  group ``g`` (plain), or all ``L`` groups at once for the paper output order (column ``a*L + j``;
  ``GEMM == 2``: interleaved ``A``, ``GEMM == 3``: interleaved ``C``).
- weight-gradient role: ``D[g, drow(a), t] = sum_n P[n, colP(a, g)] * Q[n, colQ(t, g)]``, a reduction
  over tokens split over token ranges; the split partials are summed inside the kernel by the last
  program to finish a tile (a counter per tile, reset by that program), which writes ``D`` in its
  dtype. No zeros, partial-sum or cast launches.

Column addresses of activations: ``col(t, g) = (t // CH) * SCH + g * JS + t % CH`` (compile-time
``CH, SCH, JS``). Row maps of the first factor (its rows in the order ``(j, m)`` that makes the
intermediate ``u'`` contiguous per second-stage block): ``brow(c) = (c % PCH) * PL + c // PCH``
(identity when ``PCH == 0``), so ``w1`` is never copied or permuted in memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_common import dot, reduce_store


@triton.jit
def _cols(t0, rt, g, CH: tl.constexpr, SCH: tl.constexpr, JS: tl.constexpr, FAST: tl.constexpr):
    """Columns of logical indices ``t0 + rt`` of group(s) ``g``; ``FAST``: the tile lies inside one
    16-byte aligned chunk, stated as base + arange so that accesses are 16 bytes wide."""
    if FAST:
        base = tl.multiple_of((t0 // CH) * SCH + t0 % CH, 8)
        return base + g * JS + rt
    else:
        t = t0 + rt
        return (t // CH) * SCH + g * JS + t % CH


@triton.jit
def _brow(t, PCH: tl.constexpr, PL: tl.constexpr):
    """Row of ``w1`` holding permuted row ``t`` (``(t % PCH) * PL + t // PCH``; identity if PCH == 0)."""
    if PCH == 0:
        return t
    else:
        return (t % PCH) * PL + t // PCH


@triton.jit
def _gemm_tile(pid, a_ptr, b_ptr, c_ptr, N, K, NC, G, stride_am, stride_cm, stride_bg, stride_bk, stride_bn,
               A_CH: tl.constexpr, A_SCH: tl.constexpr, A_JS: tl.constexpr, A_FAST: tl.constexpr,
               C_CH: tl.constexpr, C_SCH: tl.constexpr, C_JS: tl.constexpr, C_FAST: tl.constexpr,
               B_PK: tl.constexpr, B_PN: tl.constexpr, B_PL: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """One (token tile, column tile, group) of the plain grouped GEMM; group fastest, then column tile."""
    n_ctiles = tl.cdiv(NC, BN)
    g = pid % G
    ct = (pid // G) % n_ctiles
    mt = pid // (G * n_ctiles)
    rm = mt * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rn = ct * BN + tl.arange(0, BN)
    m_mask = rm < N
    n_mask = rn < NC
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + g * stride_bg + _brow(rn, B_PN, B_PL)[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a_cols = _cols(k0, rk, g, A_CH, A_SCH, A_JS, A_FAST)
        kk = k0 + rk
        b_ptrs = b_base + _brow(kk, B_PK, B_PL)[:, None] * stride_bk
        if EVEN_K:
            a = tl.load(a_rows + a_cols[None, :], mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = kk < K
            a = tl.load(a_rows + a_cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(a, b, acc, IEEE)
    c_cols = _cols(ct * BN, tl.arange(0, BN), g, C_CH, C_SCH, C_JS, C_FAST)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + c_cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _inter_tile(pid, a_ptr, b_ptr, c_ptr, N, K, NC, stride_am, stride_cm, stride_bg, stride_bk, stride_bn,
                V_CH: tl.constexpr, V_SCH: tl.constexpr, V_JS: tl.constexpr, V_FAST: tl.constexpr,
                A_INTER: tl.constexpr, L: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """All ``L`` groups at once for the paper output order (column ``a*L + j``), batched dot.

    ``A_INTER``: ``C[n, colV(c, j)] = sum_a A[n, a*L + j] * B[j, a, c]`` (input gradient of stage
    two: the interleaved operand is read as one contiguous tile, de-interleaved on chip). Else
    ``C[n, c*L + j] = sum_t A[n, colV(t, j)] * B[j, t, c]`` (forward stage two). ``K``, ``NC`` are
    multiples of ``BK``, ``BN``.
    """
    n_ctiles = NC // BN
    ct = pid % n_ctiles
    mt = pid // n_ctiles
    rm = mt * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rn = ct * BN + tl.arange(0, BN)
    lj = tl.arange(0, L)
    m_mask = rm < N
    rows = rm.to(tl.int64)
    b_base = b_ptr + lj[:, None, None] * stride_bg + rn[None, None, :] * stride_bn
    acc = tl.zeros((L, BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if A_INTER:
            ri = k0 * L + tl.arange(0, BK * L)
            a2 = tl.load(a_ptr + rows[:, None] * stride_am + ri[None, :], mask=m_mask[:, None], other=0.0)
            a = tl.permute(tl.reshape(a2, (BM, BK, L)), (2, 0, 1))
        else:
            a_cols = _cols(k0, rk[None, None, :], lj[:, None, None], V_CH, V_SCH, V_JS, V_FAST)
            a = tl.load(a_ptr + rows[None, :, None] * stride_am + a_cols, mask=m_mask[None, :, None], other=0.0)
        b = tl.load(b_base + (k0 + rk)[None, :, None] * stride_bk)
        acc = dot(a, b, acc, IEEE)
    out = acc.to(c_ptr.dtype.element_ty)
    if A_INTER:
        c_cols = _cols(ct * BN, tl.arange(0, BN)[None, None, :], lj[:, None, None], V_CH, V_SCH, V_JS, V_FAST)
        tl.store(c_ptr + rows[None, :, None] * stride_cm + c_cols, out, mask=m_mask[None, :, None])
    else:
        ro = ct * BN * L + tl.arange(0, BN * L)
        out2 = tl.reshape(tl.permute(out, (1, 2, 0)), (BM, BN * L))
        tl.store(c_ptr + rows[:, None] * stride_cm + ro[None, :], out2, mask=m_mask[:, None])


@triton.jit
def _wgrad_tile(wid, p_ptr, q_ptr, d_ptr, ws_ptr, cnt_ptr, N, MA, NT, G, tokens_per_split, n_split,
                stride_pm, stride_qm,
                P_CH: tl.constexpr, P_SCH: tl.constexpr, P_JS: tl.constexpr, P_FAST: tl.constexpr,
                Q_CH: tl.constexpr, Q_SCH: tl.constexpr, Q_JS: tl.constexpr, Q_FAST: tl.constexpr,
                P_INTER: tl.constexpr, L: tl.constexpr, D_PCH: tl.constexpr, D_PL: tl.constexpr,
                BA: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, SPLIT1: tl.constexpr, IEEE: tl.constexpr):
    """One (row tile, column tile, group, token split) of the weight gradient; tile fastest.

    ``P_INTER`` (paper output order, ``P[n, a*L + g]``): all ``L`` groups in one program as a
    batched dot, reading the interleaved operand as one contiguous tile (``G == L``).
    """
    GP = 1 if P_INTER else G
    n_ttiles = tl.cdiv(NT, BT)
    n_wtiles = tl.cdiv(MA, BA) * n_ttiles * GP
    tile = wid % n_wtiles
    sp = wid // n_wtiles
    g = tile % GP
    tt = (tile // GP) % n_ttiles
    at = tile // (GP * n_ttiles)
    ra = at * BA + tl.arange(0, BA)
    rt = tt * BT + tl.arange(0, BT)
    rk = tl.arange(0, BK)
    a_mask = ra < MA
    t_mask = rt < NT
    n_start = sp * tokens_per_split
    n_end = tl.minimum(n_start + tokens_per_split, N)
    if P_INTER:
        lj = tl.arange(0, L)
        ri = at * BA * L + tl.arange(0, BA * L)
        q_cols = _cols(tt * BT, tl.arange(0, BT)[None, None, :], lj[:, None, None], Q_CH, Q_SCH, Q_JS, Q_FAST)
        acc = tl.zeros((L, BA, BT), dtype=tl.float32)
        for n0 in range(n_start, n_end, BK):
            rn = n0 + rk
            n_mask = rn < n_end
            rows = rn.to(tl.int64)
            p2 = tl.load(p_ptr + rows[:, None] * stride_pm + ri[None, :], mask=n_mask[:, None], other=0.0)
            pt = tl.permute(tl.reshape(p2, (BK, BA, L)), (2, 1, 0))
            qv = tl.load(q_ptr + rows[None, :, None] * stride_qm + q_cols, mask=n_mask[None, :, None], other=0.0)
            acc = dot(pt, qv, acc, IEEE)
        d_off = ((lj[:, None, None] * MA + ra[None, :, None]).to(tl.int64) * NT + rt[None, None, :])
        loc = (lj[:, None, None] * BA + tl.arange(0, BA)[None, :, None]) * BT + tl.arange(0, BT)[None, None, :]
        reduce_store(acc, d_ptr, d_off, a_mask[None, :, None] & t_mask[None, None, :], loc, ws_ptr, cnt_ptr,
                      tile, sp, n_wtiles, n_split, L * BA * BT, SPLIT1)
    else:
        p_cols = _cols(at * BA, tl.arange(0, BA), g, P_CH, P_SCH, P_JS, P_FAST)
        q_cols = _cols(tt * BT, tl.arange(0, BT), g, Q_CH, Q_SCH, Q_JS, Q_FAST)
        acc = tl.zeros((BA, BT), dtype=tl.float32)
        for n0 in range(n_start, n_end, BK):
            rn = n0 + rk
            n_mask = rn < n_end
            rows = rn.to(tl.int64)
            pt = tl.load(p_ptr + rows[None, :] * stride_pm + p_cols[:, None],
                         mask=a_mask[:, None] & n_mask[None, :], other=0.0)
            qv = tl.load(q_ptr + rows[:, None] * stride_qm + q_cols[None, :],
                         mask=n_mask[:, None] & t_mask[None, :], other=0.0)
            acc = dot(pt, qv, acc, IEEE)
        d_off = (g * MA + _brow(ra, D_PCH, D_PL)).to(tl.int64)[:, None] * NT + rt[None, :]
        loc = tl.arange(0, BA)[:, None] * BT + tl.arange(0, BT)[None, :]
        reduce_store(acc, d_ptr, d_off, a_mask[:, None] & t_mask[None, :], loc, ws_ptr, cnt_ptr,
                      tile, sp, n_wtiles, n_split, BA * BT, SPLIT1)


@triton.jit
def monarch_kernel(
    a_ptr, b_ptr, c_ptr, N, K, NC, G, stride_am, stride_cm, stride_bg, stride_bk, stride_bn, n_gemm,
    p_ptr, q_ptr, d_ptr, ws_ptr, cnt_ptr, MA, NT, GW, tokens_per_split, n_split, stride_pm, stride_qm,
    A_CH: tl.constexpr, A_SCH: tl.constexpr, A_JS: tl.constexpr, A_FAST: tl.constexpr,
    C_CH: tl.constexpr, C_SCH: tl.constexpr, C_JS: tl.constexpr, C_FAST: tl.constexpr,
    B_PK: tl.constexpr, B_PN: tl.constexpr, B_PL: tl.constexpr,
    GEMM: tl.constexpr, L: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    WG: tl.constexpr, P_CH: tl.constexpr, P_SCH: tl.constexpr, P_JS: tl.constexpr, P_FAST: tl.constexpr,
    Q_CH: tl.constexpr, Q_SCH: tl.constexpr, Q_JS: tl.constexpr, Q_FAST: tl.constexpr,
    P_INTER: tl.constexpr, D_PCH: tl.constexpr, D_PL: tl.constexpr,
    BA: tl.constexpr, BT: tl.constexpr, BKW: tl.constexpr, SPLIT1: tl.constexpr, IEEE: tl.constexpr,
):
    """GEMM role for programs ``< n_gemm`` (``GEMM``: 0 none, 1 plain, 2 / 3 paper order with the
    interleaved operand ``A`` / ``C``, whose other map is the ``A`` map for 3 and the ``C`` map for
    2), weight-gradient role (``WG``) for the rest."""
    pid = tl.program_id(0)
    if pid < n_gemm:
        if GEMM == 1:
            _gemm_tile(pid, a_ptr, b_ptr, c_ptr, N, K, NC, G, stride_am, stride_cm, stride_bg, stride_bk,
                       stride_bn, A_CH, A_SCH, A_JS, A_FAST, C_CH, C_SCH, C_JS, C_FAST, B_PK, B_PN, B_PL,
                       BM, BN, BK, EVEN_K, IEEE)
        elif GEMM == 2:
            _inter_tile(pid, a_ptr, b_ptr, c_ptr, N, K, NC, stride_am, stride_cm, stride_bg, stride_bk,
                        stride_bn, C_CH, C_SCH, C_JS, C_FAST, True, L, BM, BN, BK, IEEE)
        elif GEMM == 3:
            _inter_tile(pid, a_ptr, b_ptr, c_ptr, N, K, NC, stride_am, stride_cm, stride_bg, stride_bk,
                        stride_bn, A_CH, A_SCH, A_JS, A_FAST, False, L, BM, BN, BK, IEEE)
    else:
        if WG:
            _wgrad_tile(pid - n_gemm, p_ptr, q_ptr, d_ptr, ws_ptr, cnt_ptr, N, MA, NT, GW, tokens_per_split,
                        n_split, stride_pm, stride_qm, P_CH, P_SCH, P_JS, P_FAST, Q_CH, Q_SCH, Q_JS, Q_FAST,
                        P_INTER, L, D_PCH, D_PL, BA, BT, BKW, SPLIT1, IEEE)
