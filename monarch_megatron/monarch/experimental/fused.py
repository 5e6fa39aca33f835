"""Experimental: the fused Triton Monarch multiply (forward and backward), permutations folded into
addressing (``MonarchOptions(backend="fused")``; ``"triton"`` off Hopper).

Why experimental. On an H100 it lost to the torch path at every shape of the last measurement (its
products run 2-4x slower than cuBLAS: benchmarks/KERNEL_NOTES.md, v5), and it is unmeasured on other
GPUs; ``"auto"`` never chooses it. It is kept, tested under the interpreter, as the only Triton path
for shapes the TMA path refuses (e.g. ``l`` not dividing ``q``) and as a base for work on GPUs
without TMA.

Semantics are those of the torch path (:mod:`..torch_path`; ../shared/DESIGN.md, "Monarch semantics"):
``x: (..., k*p)``, ``w1: (k, q, p)``, ``w2: (l, s, r)``, output ``(..., l*s)``.

Layout of the intermediate. Second-stage block ``j`` reads the flat first-stage channels
``f = t*l + j`` (``t < r``). When ``l`` divides ``q`` these are, for every first-stage block ``i``,
the rows ``w1[i][j::l]`` (``q/l`` of them). The kernels read the rows of each ``w1[i]`` in the order
``(j, m)`` (row ``m*l + j`` is read as ``j*(q/l) + m``; a row map in the load address, no copy), so
the intermediate ``u'`` of shape ``(n, k, l, q/l)`` is written by stage one as plain contiguous
blocks and read by stage two as contiguous chunks of ``q/l`` channels; ``dw1`` is written back in
the natural row order by the same map. When ``l`` does not divide ``q`` the natural layout is used
and stage two gathers with stride ``l`` (correct for every shape, slower).

Launches per fwd+bwd (kernels: :mod:`.fused_kernels`): forward stage one, stage two;
backward ``dv`` together with ``dw2`` (one launch, two program roles), then ``dx`` together with
``dw1``. Weight gradients reduce over tokens split over token ranges and are finished inside the
kernel. Everything a launch needs besides the tensors (tiles, grid, scalar arguments) is computed
once per shape and kernel options and cached, and after the first launch the compiled kernel is
launched directly (host overhead was the bound at small layers: benchmarks/KERNEL_NOTES.md, v4).
"""

from __future__ import annotations

import torch
import triton

from ..options import KernelOptions
from ..triton_common import INTERPRET, pow2_dividing, split_workspace, token_splits
from .fused_kernels import monarch_kernel


def _pow2_at_most(x: int, cap: int) -> int:
    """Largest power of two ``<= min(x, cap)``, at least 16 (the smallest ``tl.dot`` tile)."""
    v = 16
    while v * 2 <= min(x, cap):
        v *= 2
    return v


def _fast(cmap: tuple, tile: int) -> tuple:
    """``(CH, SCH, JS, FAST)``: FAST when a tile of ``tile`` indices stays inside one aligned chunk."""
    ch, sch, js = cmap
    return (ch, sch, js, ch % tile == 0 and sch % 8 == 0 and js % 8 == 0 and tile % 8 == 0)


def _ktile(kmap: tuple, K: int, cap: int) -> int:
    """Reduction tile: keep it inside one chunk of the map when that still allows >= 16."""
    bk = _pow2_at_most(K, cap)
    chunk = pow2_dividing(kmap[0], bk)
    return chunk if 16 <= chunk < bk else bk


def _inter_ok(L: int, K: int, NC: int) -> bool:
    """The batched-dot (paper order) tiles need a power-of-two ``L`` and whole tiles."""
    return L >= 2 and (L & (L - 1)) == 0 and K % 16 == 0 and NC % 16 == 0


class LaunchSpec:
    """One launch of :func:`.fused_kernels.monarch_kernel`: grid, launch options and the argument
    template (tensors filled in per call). ``direct``: launch the compiled kernel directly once it
    exists (cleared for this launch if Triton's launcher rejects the call); ``fallback``: why a
    merged launch runs as two (``None`` if it does not)."""

    __slots__ = ("grid", "warps", "stages", "args", "ws_numel", "n_cnt", "ck", "parts", "direct", "fallback")

    def run(self, a, b, c, p, q, d, device) -> None:
        if self.parts is not None:  # merged launch that did not compile: its two roles apart
            for part in self.parts:
                part.run(a, b, c, p, q, d, device)
            return
        ws, cnt, stream = split_workspace(device, self.ws_numel, self.n_cnt)
        args = self.args
        # The tensor slots of monarch_kernel's signature: a, b, c, then p, q, d, ws, cnt.
        args[0], args[1], args[2], args[13], args[14], args[15], args[16], args[17] = a, b, c, p, q, d, ws, cnt
        ck = self.ck
        if ck is not None and self.direct and _no_hooks():
            try:
                ck.run(self.grid, 1, 1, stream, ck.function, ck.packed_metadata, None, None, None, *args)
                return
            except Exception:  # launcher signature of another Triton: stay on the public path
                self.direct = False
        ck = monarch_kernel[(self.grid,)](*args, num_warps=self.warps, num_stages=self.stages)
        if not INTERPRET and hasattr(ck, "packed_metadata"):
            self.ck = ck


def _no_hooks() -> bool:
    rt = getattr(getattr(triton, "knobs", None), "runtime", None)
    return rt is not None and rt.launch_enter_hook is None and rt.launch_exit_hook is None


def launch_spec(N: int, ieee: bool, gemm: dict | None, wg: dict | None,
                kernel: KernelOptions = KernelOptions()) -> LaunchSpec:
    """Tiles, grid and argument template of a launch with a GEMM role and/or a weight-gradient role
    over ``N`` tokens (``gemm`` / ``wg``: the role's sizes and column maps, ``None`` for no role)."""
    c = dict(A_CH=1, A_SCH=1, A_JS=1, A_FAST=False, C_CH=1, C_SCH=1, C_JS=1, C_FAST=False, B_PK=0, B_PN=0,
             B_PL=1, GEMM=0, L=1, BM=16, BN=16, BK=16, EVEN_K=True, WG=False, P_CH=1, P_SCH=1, P_JS=1,
             P_FAST=False, Q_CH=1, Q_SCH=1, Q_JS=1, Q_FAST=False, P_INTER=False, D_PCH=0, D_PL=1, BA=16,
             BT=16, BKW=16, SPLIT1=True, IEEE=ieee)
    s = dict(K=0, NC=0, G=1, sam=0, scm=0, sbg=0, sbk=0, sbn=0, n_gemm=0, MA=0, NT=0, GW=1, tps=0, n_split=1,
             spm=0, sqm=0)
    warps, stages, ws_numel, n_cnt = [], [], 0, 0
    if gemm is not None:
        K, NC, G, L = gemm["K"], gemm["NC"], gemm["G"], gemm.get("L", 1)
        kind = gemm["kind"]
        if kind == 1:
            if INTERPRET:
                BM, BN, BK, w, st = 16, 16, 16, 1, 1
            else:
                # 128x256x64, 8 warps, 3 stages (v3 sweep: 1.2-1.5x over 128x128 on these short-K products).
                BM, BN, BK = 128, _pow2_at_most(NC, 256), _ktile(gemm["a_map"], K, 64)
                w, st = (8, 3) if BN >= 128 else (4, 4)
            n_prog = triton.cdiv(N, BM) * triton.cdiv(NC, BN) * G
            c.update(zip(("A_CH", "A_SCH", "A_JS", "A_FAST"), _fast(gemm["a_map"], BK)))
            c.update(zip(("C_CH", "C_SCH", "C_JS", "C_FAST"), _fast(gemm["c_map"], BN)))
            c.update(B_PK=gemm.get("B_PK", 0), B_PN=gemm.get("B_PN", 0), B_PL=gemm.get("B_PL", 1),
                     EVEN_K=(K % BK == 0))
        else:  # paper order: 2 = interleaved A (input gradient of stage two), 3 = interleaved C
            v_map = gemm["c_map"] if kind == 2 else gemm["a_map"]
            if INTERPRET:
                BM, BN, BK, w, st = 16, 16, 16, 1, 1
            else:
                BM, w, st = 64, 4, 3
                BN = pow2_dividing(NC, max(16, 256 // L))
                BK = pow2_dividing(K, 32)
                if kind == 3:
                    BK = min(BK, max(16, pow2_dividing(v_map[0], BK)))
            n_prog = triton.cdiv(N, BM) * (NC // BN)
            pre = "C" if kind == 2 else "A"
            c.update(zip((pre + "_CH", pre + "_SCH", pre + "_JS", pre + "_FAST"),
                         _fast(v_map, BN if kind == 2 else BK)))
        c.update(GEMM=kind, L=L, BM=BM, BN=BN, BK=BK)
        s.update(K=K, NC=NC, G=G, sam=gemm["sam"], scm=gemm["scm"], n_gemm=n_prog)
        s.update(zip(("sbg", "sbk", "sbn"), gemm["b_strides"]))
        warps.append(w)
        stages.append(st)
    n_wg = 0
    if wg is not None:
        MA, NT, G, p_inter = wg["MA"], wg["NT"], wg["G"], wg.get("p_inter", False)
        if INTERPRET:
            BA, BT, BK, w, st = 16, 16, 16, 1, 1
        elif p_inter:
            BA, BT, BK, w, st = pow2_dividing(MA, max(16, 256 // G)), pow2_dividing(NT, 64), 32, 4, 3
        else:
            BA, BT, BK = _pow2_at_most(MA, 128), _pow2_at_most(NT, 256), 64
            w, st = (8, 3) if BA * BT >= 128 * 128 else (4, 4)
        tiles = triton.cdiv(MA, BA) * triton.cdiv(NT, BT) * (1 if p_inter else G)
        split, tps = token_splits(N, tiles, BK, kernel.weight_grad_splits)
        n_wg = tiles * split
        c.update(zip(("P_CH", "P_SCH", "P_JS", "P_FAST"), _fast(wg["p_map"], BA)))
        c.update(zip(("Q_CH", "Q_SCH", "Q_JS", "Q_FAST"), _fast(wg["q_map"], BT)))
        c.update(WG=True, P_INTER=p_inter, D_PCH=wg.get("D_PCH", 0), D_PL=wg.get("D_PL", 1), BA=BA, BT=BT,
                 BKW=BK, SPLIT1=(split == 1))
        if p_inter:
            c["L"] = G
        s.update(MA=MA, NT=NT, GW=G, tps=tps, n_split=split, spm=wg["spm"], sqm=wg["sqm"])
        if split > 1:
            ws_numel = split * tiles * BA * BT * (G if p_inter else 1)
            n_cnt = tiles
        warps.append(w)
        stages.append(st)
    spec = LaunchSpec()
    spec.grid = s["n_gemm"] + n_wg
    spec.warps, spec.stages = max(warps), min(stages)
    spec.ws_numel, spec.n_cnt, spec.ck, spec.parts = ws_numel, n_cnt, None, None
    spec.direct, spec.fallback = kernel.fused_direct_launch, None
    spec.args = ([None] * 3 + [N, s["K"], s["NC"], s["G"], s["sam"], s["scm"], s["sbg"], s["sbk"], s["sbn"],
                                s["n_gemm"]]
                 + [None] * 5 + [s["MA"], s["NT"], s["GW"], s["tps"], s["n_split"], s["spm"], s["sqm"]]
                 + list(c.values()))
    return spec


class _Plan:
    """Every launch of one layer shape (per token count, dtype, output order, kernel options),
    built once."""

    def __init__(self, k, q, p, l, s, r, n, dtype, out_perm, need, kernel: KernelOptions):
        ieee = INTERPRET or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
        self.rowperm = q % l == 0
        ch = q // l if self.rowperm else 0
        pl = l if self.rowperm else 1
        x_map, u_map = (p, 0, p), (q, 0, q)
        v_map = (ch, q, ch) if self.rowperm else (1, l, 1)
        y_map = (1, l, 1) if out_perm else (s, 0, s)
        inter = out_perm and _inter_ok(l, r, s)
        w1_rows = dict(B_PL=pl)
        # dw1 by cuBLAS bmm where the layer is GPU-bound and cuBLAS's reduction is faster (4096->16384:
        # 0.17 vs ~0.5 ms, KERNEL_NOTES v4); elsewhere the kernel's role saves the bmm and a copy.
        self.dw1_bmm = kernel.fused_dw1_cublas if kernel.fused_dw1_cublas is not None else q * p >= 1 << 20
        # Stage one: u'[:, i] = x_i @ w1[i]^T with the rows of w1[i] in u' order (B[i, kk, c] = w1[i, c, kk]).
        self.s1 = launch_spec(n, ieee, dict(kind=1, K=p, NC=q, G=k, a_map=x_map, c_map=u_map, sam=k * p,
                                            scm=k * q, b_strides=(q * p, 1, p), B_PN=ch, **w1_rows), None, kernel)
        # Stage two: y_j = v_j @ w2[j]^T (B[j, kk, c] = w2[j, c, kk]).
        self.s2 = launch_spec(n, ieee, dict(kind=3 if inter else 1, K=r, NC=s, G=l, L=l, a_map=v_map,
                                            c_map=y_map, sam=k * q, scm=l * s, b_strides=(s * r, 1, r)), None,
                              kernel)
        # Backward, launch 1: dv_j = dy_j @ w2[j] into the u' layout (B[j, kk, c] = w2[j, kk, c]) and
        # dw2[j] = dy_j^T @ v_j.
        g1 = (dict(kind=2 if inter else 1, K=s, NC=r, G=l, L=l, a_map=y_map, c_map=v_map, sam=l * s,
                   scm=k * q, b_strides=(s * r, r, 1)) if (need[0] or need[1]) else None)
        w1g = (dict(MA=s, NT=r, G=l, p_inter=inter, p_map=y_map, q_map=v_map, spm=l * s, sqm=k * q)
               if need[2] else None)
        # Launch 2: dx_i = du'_i @ w1[i] (B[i, kk, c] = w1[i, row(kk), c]) and dw1[i] = du'_i^T @ x_i
        # written in the natural row order.
        g2 = (dict(kind=1, K=q, NC=p, G=k, a_map=u_map, c_map=x_map, sam=k * q, scm=k * p,
                   b_strides=(q * p, p, 1), B_PK=ch, **w1_rows) if need[0] else None)
        w2g = (dict(MA=q, NT=p, G=k, p_map=u_map, q_map=x_map, spm=k * q, sqm=k * p, D_PCH=ch, D_PL=pl)
               if need[1] and not self.dw1_bmm else None)
        self.b1 = self._launch(n, ieee, g1, w1g, kernel)
        self.b2 = self._launch(n, ieee, g2, w2g, kernel)

    @staticmethod
    def _launch(n, ieee, gemm, wg, kernel: KernelOptions):
        if gemm is None and wg is None:
            return None
        spec = launch_spec(n, ieee, gemm, wg, kernel)
        if gemm is not None and wg is not None and not kernel.fused_merged_launches:
            spec.parts = [launch_spec(n, ieee, gemm, None, kernel), launch_spec(n, ieee, None, wg, kernel)]
        elif gemm is not None and wg is not None:
            spec.parts = _Fallback(n, ieee, gemm, wg, kernel)
        return spec


class _Fallback(list):
    """Marker: try the merged launch first; if it does not compile, run its roles apart."""

    def __init__(self, n, ieee, gemm, wg, kernel: KernelOptions):
        super().__init__()
        self.args = (n, ieee, gemm, wg, kernel)


def _run(spec: LaunchSpec, a, b, c, p, q, d, device) -> None:
    parts = spec.parts
    if isinstance(parts, _Fallback):
        try:
            spec.parts = None
            spec.run(a, b, c, p, q, d, device)
            return
        except Exception as e:  # e.g. out of shared memory for the two roles' pipelines together
            n, ieee, gemm, wg, kernel = parts.args
            spec.fallback = (f"{gemm['kind']}/{wg.get('p_inter', False)} {gemm['K']}x{gemm['NC']}: "
                             f"{type(e).__name__} {str(e)[:120]}")
            spec.parts = [launch_spec(n, ieee, gemm, None, kernel), launch_spec(n, ieee, None, wg, kernel)]
    spec.run(a, b, c, p, q, d, device)


_PLANS: dict = {}


def _get_plan(w1, w2, n, dtype, out_perm, need, kernel: KernelOptions) -> _Plan:
    """The cached plan of these operands; the kernel options are part of the key, so two option
    sets never share a plan."""
    key = (w1.shape, w2.shape, n, dtype, out_perm, need, kernel, torch.backends.cuda.matmul.allow_tf32)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(*w1.shape, *w2.shape, n, dtype, out_perm, need, kernel)
    return plan


def launch_diagnostics() -> dict:
    """What the cached plans' launches ended up doing (for the benchmark's report):
    ``direct_launch``: every launch launches the compiled kernel directly (none turned off by the
    options or rejected by Triton's launcher); ``merged_fallbacks``: why each merged backward
    launch that did not compile runs as two."""
    specs = []
    for plan in _PLANS.values():
        for spec in (plan.s1, plan.s2, plan.b1, plan.b2):
            if spec is not None:
                specs.append(spec)
                if isinstance(spec.parts, list) and not isinstance(spec.parts, _Fallback):
                    specs.extend(spec.parts)
    return {"direct_launch": all(spec.direct for spec in specs),
            "merged_fallbacks": [spec.fallback for spec in specs if spec.fallback is not None]}


class _MonarchTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool,
                kernel: KernelOptions):
        k, q, p = w1.shape
        l, s, r = w2.shape
        x2 = x.reshape(-1, k * p)
        if x2.stride(1) != 1 or x2.stride(0) != k * p:
            x2 = x2.contiguous()
        w1, w2 = w1.contiguous(), w2.contiguous()
        n = x2.shape[0]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        plan = _get_plan(w1, w2, n, x2.dtype, output_permutation, need, kernel)
        u = torch.empty((n, k * q), device=x2.device, dtype=x2.dtype)
        y = torch.empty((n, l * s), device=x2.device, dtype=x2.dtype)
        _run(plan.s1, x2, w1, u, x2, x2, u, x2.device)
        _run(plan.s2, u, w2, y, u, u, y, x2.device)
        if any(need):
            ctx.save_for_backward(x2, w1, w2, u)
            ctx.plan = plan
            ctx.batch_shape = x.shape[:-1]
        return y.view(*x.shape[:-1], l * s)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w1, w2, u = ctx.saved_tensors
        plan = ctx.plan
        need = ctx.needs_input_grad
        n = x2.shape[0]
        dy2 = dy.reshape(n, -1)
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        if dy2.stride(1) != 1 or dy2.stride(0) != dy2.shape[1]:
            dy2 = dy2.contiguous()
        dev = x2.device
        du = torch.empty_like(u) if plan.b2 is not None or need[1] else u
        dw2 = torch.empty_like(w2) if need[2] else w2
        if plan.b1 is not None:
            _run(plan.b1, dy2, w2, du, dy2, u, dw2, dev)
        dx2 = torch.empty_like(x2) if need[0] else None
        dw1 = torch.empty_like(w1) if need[1] else None
        if plan.b2 is not None:
            _run(plan.b2, du, w1, x2 if dx2 is None else dx2, du, x2, w1 if dw1 is None else dw1, dev)
        if need[1] and plan.dw1_bmm:
            k, q, p = w1.shape
            l = w2.shape[0]
            dw1 = torch.bmm(du.view(n, k, q).permute(1, 2, 0), x2.view(n, k, p).transpose(0, 1))
            if plan.rowperm:
                dw1 = dw1.view(k, l, q // l, p).transpose(1, 2).reshape(k, q, p)
        dx = None if dx2 is None else dx2.view(*ctx.batch_shape, x2.shape[1])
        return dx, dw1, (dw2 if need[2] else None), None, None


def monarch_multiply_fused(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, output_permutation: bool = True,
                           kernel: KernelOptions = KernelOptions()) -> torch.Tensor:
    """The fused kernel (any CUDA GPU, or the interpreter), with autograd.

    Args:
        x: ``(..., k*p)`` input, already padded; fp32, fp16 or bf16 (fp32 accumulation).
        w1: ``(k, q, p)`` first block-diagonal factor.
        w2: ``(l, s, r)`` second block-diagonal factor, ``l*r == k*q``; operands of one dtype (the
            dispatcher casts them under autocast).
        output_permutation: paper order (``True``) or block-major order (``False``).
        kernel: the kernel knobs (``fused_*``, ``weight_grad_splits``).

    Returns:
        ``(..., l*s)`` output in the operands' dtype.
    """
    if not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(f"dtypes differ: x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype}")
    if x.is_complex():
        raise ValueError(f"the fused kernel does not support complex dtype {x.dtype}; use backend='torch'")
    return _MonarchTriton.apply(x, w1, w2, bool(output_permutation), kernel)
