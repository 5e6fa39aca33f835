"""Deterministic validation loss of a checkpoint (``launcher/evaluate.py``).

The model structure comes from the checkpoint's ``run_state.json`` (``monarch``: layers/nblocks,
or null for dense), so a Monarch checkpoint and its dense conversion are evaluated with their own
models; the validation data (sequence length, dataset seed) from a phase of the config:
``--phase`` (name or index), default the checkpoint's ``phase_index``. The TP size is the
checkpoint's (``tensor_model_parallel_size`` in run_state.json). Weights are read from DeepSpeed's
``mp_rank_XX_model_states.pt`` of this TP rank (no optimizer, no engine) and the loss is computed in
fp32, eval mode (no dropout). The validation samples are the ones the training run validated on:
the first ``eval_iters x micro_batch x DP`` (DP of the checkpoint's run), as ``eval_iters x DP``
micro-batches; ranks share them round-robin and the result is the exact mean over all of them, so
it does not depend on how many processes evaluate.
"""

from __future__ import annotations

import os

import torch

from ..checkpointing.errors import CheckpointFormatError
from ..checkpointing.run_state import RunState
from ..checkpointing.shards import read_model_shard
from ..checkpointing.store import check_model_files, load_run_state
from .config import RunConfig
from .schema_io import ConfigError


def _phase_index(cfg: RunConfig, state: RunState, phase: str | None) -> int:
    if phase is None:
        return state.phase_index
    names = [p.name for p in cfg.phases]
    if phase in names:
        return names.index(phase)
    if phase.isdigit() and int(phase) < len(names):
        return int(phase)
    raise ConfigError("--phase", f"no phase {phase!r}; phases are {', '.join(names)}")


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str, phase: str | None = None) -> dict[str, float]:
    """Validation losses (``loss``, ``lm loss``, ``sop loss``) of ``checkpoint``; collective."""
    from dataclasses import replace

    from ..data import load_tokenizer
    from ..models import build_model, forward_step
    from ..models.config import MonarchConfig
    from .batches import PhaseData, prepare_data
    from .distributed import all_reduce_mean, current_layout, seed_everything
    from .loop import Trainer
    from .phases import build_plan

    state = load_run_state(checkpoint)
    layout = current_layout()
    plan = build_plan(cfg)
    data_phase = plan[_phase_index(cfg, state, phase)]
    monarch = None if state.monarch is None else MonarchConfig.from_state(state.monarch)
    model_cfg = Trainer.model_config(cfg)
    seed_everything(cfg.seed)
    model = build_model(model_cfg, monarch, "fp32")
    weights = read_model_shard(checkpoint, layout.tp_rank)
    dtypes = {k: v.dtype for k, v in model.state_dict().items() if torch.is_tensor(v)}
    model.load_state_dict({k: v.to(dtypes[k]) if torch.is_tensor(v) and k in dtypes else v
                           for k, v in weights.items()}, strict=True)
    model.eval()
    source = prepare_data(cfg)
    run_dp = state.data_parallel_size or layout.dp
    data = PhaseData(cfg, replace(data_phase, steps=1), replace(layout, dp=run_dp, dp_rank=0), source,
                     load_tokenizer(source.tokenizer_model))
    micro = data_phase.micro_batch_size
    n_micro = cfg.training.eval_iters * run_dp
    sums: dict[str, float] = {}
    with torch.no_grad():
        for j in range(layout.dp_rank, n_micro, layout.dp):
            batch = torch.utils.data.default_collate([data.valid[i] for i in range(j * micro, (j + 1) * micro)])
            loss, values = forward_step(model, batch, cfg.model.kind)
            for k, v in {"loss": loss, **values}.items():
                sums[k] = sums.get(k, 0.0) + float(v)  # a sync per micro-batch: evaluation is not the hot path
    from megatron.core import parallel_state

    keys = sorted(sums)
    # Sum over DP ranks, then divide by the number of micro-batches: the exact mean at any DP.
    means = all_reduce_mean([sums[k] for k in keys], parallel_state.get_data_parallel_group())
    return {k: m * layout.dp / n_micro for k, m in zip(keys, means)}


def evaluate(cfg: RunConfig, checkpoint: str, phase: str | None = None) -> dict[str, float]:
    """Set up process groups, evaluate, tear down (the launcher's entry point)."""
    from .distributed import init_distributed, shutdown

    if not os.path.isfile(os.path.join(checkpoint, "run_state.json")):
        raise ConfigError("--checkpoint", f"{checkpoint} is not a checkpoint directory (no run_state.json)")
    try:
        state = load_run_state(checkpoint)
    except CheckpointFormatError as err:
        raise ConfigError("--checkpoint", str(err)) from None
    tp = state.tensor_model_parallel_size or cfg.parallel.tensor_model_parallel_size
    problem = check_model_files(checkpoint, state)  # sizes and SHA-256 recorded at the save
    if problem:
        raise ConfigError("--checkpoint", f"{checkpoint} does not verify: {problem}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise ConfigError("--checkpoint", f"the checkpoint has tensor_model_parallel_size={tp}; run evaluate.py "
                          f"with a multiple of {tp} processes (torchrun --nproc_per_node {tp}), not {world}")
    init_distributed(tp)
    try:
        return evaluate_checkpoint(cfg, checkpoint, phase)
    finally:
        shutdown()
