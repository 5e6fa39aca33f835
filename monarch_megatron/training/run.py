"""Entry point used by the launchers: checks before any work, the run lock, process groups, logging,
the Trainer.

Order of a start (``train``): :func:`preflight` (every check that needs no process group, no model
and no data read: the machine, the data files and tokenizer, the resume point against the config,
``init_from``; it writes nothing, and ``--dry-run`` runs it too), then on rank 0 the run lock of
``output_dir`` (:mod:`.runlock`) and the removal of ``checkpoints/.staging`` debris, before anything
else is written; then the process groups and the Trainer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import torch

from .config import RunConfig, launch_world_size
from .schema_io import ConfigError


def check_resume_layout(cfg: RunConfig, world_size: int) -> str | None:
    """A resume at another TP x DP layout than the one that wrote the resume point reshards it
    (training/checkpoint.py): here, before any work, only that the checkpoint has every file of
    the layout it records. Returns a line describing the change (None: the same layout, or none
    recorded, or no checkpoint).

    Raises:
        ConfigError: (``parallel``) a model or optimizer file of the checkpoint's layout is missing.
    """
    from ..checkpointing.reshard import saved_data_parallel_size
    from ..checkpointing.shards import MODEL_FILE, OPTIM_FILE, optimizer_files
    from ..checkpointing.store import scan_checkpoints

    resumable = scan_checkpoints(os.path.join(cfg.output_dir, "checkpoints")).resumable
    if not resumable:
        return None
    tag, state = resumable[-1]
    path = os.path.join(cfg.output_dir, "checkpoints", tag)
    tp = cfg.parallel.tensor_model_parallel_size
    was_tp, was_dp = state.tensor_model_parallel_size, saved_data_parallel_size(path, state)
    if was_tp is None or (was_tp, was_dp) == (tp, world_size // tp):
        return None
    have = optimizer_files(path)
    missing = [MODEL_FILE.format(t) for t in range(was_tp) if not os.path.isfile(os.path.join(path, MODEL_FILE.format(t)))]
    missing += [OPTIM_FILE.format(d, t) for t in range(was_tp) for d in range(was_dp) if (d, t) not in have]
    if missing:
        raise ConfigError("parallel", f"checkpoint {path} was written by TP={was_tp} x DP={was_dp} processes, and "
                          f"resharding it to TP={tp} x DP={world_size // tp} needs all their files, but "
                          f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} is missing")
    return (f"resuming from checkpoint {path}, written by TP={was_tp} x DP={was_dp} processes, at TP={tp} x "
            f"DP={world_size // tp}: its weights, optimizer state, step and data position are resharded")


def check_resume_model(cfg: RunConfig) -> None:
    """The run's resume point holds the model this config builds (sizes, and the structure of the
    phase it resumes in), and there is one when checkpoints are there.

    Raises:
        ConfigError: (``model``) naming every differing size; (``phases[i]...``) another phase
            structure; (``output_dir``) checkpoints that all fail to verify.
    """
    from ..checkpointing.store import scan_checkpoints
    from .checkpoint import nothing_verifies
    from .init_from import model_differences
    from .phases import build_plan

    root = os.path.join(cfg.output_dir, "checkpoints")
    scan = scan_checkpoints(root)
    if not scan.resumable:
        if scan.damaged:
            raise nothing_verifies(root, scan.damaged)
        return
    tag, state = scan.resumable[-1]
    path = os.path.join(root, tag)
    differences = model_differences(state.model, cfg)
    if differences:
        raise ConfigError("model", f"resuming from checkpoint {path}, which holds another model: {'; '.join(differences)}. "
                          "Resume with the model it was written with, or start a new output_dir (training.init_from "
                          "carries weights only between equal models)")
    plan = build_plan(cfg)
    i = state.phase_index
    if i >= len(plan):
        raise ConfigError("phases", f"checkpoint {path} is in phase {i} ({state.phase!r}) but this config has "
                          f"{len(plan)} phase(s)")
    phase = plan[i]
    mon = state.monarch
    have = None if mon is None else (mon.get("kind", "monarch"), sorted(mon.get("layers") or []), mon.get("nblocks"))
    want = None if phase.monarch is None else (phase.monarch.kind, sorted(phase.monarch.layers), phase.monarch.nblocks)
    if have != want:
        raise ConfigError(f"phases[{i}].monarch", f"checkpoint {path} was written by phase {state.phase!r} with "
                          f"monarch {mon}, but phases[{i}] ({phase.name!r}) of this config is "
                          f"{'dense' if want is None else f'{want[0]} layers={want[1]} nblocks={want[2]}'}")
    if state.step > phase.end:
        raise ConfigError("training.total_steps", f"checkpoint {path} is at step {state.step}, past the end of "
                          f"phases[{i}] ({phase.name!r}, step {phase.end}) in this config")


def preflight(cfg: RunConfig, dry_run: bool = False) -> None:
    """Every check that needs no process group, model or data read; writes nothing.

    ``dry_run``: the planning case (``launcher/pretrain.py --dry-run``, any machine): the world size
    is the one the config or launcher gives (:func:`.config.launch_world_size`), and the machine
    itself (GPU for fp16, processes started) is not checked.

    Raises:
        ConfigError: one message naming the key (and file) at fault.
    """
    world = launch_world_size(cfg) if dry_run else int(os.environ.get("WORLD_SIZE", "1"))
    tp = cfg.parallel.tensor_model_parallel_size
    if not dry_run:
        if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision.dtype", "fp16 needs a GPU (DeepSpeed's fp16 optimizer); use bf16 or fp32 on CPU")
        if world % tp:
            raise ConfigError("parallel.tensor_model_parallel_size",
                              f"tensor_model_parallel_size={tp} needs a multiple of {tp} processes, but this job has "
                              f"{world} (plain python starts one: torchrun --nproc_per_node {tp} launcher/pretrain.py ...)")
    if cfg.data.source == "indexed":  # the demo source is built (and then checked) by the Trainer
        from .batches import DataSource, check_data_source

        check_data_source(cfg, DataSource(cfg.data.prefix, cfg.data.tokenizer_model))  # type: ignore[arg-type]
    check_resume_layout(cfg, world)
    check_resume_model(cfg)
    if cfg.training.init_from:
        from .checkpoint import has_resume_point
        from .init_from import check_init_from

        if not has_resume_point(cfg.output_dir):  # resuming ignores init_from (the Trainer says so)
            check_init_from(cfg)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` in this process (one rank of the job); returns the Trainer's summary.

    Raises:
        ConfigError: a check failed before any work (or another trainer holds ``output_dir``).
        NonFiniteError: the run went non-finite (nothing saved after it).
        CheckpointError: a checkpoint could not be written (e.g. the disk is full).
    """
    preflight(cfg)
    from ..checkpointing.store import STAGING
    from .distributed import init_distributed, shutdown
    from .loop import Trainer
    from .metrics import logger, setup_logging
    from .runlock import RunLock, describe

    lock, stale = None, None
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock = RunLock(cfg.output_dir)
        stale = lock.acquire()
        # Debris of an interrupted save goes first: it may be what filled the disk.
        shutil.rmtree(os.path.join(cfg.output_dir, "checkpoints", STAGING), ignore_errors=True)
    try:
        layout = init_distributed(cfg.parallel.tensor_model_parallel_size)
        os.makedirs(cfg.output_dir, exist_ok=True)
        setup_logging(cfg.output_dir, layout.is_logger)
        if stale:
            logger.warning("WARNING: took over the stale lock %s of a trainer that is gone (%s)", lock.path,
                           describe(stale))
        # All GPU work of the run on one stream of its own, never the legacy default stream: CUDA
        # graphs are captured on it (training/step.py says why).
        with torch.cuda.stream(torch.cuda.Stream()) if torch.cuda.is_available() else contextlib.nullcontext():
            return Trainer(cfg, layout).run()
    finally:
        shutdown()
        if lock is not None:
            lock.release()
