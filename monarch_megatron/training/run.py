"""Entry point used by the launchers: runtime checks, process groups, logging, the Trainer."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .config import RunConfig
from .schema_io import ConfigError


def check_resume_layout(cfg: RunConfig, world_size: int) -> None:
    """A run resumes only at the parallel layout that wrote its checkpoint: DeepSpeed keeps one ZeRO-1
    optimizer shard per data-parallel rank and one model file per tensor-parallel rank."""
    from .checkpoint import scan_checkpoints

    resumable, _ = scan_checkpoints(os.path.join(cfg.output_dir, "checkpoints"))
    if not resumable:
        return
    tag, state = resumable[-1]
    tp = cfg.parallel.tensor_model_parallel_size
    was = (state.get("tensor_model_parallel_size"), state.get("data_parallel_size"))
    now = (tp, world_size // tp)
    if None in was or was == now:
        return
    path = os.path.join(cfg.output_dir, "checkpoints", tag)
    raise ConfigError(
        "parallel",
        f"checkpoint {path} was written by TP={was[0]} x DP={was[1]} processes, but this job is TP={now[0]} x "
        f"DP={now[1]} (world size {world_size}); its ZeRO-1 optimizer shards load only at the layout that wrote "
        f"them. Resume with {was[0] * was[1]} processes and parallel.tensor_model_parallel_size={was[0]}, or start "
        f"a new output_dir from its weights with fresh optimizer moments: launcher/convert_checkpoint.py --input "
        f"{path} --output NEW --to {state.get('phase_kind')} --tensor-parallel {tp}, then training.init_from=NEW",
    )


def check_runtime(cfg: RunConfig) -> None:
    """Config problems that depend on the machine (still before any process group)."""
    if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision.dtype", "fp16 needs a GPU (DeepSpeed's fp16 optimizer); use bf16 or fp32 on CPU")
    check_resume_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.training.init_from:
        from .checkpoint import has_resume_point
        from .init_from import check_init_from

        if not has_resume_point(cfg.output_dir):  # resuming ignores init_from (the Trainer says so)
            check_init_from(cfg)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` in this process (one rank of the job); returns the Trainer's summary."""
    check_runtime(cfg)
    from .distributed import init_distributed, shutdown
    from .loop import Trainer
    from .metrics import setup_logging

    layout = init_distributed(cfg.parallel.tensor_model_parallel_size)
    os.makedirs(cfg.output_dir, exist_ok=True)
    setup_logging(cfg.output_dir, layout.is_logger)
    try:
        # All GPU work of the run on one stream of its own, never the legacy default stream: CUDA
        # graphs are captured on it (training/step.py says why).
        with torch.cuda.stream(torch.cuda.Stream()) if torch.cuda.is_available() else contextlib.nullcontext():
            return Trainer(cfg, layout).run()
    finally:
        shutdown()
