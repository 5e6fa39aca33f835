"""Optimizers: LAMB (the paper's BERT recipe) and AdamW, in forms that are correct under ZeRO-1.

ZeRO stage 1 hands the inner optimizer, per parameter group, one flat fp32 *partition* (1/DP of the
group's parameters, flattened and padded) instead of the parameters. That is harmless for AdamW
(elementwise), but LAMB's trust ratio ``||w|| / ||update||`` is per parameter *tensor*, and a fused
LAMB kernel given the flat partition would compute one ratio for the whole partition: wrong at any
DP size. :class:`ZeroLamb` therefore learns the partition layout from DeepSpeed once
(:meth:`ZeroLamb.attach_zero_layout`: which slice of the flat partition belongs to which tensor),
computes per-segment norms with one multi-tensor ``torch._foreach_norm`` over views of the
segments, sums their squares per tensor over the data-parallel group (and over the TP group for
tensor-parallel parameters) and scales the update per segment. That is exactly single-device LAMB
at any TP x DP, with no host synchronisation. (``torch.segment_reduce`` and ``repeat_interleave``,
the first version, took ~20 ms of a BERT-large step's GPU time on an H200: cub's segmented
reduction is slow for ~400 segments of very different lengths; benchmarks/RESULTS.md, issue 11.) (One parameter group per tensor would also be correct, but DeepSpeed's per-group overhead
made BERT-large steps 8x slower on an H200.)

Choice of implementation:
* AdamW: DeepSpeed's FusedAdam on GPU (torch's fused AdamW if the op cannot be built), torch's AdamW
  on CPU.
* LAMB: :class:`ZeroLamb` (torch ops, CPU and GPU). apex's FusedLAMB / DeepSpeed's FusedLamb are
  not used: under ZeRO they see flat partitions (see above).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def lamb_direction(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, w: torch.Tensor, step,
                   beta1: float, beta2: float, eps: float, weight_decay: float) -> torch.Tensor:
    """LAMB's moments and update direction, elementwise: ``m``, ``v`` (fp32, like ``g``) are
    updated in place; returns ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w``.

    ``step`` (>= 1) is a number, or a 0-d float64 device tensor for :func:`compiled_lamb_direction`
    (a number there would be compiled in as a constant: one recompilation per step).
    """
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    u = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    return u + weight_decay * w if weight_decay else u


@functools.lru_cache(maxsize=None)
def compiled_lamb_direction():
    """:func:`lamb_direction` as one generated kernel (reads ``g, m, v, w`` once, writes ``m, v,
    u``: 7 passes over the partition instead of ~20 for the op-by-op chain; on an H200 the chain
    took 11-16 ms of a BERT-large fp16 step). Shape-generic, so both parameter groups and both
    phases share one compilation per set of constants."""
    return torch.compile(lamb_direction, dynamic=True, fullgraph=True)


class ZeroLamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, bias correction, decoupled weight decay) with per-tensor trust ratios.

    Update per tensor ``w``: ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
    ``u = m_hat / (sqrt(v_hat) + eps) + wd w``; ``w -= lr * (||w|| / ||u||) * u`` (ratio 1 when either
    norm is 0). Without a ZeRO layout every parameter in a group is its own tensor. With one
    (:meth:`attach_zero_layout`) each group holds one flat partition whose segments are slices of
    the model's tensors (or padding); norms are of the global tensors (module docstring).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, dp_group=None, tp_group=None, compiled: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.compiled = compiled  # CUDA tensors only: the elementwise part as one compiled kernel
        self.dp_group = dp_group
        self.tp_group = tp_group
        # Segment layout per flat partition, keyed by the partition tensor: DeepSpeed steps one
        # group at a time (it swaps ``param_groups`` to a one-group list), so indices are unreliable.
        self.layouts: dict[int, dict] | None = None

    def attach_zero_layout(self, zero_optimizer, dp_rank: int) -> None:
        """Record, per group, the segments of this rank's flat partition (DeepSpeed ZeRO-1/2).

        The flat buffer of group ``i`` is the group's tensors in ``round_robin_bit16_groups[i]``
        order, each followed by its alignment padding, then group padding; rank ``d`` owns
        ``[d * partition_size, (d + 1) * partition_size)``.
        """
        layouts = {}
        for i, group in enumerate(self.param_groups):
            params = zero_optimizer.round_robin_bit16_groups[i]
            pads = getattr(zero_optimizer, "round_robin_bit16_padding", [[0] * len(params)] * (i + 1))[i]
            size = zero_optimizer.partition_size[i]
            start, end = dp_rank * size, (dp_rank + 1) * size
            lengths, owners, cur = [], [], 0
            for j, (p, pad) in enumerate(zip(params, pads)):
                for a, b, owner in ((cur, cur + p.numel(), j), (cur + p.numel(), cur + p.numel() + pad, -1)):
                    lo, hi = max(a, start), min(b, end)
                    if hi > lo:
                        lengths.append(hi - lo)
                        owners.append(owner)
                cur += p.numel() + pad
            if sum(lengths) < size:
                lengths.append(size - sum(lengths))
                owners.append(-1)
            flat = group["params"][0]
            if len(group["params"]) != 1 or flat.numel() != size:
                raise RuntimeError("unexpected ZeRO partition layout (DeepSpeed internals changed?)")
            dev = flat.device
            layouts[id(flat)] = {
                "lengths": lengths,
                "owners": torch.tensor([o if o >= 0 else len(params) for o in owners], device=dev),
                "n": len(params),
                "tp": torch.tensor([bool(getattr(p, "tensor_model_parallel", False)) for p in params], device=dev),
            }
        self.layouts = layouts

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch API)
        loss = closure() if closure is not None else None
        work = []  # (group, param, update, segment lengths, segment owners, n tensors, tp flags)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                g, w = p.grad.float(), p.float()
                if self.compiled and p.is_cuda:
                    # The step as a device scalar (a fill kernel: no host-to-device copy, no sync).
                    # float64: 1 - 0.999**t in fp32 is off by ~5e-5 relative at small t.
                    t = torch.full((), state["step"], dtype=torch.float64, device=p.device)
                    direction = compiled_lamb_direction()
                else:
                    t, direction = state["step"], lamb_direction
                u = direction(g, state["exp_avg"], state["exp_avg_sq"], w, t, b1, b2, group["eps"],
                              group["weight_decay"])
                if self.layouts is not None:
                    lay = self.layouts[id(p)]
                    work.append((group, p, w, u, lay["lengths"], lay["owners"], lay["n"], lay["tp"]))
                else:
                    tp = torch.tensor([bool(getattr(p, "tensor_model_parallel", False))], device=p.device)
                    work.append((group, p, w, u, [p.numel()], torch.zeros(1, dtype=torch.long, device=p.device), 1, tp))
        if not work:
            return loss
        # Per-tensor partial squared norms of w and u, all tensors of all groups in one (T, 2) table
        # (one extra row per group collects padding).
        rows, offsets, total = [], [], 0
        for _, _, w, u, lengths, owners, n, _ in work:
            norms = [torch.stack(torch._foreach_norm(x.reshape(-1).split(lengths))) for x in (w, u)]
            seg = torch.stack(norms, dim=1).square_()
            rows.append(torch.zeros(n + 1, 2, dtype=seg.dtype, device=seg.device).index_add_(0, owners, seg))
            offsets.append(total)
            total += n + 1
        sq = torch.cat(rows)
        tp_mask = torch.cat([torch.cat([item[7], item[7].new_zeros(1)]) for item in work])
        self._reduce(sq, tp_mask)
        w_norm, u_norm = sq[:, 0].sqrt(), sq[:, 1].sqrt()
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        for (group, p, _, u, lengths, owners, _, _), off in zip(work, offsets):
            # One multiply per segment by its tensor's ratio (a 0-d device tensor: no host read).
            torch._foreach_mul_(u.reshape(-1).split(lengths), ratio[off + owners].unbind())
            p.add_(u.view_as(p).to(p.dtype), alpha=-group["lr"])
        return loss

    def _reduce(self, sq: torch.Tensor, tp_mask: torch.Tensor) -> None:
        if not dist.is_initialized():
            return
        if self.layouts is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(sq, group=self.dp_group)  # partitions of one tensor live on several DP ranks
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1 and bool(tp_mask.any()):
            mask = tp_mask.to(sq.dtype).unsqueeze(1)
            part = sq * mask
            dist.all_reduce(part, group=self.tp_group)
            sq.mul_(1 - mask).add_(part)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weights with decay; biases and norm weights (1-D) without."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in named if p.dim() > 1]
    no_decay = [p for _, p in named if p.dim() <= 1]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: torch.nn.Module, name: str, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, dp_group=None, tp_group=None) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer for ``model`` and a short description of which implementation was chosen."""
    on_gpu = torch.cuda.is_available()
    if name == "adamw":
        groups = param_groups(model, weight_decay)
        if on_gpu:
            try:
                from deepspeed.ops.adam import FusedAdam

                return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True), "deepspeed FusedAdam (AdamW mode)"
            except Exception as err:  # op build needs a CUDA toolchain
                logger.warning("DeepSpeed FusedAdam unavailable (%s); using torch fused AdamW", err)
                return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True), "torch AdamW (fused)"
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps), "torch AdamW"
    if name != "lamb":
        raise ValueError(f"unknown optimizer {name!r}")
    groups = param_groups(model, weight_decay)
    return (ZeroLamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, dp_group=dp_group,
                     tp_group=tp_group), "ZeroLamb (segmented per-tensor trust ratios, ZeRO/TP-aware)")
