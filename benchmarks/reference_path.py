"""The torch reference Monarch path against dense, repeated, at the shapes of the authors' recorded times.

    python benchmarks/reference_path.py [--repeats 5]

For 1024->4096, 4096->1024, 1024->1024 and 4096->16384 (nblocks 4, bf16, 16384 tokens, fwd+bwd,
`triton.testing.do_bench` median), times dense `F.linear` and `monarch_multiply_torch` in both
output orders, interleaved, ``--repeats`` times, and prints the median with the min-max spread of
the repeats next to the paper authors' implementation as recorded on an H100 of this workplace
(../shared/device/README.md: same shapes, dtype, token count and timer). These layers are bound by
host-side launch overhead, so single timings move by tens of percent between runs; the spread says
how much. Writes ``$OUT/reference_path.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from monarch_megatron.monarch import monarch_factor_shapes, monarch_multiply_torch  # noqa: E402

TOKENS = 16384
# (in, out) -> (authors' fwd+bwd ms, dense fwd+bwd ms) from ../shared/device/README.md, one H100.
AUTHORS = {(1024, 4096): (0.763, 0.530), (4096, 1024): (0.573, 0.593),
           (1024, 1024): (0.737, 0.159), (4096, 16384): (4.591, 8.997)}


def fwd_bwd_ms(fn, grad: torch.Tensor, params: list[torch.Tensor]) -> float:
    def step():
        for t in params:
            t.grad = None
        fn().backward(grad)

    return do_bench(step, warmup=25, rep=200, return_mode="median")


def time_shape(n_in: int, n_out: int) -> dict[str, float]:
    dt = torch.bfloat16
    sh = monarch_factor_shapes(n_in, n_out, 4)
    x = torch.randn(TOKENS, n_in, device="cuda", dtype=dt, requires_grad=True)
    w = (torch.randn(n_out, n_in, device="cuda", dtype=dt) / math.sqrt(n_in)).requires_grad_()
    w1 = (torch.randn(sh.w1_shape, device="cuda", dtype=dt) / math.sqrt(sh.p)).requires_grad_()
    w2 = (torch.randn(sh.w2_shape, device="cuda", dtype=dt) / math.sqrt(sh.r)).requires_grad_()
    dy = torch.randn(TOKENS, n_out, device="cuda", dtype=dt)
    return {
        "dense": fwd_bwd_ms(lambda: F.linear(x, w), dy, [x, w]),
        "paper": fwd_bwd_ms(lambda: monarch_multiply_torch(x, w1, w2, True), dy, [x, w1, w2]),
        "block": fwd_bwd_ms(lambda: monarch_multiply_torch(x, w1, w2, False), dy, [x, w1, w2]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs: dict[tuple[int, int], list[dict[str, float]]] = {shape: [] for shape in AUTHORS}
    for _ in range(args.repeats):
        for shape in AUTHORS:
            runs[shape].append(time_shape(*shape))
    print(f"{torch.cuda.get_device_name(0)}, bf16, {TOKENS} tokens, nblocks 4, fwd+bwd ms: median [min-max] of "
          f"{args.repeats} repeats")
    print("| layer | dense | torch path, paper order | torch path, block-major | authors' (their run) | dense (their run) |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for (n_in, n_out), rows in runs.items():
        cell = {}
        for key in ("dense", "paper", "block"):
            vals = [r[key] for r in rows]
            cell[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        authors, authors_dense = AUTHORS[(n_in, n_out)]
        fmt = lambda c: f"{c['median']:.3f} [{c['min']:.3f}-{c['max']:.3f}]"  # noqa: E731
        print(f"| {n_in}->{n_out} | {fmt(cell['dense'])} | {fmt(cell['paper'])} | {fmt(cell['block'])} | "
              f"{authors:.3f} | {authors_dense:.3f} |")
        summary[f"{n_in}->{n_out}"] = {**cell, "authors": authors, "authors_dense": authors_dense}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "reference_path.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "repeats": args.repeats, "results": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
