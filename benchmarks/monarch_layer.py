"""Monarch layer benchmark: dense ``F.linear`` vs the Monarch paths, in one run.

Paths: ``torch`` (the reference path: cuBLAS batched products and permutation copies), ``fused``
(the experimental fused Triton kernel, any CUDA GPU), ``tma`` (Hopper: TMA Triton kernels where the
permutation is, cuBLAS for the plain products; what ``backend="triton"`` and ``"auto"`` run on an
H100). Experiments (``--variants``, ``--tma-variants``, ``--tile-sweep``) run a path with other
:class:`KernelOptions`, passed to the call; no module state is switched.

One command (on a CUDA machine):

    python benchmarks/monarch_layer.py --quick --graphs   # nblocks 4, the issue's table (eager and
                                                          # CUDA-graph GPU time) + MLP block
    python benchmarks/monarch_layer.py            # full table: 6 layer shapes x nblocks 2/4/8 + MLP block
    python benchmarks/monarch_layer.py --quick --layers 1024x1024,1024x4096 --baseline OLD.py --variants
                                                  # a few layers; an older triton_monarch.py timed in the
                                                  # same run; host (issue) time; launch experiments

Times fwd and fwd+bwd (bf16, 16384 tokens, ``triton.testing.do_bench`` median, dense measured in the
same run), the host time to issue one fwd+bwd, and with ``--graphs`` the fwd+bwd captured in a CUDA
graph (GPU time alone); checks the Triton paths on the GPU at full shapes first (fresh random inputs, outputs and
gradients poisoned with NaN before each run, relative error against an fp32 reference with a
per-dtype bound), prints a table and writes JSON to ``$OUT/monarch_layer.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from monarch_megatron.monarch import KernelOptions, monarch_factor_shapes, monarch_multiply_torch  # noqa: E402
from monarch_megatron.monarch import triton_monarch_tma  # noqa: E402
from monarch_megatron.monarch.experimental import fused  # noqa: E402

TOKENS = 16384
LAYERS = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (1024, 1024), (4096, 16384)]
# Relative-error bounds against an fp32 (tf32 off) reference: bf16/fp16 operands and a bf16/fp16
# intermediate give errors of a few 1e-3; fp32 with IEEE dots lands near 1e-6.
# The Triton paths: the fused kernel (any CUDA GPU) and the TMA kernels + cuBLAS (Hopper; what
# backend="triton" and "auto" run there).
PATHS = {"fused": fused.monarch_multiply_fused, "tma": triton_monarch_tma.monarch_multiply_tma,
         "tma_dw1cublas": lambda x, w1, w2, perm: triton_monarch_tma.monarch_multiply_tma(
             x, w1, w2, perm, KernelOptions(tma_dw1_cublas=True))}
REL_BOUND = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (NaN propagates, so an unwritten element fails)."""
    a64, b64 = a.double(), b.double()
    return ((a64 - b64).norm() / b64.norm()).item()


def poison_cache(numel: int, dtype: torch.dtype) -> None:
    """Fill then free a NaN block of ``numel`` elements so that the next same-size allocation
    (the kernel's output) starts from NaN: an element the kernel does not write stays NaN."""
    t = torch.full((numel,), float("nan"), device="cuda", dtype=dtype)
    del t


def check_correct(n_in: int, n_out: int, nblocks: int, perm: bool, dtype: torch.dtype, tokens: int,
                  path: str = "tma") -> dict:
    """Forward and all gradients of a Triton path (``PATHS``) against an fp32 reference at full shape."""
    sh = monarch_factor_shapes(n_in, n_out, nblocks)
    x = torch.randn(tokens, sh.padded_in, device="cuda")
    w1 = torch.randn(sh.w1_shape, device="cuda") / math.sqrt(sh.p)
    w2 = torch.randn(sh.w2_shape, device="cuda") / math.sqrt(sh.r)
    dy = torch.randn(tokens, sh.padded_out, device="cuda")
    ref_in = [t.clone().requires_grad_() for t in (x, w1, w2)]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = monarch_multiply_torch(*ref_in, perm)
    ref.backward(dy)
    torch.backends.cuda.matmul.allow_tf32 = prev
    errs = {}
    # Twice: the first call compiles and launches through Triton's public path, the second launches
    # the cached compiled kernels directly; fresh random inputs and fresh poison for each.
    for call in range(2):
        if call:
            x.normal_(), w1.normal_().div_(math.sqrt(sh.p)), w2.normal_().div_(math.sqrt(sh.r)), dy.normal_()
            ref_in = [t.clone().requires_grad_() for t in (x, w1, w2)]
            torch.backends.cuda.matmul.allow_tf32 = False
            ref = monarch_multiply_torch(*ref_in, perm)
            ref.backward(dy)
            torch.backends.cuda.matmul.allow_tf32 = prev
        ins = [t.to(dtype).clone().requires_grad_() for t in (x, w1, w2)]
        for t in ins:
            poison_cache(t.numel(), dtype)  # gradients allocated next start as NaN
        poison_cache(tokens * sh.padded_out, dtype)
        out = PATHS[path](*ins, perm)
        out.backward(dy.to(dtype))
        torch.cuda.synchronize()
        e = {"out": rel_err(out, ref)}
        for name, t, r in zip(("dx", "dw1", "dw2"), ins, ref_in):
            e[name] = rel_err(t.grad, r.grad)
        errs = {k: max(errs.get(k, 0.0), v) if v == v else v for k, v in e.items()}
    ok = all(e <= REL_BOUND[dtype] for e in errs.values())  # NaN compares False
    return {"layer": f"{n_in}->{n_out}", "nblocks": nblocks, "perm": perm, "dtype": str(dtype), "path": path,
            "tokens": tokens, "errors": errs, "bound": REL_BOUND[dtype], "ok": ok}


def bench(fn, grads) -> float:
    """Median time in ms (``do_bench``: events, warm-up, L2 flushed between runs)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def host_ms(fn, iters: int = 20) -> float:
    """Host time to issue one call (ms): wall time of ``iters`` calls without synchronising, while the
    GPU queue is far from full. When this exceeds the device time, the host bounds the layer."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / iters


TMA_VARIANTS = False


def graph_ms(f, g: torch.Tensor, params: list) -> float:
    """GPU time (ms) of one fwd+bwd captured in a CUDA graph: the device work alone, without the host
    overhead of issuing it (what a graph-captured training step would pay)."""
    def step():
        torch.autograd.grad(f(), params, g)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    except RuntimeError as e:  # a path that cannot be captured: reported, the run goes on
        print(f"graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.synchronize()
        return float("nan")


def time_layer(n_in: int, n_out: int, nblocks: int, perm: bool, extra: dict | None = None,
               graphs: bool = False, fused_kernel: KernelOptions = KernelOptions()) -> dict:
    """fwd and fwd+bwd times of dense, torch-path Monarch and Triton Monarch at one shape (plus the
    modules in ``extra``, name -> module with ``monarch_multiply_triton``); host time of Triton;
    with ``graphs``, fwd+bwd GPU time of each in a CUDA graph as well. ``fused_kernel``: the
    options the fused path runs with (``--variants``)."""
    dt = torch.bfloat16
    sh = monarch_factor_shapes(n_in, n_out, nblocks)
    x = torch.randn(TOKENS, n_in, device="cuda", dtype=dt).requires_grad_()
    xp = torch.randn(TOKENS, sh.padded_in, device="cuda", dtype=dt).requires_grad_()
    w = (torch.randn(n_out, n_in, device="cuda", dtype=dt) / math.sqrt(n_in)).requires_grad_()
    w1 = (torch.randn(sh.w1_shape, device="cuda", dtype=dt) / math.sqrt(sh.p)).requires_grad_()
    w2 = (torch.randn(sh.w2_shape, device="cuda", dtype=dt) / math.sqrt(sh.r)).requires_grad_()
    dy = torch.randn(TOKENS, n_out, device="cuda", dtype=dt)
    dyp = torch.randn(TOKENS, sh.padded_out, device="cuda", dtype=dt)
    fns = {
        "dense": (lambda: F.linear(x, w), dy, [x, w]),
        "torch": (lambda: monarch_multiply_torch(xp, w1, w2, perm), dyp, [xp, w1, w2]),
        "fused": (lambda: fused.monarch_multiply_fused(xp, w1, w2, perm, fused_kernel), dyp, [xp, w1, w2]),
    }
    if triton_monarch_tma.supports(xp, w1, w2):
        fns["tma"] = (lambda: triton_monarch_tma.monarch_multiply_tma(xp, w1, w2, perm), dyp, [xp, w1, w2])
        if TMA_VARIANTS and perm:
            copy_perm = KernelOptions(tma_paper_kernel=False)
            fns["tma_copyperm"] = (lambda: triton_monarch_tma.monarch_multiply_tma(xp, w1, w2, perm, copy_perm), dyp,
                                   [xp, w1, w2])
    for name, mod in (extra or {}).items():
        fns[name] = (lambda mod=mod: mod.monarch_multiply_triton(xp, w1, w2, perm), dyp, [xp, w1, w2])
    res = {"layer": f"{n_in}->{n_out}", "nblocks": nblocks, "perm": perm,
           "flop_ratio": (n_in * n_out) / sh.num_params}
    for name, (f, g, params) in fns.items():
        with torch.no_grad():
            res[f"{name}_fwd"] = bench(f, None)
        step = lambda f=f, g=g: f().backward(g)  # noqa: E731
        res[f"{name}_fwdbwd"] = bench(step, params)
        res[f"{name}_host"] = host_ms(step)
        if graphs:
            res[f"{name}_graph"] = graph_ms(f, g, params)
    return res


def time_mlp(nblocks: int = 4, hidden: int = 1024, ffn: int = 4096) -> dict:
    """BERT-large MLP block (fc1 + GELU + fc2, with biases): Monarch (fc1 block-major output,
    fc2 paper order, as in the tensor-parallel layers) vs dense, fwd and fwd+bwd."""
    dt = torch.bfloat16
    s1 = monarch_factor_shapes(hidden, ffn, nblocks)
    s2 = monarch_factor_shapes(ffn, hidden, nblocks)

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", dtype=dt) * scale).requires_grad_()

    x = p(TOKENS, hidden)
    dy = torch.randn(TOKENS, hidden, device="cuda", dtype=dt)
    wd1, bd1 = p(ffn, hidden, scale=hidden ** -0.5), p(ffn, scale=0.02)
    wd2, bd2 = p(hidden, ffn, scale=ffn ** -0.5), p(hidden, scale=0.02)
    a1, b1 = p(*s1.w1_shape, scale=s1.p ** -0.5), p(*s1.w2_shape, scale=s1.r ** -0.5)
    a2, b2 = p(*s2.w1_shape, scale=s2.p ** -0.5), p(*s2.w2_shape, scale=s2.r ** -0.5)

    def dense():
        return F.linear(F.gelu(F.linear(x, wd1, bd1)), wd2, bd2)

    def monarch(mm):
        return lambda: mm(F.gelu(mm(x, a1, b1, False) + bd1), a2, b2, True) + bd2

    fns = {"dense": (dense, [x, wd1, bd1, wd2, bd2]),
           "torch": (monarch(monarch_multiply_torch), [x, a1, b1, a2, b2, bd1, bd2]),
           "fused": (monarch(fused.monarch_multiply_fused), [x, a1, b1, a2, b2, bd1, bd2]),
           "tma": (monarch(triton_monarch_tma.monarch_multiply_tma), [x, a1, b1, a2, b2, bd1, bd2])}
    res = {"layer": f"MLP {hidden}->{ffn}->{hidden}", "nblocks": nblocks, "perm": "fc1 F / fc2 T",
           "flop_ratio": (2 * hidden * ffn) / (s1.num_params + s2.num_params)}
    for name, (f, params) in fns.items():
        res[f"{name}_graph"] = graph_ms(f, dy, params)  # first: before .grad accumulation nodes exist
        with torch.no_grad():
            res[f"{name}_fwd"] = bench(f, None)
        res[f"{name}_fwdbwd"] = bench(lambda f=f: f().backward(dy), params)
    return res


def kernel_breakdown(n_in: int, n_out: int, nblocks: int, perm: bool, multiply) -> list[tuple[str, float]]:
    """Per-kernel device times (ms, launch order) of one fwd+bwd of ``multiply(x, w1, w2, perm)``,
    from the profiler."""
    dt = torch.bfloat16
    sh = monarch_factor_shapes(n_in, n_out, nblocks)
    xp = torch.randn(TOKENS, sh.padded_in, device="cuda", dtype=dt).requires_grad_()
    w1 = (torch.randn(sh.w1_shape, device="cuda", dtype=dt) / math.sqrt(sh.p)).requires_grad_()
    w2 = (torch.randn(sh.w2_shape, device="cuda", dtype=dt) / math.sqrt(sh.r)).requires_grad_()
    dyp = torch.randn(TOKENS, sh.padded_out, device="cuda", dtype=dt)
    step = lambda: multiply(xp, w1, w2, perm).backward(dyp)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    reps = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per = len(events) // reps
    out = []
    for i in range(per):
        times = [events[r * per + i].device_time for r in range(reps)]
        out.append((events[i].name[:40], sorted(times)[reps // 2] / 1000.0))
    return out


def tile_sweep(n_in: int, n_out: int, nblocks: int = 4) -> list[str]:
    """GPU time (CUDA graph) of each TMA-path kernel (stage one, dx, dw1) under candidate tiles at one
    shape (``TOKENS`` rows), the current choice first; then dw1 at 2-16 forced token splits and
    through cuBLAS. Each candidate runs
    with its own :class:`KernelOptions` (``tma_tile_overrides``), so it gets its own cached tiles."""
    tt = triton_monarch_tma
    sh = monarch_factor_shapes(n_in, n_out, nblocks)
    k, q, p = sh.w1_shape
    l = sh.w2_shape[0]
    ch = q // l
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w1p = torch.randn(TOKENS, k * p, **bf), torch.randn(k, q, p, **bf)
    dv = torch.randn(TOKENS, l, k * ch, **bf)
    runs = {"s1": lambda kern: tt.stage_one(x, w1p, l, kern), "dx": lambda kern: tt.input_grad(dv, w1p, kern),
            "dw1": lambda kern: tt.weight_grad_one(dv, x, torch.Size((k, q, p)), kern)}
    mb = min(ch, 256)
    cands = {
        "s1": [(128, jb, mb, bk, w, st) for jb in sorted({max(1, 256 // mb), max(1, 128 // mb)})
               for (bk, w, st) in [(64, 8, 3), (64, 8, 4), (128, 8, 3), (64, 4, 4)] if jb <= l and p % bk == 0],
        "dx": [(bm, bn, bk, w, st) for (bm, bn, bk, w, st) in
               [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                (64, 256, 64, 4, 4), (128, 128, 128, 8, 3)] if p % bn == 0 and ch % bk == 0],
        "dw1": [(min(ch, 64), 128, 64, 8, 3, True), (min(ch, 64), 128, 64, 4, 4, True),
                (min(ch, 128), 256, 64, 8, 3, False), (min(ch, 128), 256, 64, 8, 4, False),
                (min(ch, 128), 128, 128, 8, 3, True)],
    }
    lines = []
    for kern, run in runs.items():
        for tile in [None] + cands[kern]:
            options = KernelOptions(tma_tile_overrides={kern: tile} if tile is not None else ())
            fn = lambda run=run, options=options: run(options)  # noqa: E731
            try:
                fn()
                t = triton.testing.do_bench_cudagraph(fn)
                lines.append(f"tiles {n_in}->{n_out} nb{nblocks} {kern:4} {str(tile or 'current'):34} {t:.4f} ms")
            except Exception as e:  # a tile that does not fit: reported
                lines.append(f"tiles {n_in}->{n_out} nb{nblocks} {kern:4} {str(tile):34} error {type(e).__name__}")
            print(lines[-1])
    for splits in (2, 4, 8, 16):  # the token splits of dw1's reduction at the current tile
        options = KernelOptions(weight_grad_splits=splits)
        label = f"tiles {n_in}->{n_out} nb{nblocks} dw1  current, {splits:2d} token splits{'':13}"
        try:
            t = triton.testing.do_bench_cudagraph(lambda options=options: runs["dw1"](options))
            lines.append(f"{label} {t:.4f} ms")
        except Exception as e:  # reported, as a tile that does not fit
            lines.append(f"{label} error {type(e).__name__}")
        print(lines[-1])
    dw1_cublas = KernelOptions(tma_dw1_cublas=True)
    t = triton.testing.do_bench_cudagraph(lambda: runs["dw1"](dw1_cublas))
    lines.append(f"tiles {n_in}->{n_out} nb{nblocks} dw1  cuBLAS (l products + copy)         {t:.4f} ms")
    print(lines[-1])
    return lines


def print_table(rows: list[dict]) -> None:
    """One line per row: fwd, fwd+bwd and (with ``--graphs``) graph-captured fwd+bwd times of every
    path, and each Monarch path's speed-up over dense (dense time / its time) in fwd+bwd."""
    print("times in ms; (x) = speed-up over dense in the same column group")
    for r in rows:
        paths = [k[:-4] for k in r if k.endswith("_fwd")]
        parts = []
        for col, label in (("_fwd", "fwd"), ("_fwdbwd", "fwd+bwd"), ("_graph", "graph fwd+bwd")):
            if f"dense{col}" not in r:
                continue
            d = r[f"dense{col}"]
            parts.append(f"{label}: dense {d:.3f} " + " ".join(
                f"{pth} {r[pth + col]:.3f} ({d / r[pth + col]:.2f}x)" for pth in paths
                if pth != "dense" and pth + col in r))
        print(f"{r['layer']:>22} nb{r['nblocks']} perm={str(r['perm']):5} FLOPx {r['flop_ratio']:.1f} | "
              + " | ".join(parts))


def load_module(path: str):
    """An older ``triton_monarch.py`` (self-contained) loaded from a file, to time it in the same run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("triton_monarch_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_variants(n_in: int, n_out: int, nblocks: int, perm: bool) -> list[str]:
    """fwd+bwd and host time of the fused path with one launch experiment switched at a time."""
    lines = []
    for name, kernel in [("no_fast_launch", KernelOptions(fused_direct_launch=False)),
                         ("no_merge", KernelOptions(fused_merged_launches=False)),
                         ("dw1_bmm", KernelOptions(fused_dw1_cublas=True)),
                         ("dw1_kernel", KernelOptions(fused_dw1_cublas=False))]:
        r = time_layer(n_in, n_out, nblocks, perm, extra=None, fused_kernel=kernel)
        lines.append(f"variant {n_in}->{n_out} nb{nblocks} perm={perm} {name:15} fwd {r['fused_fwd']:.3f} "
                     f"fwd+bwd {r['fused_fwdbwd']:.3f} host {r['fused_host']:.3f} (dense {r['dense_fwdbwd']:.3f})")
        print(lines[-1])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="nblocks 4 only")
    ap.add_argument("--nblocks", default="", help="these nblocks only, e.g. 2,8 (overrides --quick)")
    ap.add_argument("--orders", default="T,F", help="output orders to time: T (paper), F (block-major)")
    ap.add_argument("--layers", default="", help="only these layers (checks too), e.g. 1024x1024,4096x1024")
    ap.add_argument("--baseline", default="", help="an older triton_monarch.py, timed as 'base'")
    ap.add_argument("--baseline-layers", default="", help="time the baseline only at these layers")
    ap.add_argument("--variants", action="store_true", help="launch experiments at the first layer")
    ap.add_argument("--breakdown", action="store_true", help="per-kernel times at nblocks 4")
    ap.add_argument("--no-check", action="store_true", help="skip the GPU correctness checks")
    ap.add_argument("--no-mlp", action="store_true", help="skip the MLP block")
    ap.add_argument("--tile-sweep", action="store_true", help="tiles of the TMA path's kernels, then exit")
    ap.add_argument("--tma-variants", action="store_true",
                    help="also the TMA path with the paper order by cuBLAS + a copy (tma_copyperm)")
    ap.add_argument("--check-paths", default="fused,tma", help="paths to check: fused, tma")
    ap.add_argument("--graphs", action="store_true", help="also fwd+bwd GPU time in a CUDA graph (no host)")
    ap.add_argument("--tokens", type=int, default=16384,
                    help="rows per product (default 16384; the trainer's BERT-large micro-step is 8192)")
    args = ap.parse_args()
    global TMA_VARIANTS, TOKENS
    TMA_VARIANTS = args.tma_variants
    TOKENS = args.tokens
    torch.manual_seed(1234)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  tokens {TOKENS}")
    layers = LAYERS
    if args.layers:
        layers = [tuple(int(v) for v in t.split("x")) for t in args.layers.split(",")]
    if args.tile_sweep:
        for n_in, n_out in layers:
            tile_sweep(n_in, n_out)
        return
    checks = []
    for (n_in, n_out, nb, perm, dtype, tok) in [
        (1024, 4096, 4, True, torch.bfloat16, TOKENS), (4096, 1024, 4, False, torch.bfloat16, TOKENS),
        (1024, 1024, 8, True, torch.bfloat16, TOKENS), (4096, 16384, 4, True, torch.bfloat16, TOKENS),
        (768, 3072, 8, False, torch.bfloat16, TOKENS), (3072, 768, 2, True, torch.bfloat16, TOKENS),
        (1000, 3000, 4, True, torch.bfloat16, 4000),  # non-divisible: natural layout, stride-l gather
        (1024, 4096, 4, True, torch.float16, 4096), (4096, 1024, 4, False, torch.float32, 4096),
        (1024, 1024, 4, True, torch.float32, 4096), (1024, 1024, 4, False, torch.bfloat16, TOKENS),
        (4096, 1024, 4, True, torch.bfloat16, TOKENS), (1024, 4096, 4, False, torch.bfloat16, TOKENS),
    ] if not args.no_check else []:
        if args.layers and (n_in, n_out) not in layers and n_in != 1000:
            continue
        for path in args.check_paths.split(","):
            sh = monarch_factor_shapes(n_in, n_out, nb)
            probe = torch.empty(1, sh.padded_in, device="cuda", dtype=dtype)
            if path.startswith("tma") and not triton_monarch_tma.supports(
                    probe, probe.new_empty(sh.w1_shape), probe.new_empty(sh.w2_shape)):
                continue  # the TMA path takes bf16/fp16 and chunks of >= 16 channels only
            c = check_correct(n_in, n_out, nb, perm, dtype, tok, path)
            checks.append(c)
            print("check", path, c["layer"], "nb", nb, "perm", perm, c["dtype"], "tokens", tok,
                  {k: f"{v:.1e}" for k, v in c["errors"].items()}, "OK" if c["ok"] else "FAIL")
    if not all(c["ok"] for c in checks):
        print("CORRECTNESS FAILURE")
    extra = {"base": load_module(args.baseline)} if args.baseline else None

    orders = [o == "T" for o in args.orders.split(",")]
    nbs = [int(v) for v in args.nblocks.split(",")] if args.nblocks else ([4] if args.quick else [2, 4, 8])
    rows, notes = [], []
    if args.variants:
        notes += time_variants(*layers[0], nbs[0], orders[0])
    for perm in orders:
        for nb in nbs:
            for n_in, n_out in layers:
                use = extra if not args.baseline_layers or f"{n_in}x{n_out}" in args.baseline_layers else None
                rows.append(time_layer(n_in, n_out, nb, perm, use, args.graphs))
                print_table(rows[-1:])
    if args.breakdown:
        for perm in (True, False):
            for n_in, n_out in [(1024, 4096), (4096, 1024), (1024, 1024), (4096, 16384)]:
                for path, mm in (("fused", fused.monarch_multiply_fused),
                                 ("tma", triton_monarch_tma.monarch_multiply_tma), ("torch", monarch_multiply_torch)):
                    parts = kernel_breakdown(n_in, n_out, 4, perm, mm)
                    print(f"breakdown {path} {n_in}->{n_out} nb4 perm={perm}:",
                          " ".join(f"{nm}={t:.3f}" for nm, t in parts), f"sum={sum(t for _, t in parts):.3f}")
    if not args.no_mlp:
        rows.append(time_mlp())
    launches = fused.launch_diagnostics()
    print(f"\nfast launch {launches['direct_launch']}; merged launches that fell back to two: "
          f"{len(launches['merged_fallbacks'])}")
    for fb in launches["merged_fallbacks"]:
        print("fallback", fb)
    print("\n".join(notes))
    for r in rows:
        if "dense_host" in r:
            ex = " ".join(f"{k[:-7]} {r[k]:.3f}/{r[k[:-7] + '_host']:.3f}" for k in r
                          if k.endswith("_fwdbwd") and k[:-7] + "_host" in r)
            print(f"host {r['layer']:>12} {r['nblocks']} {str(r['perm']):>5} fwd+bwd/host ms: {ex}")
    print()
    print_table(rows)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "monarch_layer.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "tokens": TOKENS, "checks": checks,
                       "timings": rows, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
