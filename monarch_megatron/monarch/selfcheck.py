"""``python -m monarch_megatron.monarch.selfcheck``: exactness of multiply, to_dense and projection."""

from __future__ import annotations

import torch

from . import MonarchLinear, monarch_to_dense, project_to_monarch


def main() -> int:
    torch.manual_seed(0)
    worst = 0.0
    for in_f, out_f, nblocks in [(1024, 4096, 4), (4096, 1024, 4), (1024, 1024, 8), (30, 50, 4)]:
        layer = MonarchLinear(in_f, out_f, nblocks, dtype=torch.float64)
        x = torch.randn(16, in_f, dtype=torch.float64)
        dense = layer.to_dense()
        fwd = ((layer(x) - x @ dense.t() - layer.bias).norm() / layer(x).norm()).item()
        w1, w2 = project_to_monarch(dense, nblocks)
        proj = ((monarch_to_dense(w1, w2, in_f, out_f) - dense).norm() / dense.norm()).item()
        worst = max(worst, fwd, proj)
        print(f"{layer}\n  forward vs to_dense: {fwd:.1e}   projection round trip: {proj:.1e}")
    ok = worst < 1e-10
    print("selfcheck:", "OK" if ok else "FAILED", f"(worst relative error {worst:.1e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
