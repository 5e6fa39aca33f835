"""Entry point used by the launchers: runtime checks, process groups, logging, the Trainer."""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import RunConfig
from .schema_io import ConfigError


def check_runtime(cfg: RunConfig) -> None:
    """Config problems that depend on the machine (still before any process group)."""
    if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision.dtype", "fp16 needs a GPU (DeepSpeed's fp16 optimizer); use bf16 or fp32 on CPU")
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
        return Trainer(cfg, layout).run()
    finally:
        shutdown()
