"""ZeroLamb against an independent float64 LAMB reference, and inside DeepSpeed ZeRO-1 (flat,
padded partitions) against itself on the plain parameters; parameter groups."""

from __future__ import annotations

import copy

import deepspeed
import torch

from monarch_megatron.training.distributed import MegatronMPU, init_distributed, shutdown
from monarch_megatron.training.optim import ZeroLamb, param_groups


def lamb_reference(w: torch.Tensor, grads: list[torch.Tensor], lr: float, b1: float, b2: float, eps: float, wd: float):
    w = w.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + wd * w
        w = w - lr * (w.norm() / u.norm()) * u
    return w


def test_zero_lamb_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    w0 = [torch.randn(7, 5, generator=gen), torch.randn(3, generator=gen)]
    grads = [[torch.randn_like(w) for w in w0] for _ in range(4)]
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = ZeroLamb([{"params": params, "weight_decay": 0.01}], lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    for k, p in enumerate(params):  # each tensor has its own trust ratio
        ref = lamb_reference(w0[k], [gs[k] for gs in grads], 0.05, 0.9, 0.99, 1e-6, 0.01)
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_zero_lamb_on_zero1_flat_partitions_equals_per_tensor_lamb() -> None:
    init_distributed(1)
    try:
        torch.manual_seed(int(torch.randint(0, 2**30, ())))
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
        plain = copy.deepcopy(model)
        opt = ZeroLamb(param_groups(model, 0.01), lr=0.05)
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=MegatronMPU())
        opt.attach_zero_layout(engine.optimizer, 0)
        assert any(len(lay["lengths"]) > 2 for lay in opt.layouts.values())  # several tensors per flat partition
        ref_opt = ZeroLamb(param_groups(plain, 0.01), lr=0.05)
        for _ in range(3):
            x = torch.randn(4, 5)
            loss = engine(x).square().mean()
            engine.backward(loss)
            engine.step()
            ref_opt.zero_grad()
            plain(x).square().mean().backward()
            ref_opt.step()
        for a, b in zip(engine.module.parameters(), plain.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    finally:
        shutdown()


def test_param_groups_exclude_biases_and_norms_from_decay() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    groups = param_groups(model, 0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (3, 0.0)]


def test_compiled_lamb_direction_equals_eager() -> None:
    """The compiled elementwise part of ZeroLamb (what runs on CUDA) against the eager one, over
    three steps with the step as a 0-d float64 tensor as on the device (CPU inductor, fp32, seed 1234):
    within fp32 rounding (the generated kernel contracts multiply-adds): 1e-5 relative."""
    from monarch_megatron.training.optim import compiled_lamb_direction, lamb_direction

    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(1000, generator=gen)
    state = {name: [torch.zeros(1000), torch.zeros(1000)] for name in ("eager", "compiled")}
    for step in (1, 2, 3):
        g = torch.randn(1000, generator=gen)
        u_eager = lamb_direction(g, *state["eager"], w, step, 0.9, 0.999, 1e-6, 0.01)
        u_comp = compiled_lamb_direction()(g, *state["compiled"], w, torch.full((), step, dtype=torch.float64),
                                           0.9, 0.999, 1e-6, 0.01)
        torch.testing.assert_close(u_comp, u_eager, rtol=1e-5, atol=1e-7)
        for a, b in zip(state["compiled"], state["eager"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
