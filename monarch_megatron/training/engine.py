"""The DeepSpeed engine of one phase: ZeRO stage 1, precision, clipping, accumulation, optimizer.

Precision contract ("AMP O2", DESIGN.md): ``fp16`` = half-precision model and activations, fp32
master weights inside the partitioned ZeRO-1 optimizer, dynamic loss scaling; ``bf16`` the same
without loss scaling; ``fp32`` everything in fp32. The learning rate is set by the training loop
at every step from :mod:`.schedule` (a pure function of the step), so DeepSpeed gets no scheduler.
"""

from __future__ import annotations

import logging
from typing import Any

import deepspeed
import torch

from .config import RunConfig
from .distributed import Layout, MegatronMPU
from .optim import build_optimizer
from .phases import Phase

logger = logging.getLogger(__name__)


def deepspeed_config(cfg: RunConfig, phase: Phase, layout: Layout) -> dict[str, Any]:
    """The DeepSpeed JSON config of ``phase`` (batch sizes per DP rank, ZeRO-1, precision)."""
    p = cfg.precision
    ds: dict[str, Any] = {
        "train_batch_size": phase.global_batch_size,
        "train_micro_batch_size_per_gpu": phase.micro_batch_size,
        "gradient_accumulation_steps": phase.grad_accumulation(layout.dp),
        "gradient_clipping": phase.optimizer.grad_clip,
        # step() is the accumulation boundary (it reduces and applies whatever gradients the
        # micro-steps accumulated), so the loop calls it once per optimizer step and the fast
        # path can accumulate gradients outside engine.backward (training/step.py).
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": 1},
        # torch's AdamW / ZeroLamb are not in DeepSpeed's list; ZeroLamb is written for ZeRO partitions.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if p.dtype == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": p.initial_loss_scale_power,
                      "loss_scale_window": p.loss_scale_window, "hysteresis": p.hysteresis,
                      "min_loss_scale": p.min_loss_scale}
    elif p.dtype == "bf16":
        # No overflow check: bf16 has no loss scale to back off, and the check reads a device
        # value at the start of every step(), which keeps the host from issuing the step's
        # per-parameter work while the GPU still runs the micro-steps. Non-finite losses and
        # gradient norms are caught by the loop's guard.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    return ds


def build_engine(cfg: RunConfig, phase: Phase, model: torch.nn.Module, layout: Layout):
    """Wrap ``model`` (already in the phase precision) in a DeepSpeed engine with its optimizer.

    Returns:
        ``(engine, description)``; ``engine.optimizer`` is DeepSpeed's ZeRO-1 optimizer around ours.
    """
    from megatron.core import parallel_state

    o = phase.optimizer
    optimizer, desc = build_optimizer(
        model, o.name, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
        dp_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, phase, layout), mpu=MegatronMPU(),
        dist_init_required=False,
    )
    if hasattr(optimizer, "attach_zero_layout"):
        optimizer.attach_zero_layout(engine.optimizer, layout.dp_rank)
    overflow_from_grad_norm(engine)
    return engine, desc


def overflow_from_grad_norm(engine) -> bool:
    """fp16: let DeepSpeed's ZeRO optimizer detect gradient overflow from the global gradient norm
    it computes anyway, instead of a separate pass over every gradient first. Returns whether it did.

    DeepSpeed 0.19.8 turns ``check_grad_overflow`` on for every fp16 ZeRO run (there is no config
    key for it, unlike bf16's). The check costs two reductions and ~5 small ops per gradient tensor
    (~2,500 launches per BERT-large step) and a host read of the result. With it off,
    ``DeepSpeedZeroOptimizer.step`` declares overflow when the gradient norm is not finite (``not
    bf16`` branch), and one inf or NaN anywhere makes that norm non-finite on every rank (it is
    summed over the data- and tensor-parallel groups): the same steps are skipped, with the same
    loss-scale update (tests/test_fp16_overflow.py, on a GPU). Left alone where the norm is not
    computed (``compute_grad_norm`` off) or the attribute is missing (another DeepSpeed).
    """
    zero = engine.optimizer
    if not (engine.fp16_enabled() and getattr(zero, "check_grad_overflow", False)
            and getattr(zero, "compute_grad_norm", False)):
        return False
    zero.check_grad_overflow = False
    return True


def set_learning_rate(engine, lr: float) -> None:
    """Write ``lr`` into every parameter group (DeepSpeed's wrapper and the inner optimizer)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    inner = getattr(engine.optimizer, "optimizer", None)
    if inner is not None:
        for group in inner.param_groups:
            group["lr"] = lr


def loss_scale(engine) -> float:
    """Current dynamic loss scale (1.0 without fp16)."""
    try:
        return float(engine.optimizer.cur_scale) if engine.fp16_enabled() else 1.0
    except AttributeError:
        return 1.0


def grad_norm(engine) -> torch.Tensor | float | None:
    """Global gradient norm of the last step (before clipping), or None if unknown. A tensor stays
    on the device (reading it would wait for the step to finish)."""
    value = engine.get_global_grad_norm()
    if value is None or torch.is_tensor(value):
        return value
    return float(value)


def hand_over_gradients(engine, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Make ``grads`` (summed over the step's micro-batches and scaled as ``engine.backward``
    scales them) the gradients the next ``engine.step()`` reduces and applies.

    DeepSpeed's ZeRO-1 prepares its reduction buckets from per-parameter hooks that fire inside
    autograd's gradient accumulation (``process_gradients`` -> ``setup_buckets``). The fast path
    accumulates outside it (training/step.py), so that one piece of the hooks' work is done here.
    """
    for p, g in zip(params, grads):
        p.grad = g
    optimizer = engine.optimizer
    if hasattr(optimizer, "setup_buckets"):
        optimizer.setup_buckets()


def release(engine) -> None:
    """Drop an engine's references so its memory can be reclaimed before the next phase's engine."""
    try:
        engine.destroy()
    except Exception:  # older/newer DeepSpeed without destroy(): references are dropped anyway
        pass
