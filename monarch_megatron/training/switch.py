"""Phase transitions inside the running job, including the Monarch -> dense switch.

The switch (reverse sparsification, DESIGN.md): the last structured (Monarch or block-diagonal)
checkpoint has already been saved by the loop; here the model is converted in memory, exactly
(:func:`monarch_megatron.parallel.densify.dense_state_dict_from_monarch`: the dense matrix of this rank's
factors in megatron's TP layout, no communication), the dense model is built from megatron-core's stock local
spec (``build_model(..., monarch=None)``), the converted weights are loaded, and a new DeepSpeed
engine is created for the new phase.

Half precision: the conversion reads the fp32 master weights from the ZeRO-1 optimizer (not the
fp16/bf16 copies the model computes with) and writes the converted fp32 weights back as the new
engine's master weights, so no precision is lost at the switch.

Optimizer state at a phase's entry (``optimizer_state``): ``fresh`` (default) starts new moments
(and a fresh loss scaler) — the only possibility across the switch, since a Monarch factor's
moments have no dense counterpart; ``keep`` (same model structure only, e.g. a sequence-length
change) reloads the optimizer state from the previous phase's last checkpoint.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from ..models import build_model, forward_step
from ..parallel.densify import dense_state_dict_from_monarch
from ..parallel.kinds import FACTOR_KINDS
from .distributed import all_reduce_mean, seed_everything
from .engine import build_engine, release
from .phases import Phase
from .step import monarch_options


def full_precision_params(engine, precision: str) -> dict[str, torch.Tensor]:
    """``{name: fp32 tensor}`` of this rank's parameters: ZeRO's fp32 masters in half precision.

    Collective under ZeRO (every rank must call it, same order).
    """
    if precision == "fp32":
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def set_master_params(engine, params: dict[str, torch.Tensor], precision: str) -> None:
    """Overwrite the fp32 master weights of a freshly built half-precision engine. Collective."""
    if precision == "fp32":
        return
    from deepspeed.utils import safe_set_full_fp32_param

    for n, p in engine.module.named_parameters():
        safe_set_full_fp32_param(p, params[n].to(torch.float32))


@torch.no_grad()
def fixed_batch_loss(engine, batch: dict[str, torch.Tensor], kind: str, dp_group) -> float:
    """Loss of ``batch`` in eval mode (no dropout), averaged over data-parallel ranks."""
    was_training = engine.module.training
    engine.module.eval()
    loss, _ = forward_step(engine.module, batch, kind)
    engine.module.train(was_training)
    return all_reduce_mean([float(loss)], dp_group)[0]


def next_phase_weights(engine, old: Phase, new: Phase, precision: str) -> dict[str, torch.Tensor]:
    """Full-precision state dict the ``new`` phase's model starts from (converted at the switch)."""
    params = full_precision_params(engine, precision)
    if old.same_structure(new):
        state = engine.module.state_dict()
        return {k: params.get(k, v) for k, v in state.items()}
    if old.kind == "monarch" and new.kind == "dense":
        factors = {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] in FACTOR_KINDS}
        dense = dense_state_dict_from_monarch(engine.module, fp32_factors=factors, dtype=torch.float32)
        # Non-Monarch parameters start from their fp32 masters (buffers / extra state as they are).
        return {k: params.get(k, v) for k, v in dense.items()}
    raise ValueError(f"unsupported transition {old.kind} -> {new.kind} (phases {old.name} -> {new.name})")


def build_phase_engine(cfg, model_cfg, phase: Phase, layout, weights: dict[str, torch.Tensor] | None):
    """Build the model and engine of ``phase``; load ``weights`` (full precision) if given."""
    seed_everything(cfg.seed)
    on_cuda = torch.cuda.is_available()  # the compiled fusions cost more than they save on CPU
    t = cfg.training
    model = build_model(model_cfg, phase.monarch, cfg.precision.dtype, monarch_options=monarch_options(cfg),
                        fused_cross_entropy=t.fused_cross_entropy, fused_bias_dropout=t.fused_bias_dropout and on_cuda,
                        fused_bias_gelu=t.fused_bias_gelu and on_cuda, compiled_norm=t.compiled_layer_norm and on_cuda,
                        fused_linear_bias=t.fused_linear_bias and on_cuda)
    if weights is not None:
        dtypes = {k: v.dtype for k, v in model.state_dict().items() if torch.is_tensor(v)}
        model.load_state_dict({k: (v.to(dtypes[k]) if torch.is_tensor(v) and k in dtypes else v)
                               for k, v in weights.items()}, strict=True)
    engine, desc = build_engine(cfg, phase, model, layout)
    if weights is not None:
        set_master_params(engine, weights, cfg.precision.dtype)
    return engine, desc


def transition(trainer, old: Phase, new: Phase) -> tuple[Any, dict[str, float] | None]:
    """Move ``trainer`` from the finished ``old`` phase to ``new``; returns (engine, switch losses).

    ``switch losses`` (``before`` / ``after`` on a fixed validation batch of the old phase) is
    given for a Monarch -> dense switch and None for other transitions.
    """
    cfg, layout = trainer.cfg, trainer.layout
    from megatron.core import parallel_state

    dp_group = parallel_state.get_data_parallel_group()
    is_switch = not old.same_structure(new)
    fixed = trainer.data(old).valid_micro_batches()[0] if is_switch else None
    before = fixed_batch_loss(trainer.engine, fixed, cfg.model.kind, dp_group) if is_switch else None
    weights = next_phase_weights(trainer.engine, old, new, cfg.precision.dtype)
    release(trainer.engine)
    trainer.engine = None
    gc.collect()
    engine, desc = build_phase_engine(cfg, trainer.model_cfg, new, layout, weights)
    del weights
    if new.optimizer_state == "keep":
        trainer.ckpt.load_optimizer_state(engine, trainer.phase_end_tag(old))
    trainer.optimizer_desc = desc
    if not is_switch:
        return engine, None
    after = fixed_batch_loss(engine, fixed, cfg.model.kind, dp_group)
    return engine, {"before": before, "after": after}
