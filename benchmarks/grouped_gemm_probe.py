"""Probe: how fast can one grouped block-diagonal product of a Monarch layer run on this GPU?

Times ``C[:, g*NC:(g+1)*NC] = A[:, g*K:(g+1)*K] @ B[g]^T`` (``A: (n, G*K)``, ``B: (G, NC, K)``,
``C: (n, G*NC)``, bf16) three ways, for the product shapes of the issue's layers (nblocks 4):

- ``cublas``: ``torch.bmm`` on strided views writing into ``C`` (what the torch path does);
- ``fused``: the GEMM role of the experimental fused kernel (``monarch_megatron.monarch.experimental.fused``);
- ``tma``: a persistent Triton kernel with TMA descriptors (host ``TensorDescriptor``), the tile loop
  flattened with the K loop so that one tile's loads overlap the previous tile's store; ``tma3``:
  the same with ``A`` read through a rank-3 descriptor ``(n, G*K/CH, CH)`` box ``[BM, 1, BK]``, the
  access pattern of the chunked intermediate ``u'`` (does the chunking cost anything?).

Each is timed with ``triton.testing.do_bench_cudagraph`` (a CUDA graph of the launch: GPU time, no
host overhead), checked against ``cublas`` first. One command: ``python benchmarks/grouped_gemm_probe.py``.
With ``TRITON_INTERPRET=1`` on CPU it only checks the TMA kernels at a tiny shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from monarch_megatron.monarch.experimental import fused  # noqa: E402
from monarch_megatron.monarch.triton_common import tile_coords  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# (name, G, K, NC): the products of 1024->4096 / 4096->1024 / 4096->16384 at nblocks 4.
SHAPES = [("K256 NC1024 (1024->4096 stage two, dv^T)", 4, 256, 1024),
          ("K256 NC256 (1024->4096 stage one; 1024->1024)", 4, 256, 256),
          ("K1024 NC256 (4096->1024 stage one; 1024->4096 dv)", 4, 1024, 256),
          ("K1024 NC4096 (4096->16384 stage two)", 4, 1024, 4096)]


@triton.jit
def _grouped_tma_kernel(a_desc, b_desc, c_desc, N, G, K, NC, CH,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, A3: tl.constexpr,
                        SUBTILE: tl.constexpr, NUM_SMS: tl.constexpr):
    """Persistent grouped GEMM; tiles ordered group fastest, then column tile, then token tile."""
    start = tl.program_id(0)
    n_nt = NC // BN
    n_tiles = tl.cdiv(N, BM) * n_nt * G
    k_tiles = K // BK
    tile_c = start - NUM_SMS
    for tile in tl.range(start, n_tiles, NUM_SMS, flatten=True):
        g, nt, mt = tile_coords(tile, G, n_nt)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            kk = g * K + ki * BK
            if A3:
                a = tl.reshape(a_desc.load([mt * BM, kk // CH, kk % CH]), (BM, BK))
            else:
                a = a_desc.load([mt * BM, kk])
            b = b_desc.load([g * NC + nt * BN, ki * BK])
            acc = tl.dot(a, b.T, acc)
        tile_c += NUM_SMS
        gc, ntc, mtc = tile_coords(tile_c, G, n_nt)
        out = acc.to(c_desc.dtype)
        if SUBTILE:
            o0, o1 = tl.split(tl.permute(tl.reshape(out, (BM, 2, BN // 2)), (0, 2, 1)))
            c_desc.store([mtc * BM, gc * NC + ntc * BN], o0)
            c_desc.store([mtc * BM, gc * NC + ntc * BN + BN // 2], o1)
        else:
            c_desc.store([mtc * BM, gc * NC + ntc * BN], out)


def grouped_tma(a, b, c, cfg: dict, a3_chunk: int = 0) -> None:
    """Launch the probe kernel. ``a: (n, G*K)``, ``b: (G, NC, K)``, ``c: (n, G*NC)``; ``cfg``: BM, BN,
    BK, warps, stages, SUBTILE; ``a3_chunk``: read ``A`` through the rank-3 chunked descriptor."""
    n = a.shape[0]
    G, NC, K = b.shape
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    if a3_chunk:
        a_desc = TensorDescriptor(a, [n, G * K // a3_chunk, a3_chunk], [G * K, a3_chunk, 1], [BM, 1, BK])
    else:
        a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(b.view(G * NC, K), [BN, BK])
    c_desc = TensorDescriptor.from_tensor(c, [BM, BN // 2 if cfg["SUBTILE"] else BN])
    sms = 4 if INTERPRET else torch.cuda.get_device_properties(a.device).multi_processor_count
    tiles = triton.cdiv(n, BM) * (NC // BN) * G
    _grouped_tma_kernel[(min(sms, tiles),)](
        a_desc, b_desc, c_desc, n, G, K, NC, max(a3_chunk, 1), BM=BM, BN=BN, BK=BK, A3=bool(a3_chunk),
        SUBTILE=cfg["SUBTILE"], NUM_SMS=sms, num_warps=cfg["warps"], num_stages=cfg["stages"])


def grouped_cublas(a, b, c) -> None:
    n = a.shape[0]
    G, NC, K = b.shape
    torch.bmm(a.view(n, G, K).transpose(0, 1), b.transpose(1, 2), out=c.view(n, G, NC).transpose(0, 1))


def grouped_fused(a, b, c) -> None:
    """The fused kernel's plain GEMM role (stage-one form: contiguous blocks in and out)."""
    n = a.shape[0]
    G, NC, K = b.shape
    spec = fused.launch_spec(n, False, dict(kind=1, K=K, NC=NC, G=G, a_map=(K, 0, K), c_map=(NC, 0, NC),
                                            sam=G * K, scm=G * NC, b_strides=(NC * K, 1, K)), None)
    spec.run(a, b, c, a, a, c, a.device)


CONFIGS = [dict(BM=BM, BN=BN, BK=BK, warps=w, stages=st, SUBTILE=sub)
           for (BM, BN, BK, w, st) in [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
                                       (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4)]
           for sub in (False, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    dt = torch.bfloat16
    if INTERPRET:  # correctness of the probe kernels only
        dt = torch.float32  # the interpreter's half-precision dot is wrong
        a = torch.randn(64, 2 * 32, dtype=dt)
        b = torch.randn(2, 32, 32, dtype=dt)
        ref = torch.bmm(a.view(64, 2, 32).transpose(0, 1).float(), b.float().transpose(1, 2))
        for a3 in (0, 16):
            c = torch.full((64, 64), float("nan"), dtype=dt)
            grouped_tma(a, b, c, dict(BM=16, BN=16, BK=16, warps=1, stages=1, SUBTILE=True), a3)
            err = (c.view(64, 2, 32).transpose(0, 1).float() - ref).abs().max().item()
            print("interpreted tma", "a3" if a3 else "2d", "max abs err", err)
        return
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    n = args.tokens
    results = []
    for name, G, K, NC in SHAPES:
        a = torch.randn(n, G * K, device="cuda", dtype=dt)
        b = torch.randn(G, NC, K, device="cuda", dtype=dt) / K ** 0.5
        c_ref = torch.empty(n, G * NC, device="cuda", dtype=dt)
        grouped_cublas(a, b, c_ref)
        flops = 2.0 * n * G * K * NC
        nbytes = 2.0 * (n * G * K + G * NC * K + n * G * NC)
        row = {"shape": name, "G": G, "K": K, "NC": NC, "floor_ms": max(flops / 790e12, nbytes / 3.0e12) * 1e3}
        cands = [("cublas", lambda c: grouped_cublas(a, b, c)), ("fused", lambda c: grouped_fused(a, b, c))]
        for cfg in CONFIGS:
            tag = f"{cfg['BM']}x{cfg['BN']}x{cfg['BK']}w{cfg['warps']}s{cfg['stages']}{'sub' if cfg['SUBTILE'] else ''}"
            cands.append(("tma " + tag, lambda c, cfg=cfg: grouped_tma(a, b, c, cfg)))
            if K % 64 == 0 and cfg["BK"] <= 64:
                cands.append(("tma3 " + tag, lambda c, cfg=cfg: grouped_tma(a, b, c, cfg, a3_chunk=64)))
        for cname, fn in cands:
            c = torch.full_like(c_ref, float("nan"))
            try:
                fn(c)
                torch.cuda.synchronize()
                err = ((c.float() - c_ref.float()).norm() / c_ref.float().norm()).item()
                if not err < 1e-2:
                    row[cname] = f"wrong (rel err {err:.1e})"
                    continue
                row[cname] = triton.testing.do_bench_cudagraph(lambda: fn(c), rep=50)
            except Exception as e:  # a config that does not compile here (shared memory, layout)
                row[cname] = f"error {type(e).__name__}: {str(e)[:100]}"
        results.append(row)
        times = {k: v for k, v in row.items() if isinstance(v, float) and k != "floor_ms"}
        best = min(times, key=times.get)
        print(f"\n{name}: floor {row['floor_ms']:.4f} ms ({flops / 1e9:.1f} GF, {nbytes / 1e6:.0f} MB)")
        for k, v in row.items():
            if k.startswith(("cublas", "fused", "tma")):
                print(f"  {k:34} {v if isinstance(v, str) else f'{v:.4f} ms  {flops / v / 1e9:6.0f} TFLOP/s'}")
        print(f"  best: {best} {times[best]:.4f} ms")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "grouped_gemm_probe.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "tokens": n,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
