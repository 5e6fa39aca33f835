"""Atomic, resumable checkpoints under ``<output_dir>/checkpoints/<tag>/`` via DeepSpeed save/load.

Layout of one checkpoint (``tag = step<NNNNNNN>-<phase name>``)::

    checkpoints/<tag>/mp_rank_XX_model_states.pt             DeepSpeed (module, per TP rank)
    checkpoints/<tag>/zero_pp_rank_D_mp_rank_XX_optim_states.pt  DeepSpeed (ZeRO-1 shard per DP rank)
    checkpoints/<tag>/run_state.json                          ours, human readable

Atomicity: every rank writes into ``checkpoints/.staging/<tag>/``; after a barrier rank 0 writes
``run_state.json`` (``"complete": true``), fsyncs and renames the directory into
``checkpoints/``. A directory in ``checkpoints/`` whose name does not start with ``.`` therefore
always holds a complete checkpoint; a crash mid-save leaves only ``.staging`` debris, which the
next run deletes. Resume picks the complete checkpoint with the highest (step, phase index).

Converted checkpoints (``launcher/convert_checkpoint.py`` marks their ``run_state.json`` with
``converted_from``; they hold no optimizer state) are never resume points, even when copied into a
run's ``checkpoints/``: the scan skips them with a warning. Start a new run from one with
``training.init_from`` (:mod:`.init_from`).

Retention: the newest ``keep_last`` checkpoints, plus every phase's last checkpoint (the last
Monarch checkpoint before the switch is what ``convert_checkpoint.py`` and evaluation use).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import torch.distributed as dist

from .distributed import Layout

STAGING = ".staging"
RUN_STATE = "run_state.json"

logger = logging.getLogger("monarch_megatron.training")


def checkpoint_tag(step: int, phase_name: str) -> str:
    return f"step{step:07d}-{phase_name}"


def read_run_state(ckpt_dir: str) -> dict[str, Any] | None:
    """``run_state.json`` of a checkpoint directory if it is complete, else None."""
    try:
        with open(os.path.join(ckpt_dir, RUN_STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if state.get("complete") else None


def scan_checkpoints(root: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """``(resumable, converted)`` under the checkpoints directory ``root``.

    ``resumable``: the complete checkpoints the run wrote, as (tag, run_state), oldest first.
    ``converted``: tags of complete checkpoints marked ``converted_from`` (never resume points).
    """
    if not os.path.isdir(root):
        return [], []
    found, converted = [], []
    for tag in sorted(os.listdir(root)):
        if tag.startswith("."):
            continue
        state = read_run_state(os.path.join(root, tag))
        if state is None:
            continue
        if state.get("converted_from"):
            converted.append(tag)
        else:
            found.append((tag, state))
    return sorted(found, key=lambda ts: (ts[1]["step"], ts[1]["phase_index"])), converted


def has_resume_point(output_dir: str) -> bool:
    """Whether a run in ``output_dir`` would resume (cheap: reads run_state.json files only)."""
    return bool(scan_checkpoints(os.path.join(output_dir, "checkpoints"))[0])


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_run_state(ckpt_dir: str, state: dict[str, Any]) -> None:
    """Write ``run_state.json`` into ``ckpt_dir`` and flush it and the directory to disk."""
    with open(os.path.join(ckpt_dir, RUN_STATE), "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(ckpt_dir)


def replace_dir(src: str, dst: str, aside: str) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` is first moved to ``aside`` and then
    deleted, so ``dst`` is at every moment either the old or the new directory, whole."""
    if os.path.lexists(dst):
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


class CheckpointManager:
    """Save / find / load / prune checkpoints of one run (all ranks call save and load)."""

    def __init__(self, output_dir: str, layout: Layout, keep_last: int) -> None:
        self.root = os.path.join(output_dir, "checkpoints")
        self.layout = layout
        self.keep_last = keep_last

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def complete(self) -> list[tuple[str, dict[str, Any]]]:
        """All complete checkpoints of this run as (tag, run_state), oldest first (converted
        checkpoints excluded: they are neither resumed from nor pruned)."""
        return scan_checkpoints(self.root)[0]

    def latest(self) -> tuple[str, dict[str, Any]] | None:
        """The resume point (None: a new run); warns about converted checkpoints it skips."""
        found, converted = scan_checkpoints(self.root)
        for tag in converted:
            logger.warning("WARNING: skipping %s as a resume point: it is a converted checkpoint (run_state.json has "
                           "'converted_from'; no optimizer state). To start a new run from its weights, set "
                           "training.init_from=%s (with an output_dir that has no checkpoints)", self.path(tag),
                           self.path(tag))
        return found[-1] if found else None

    def path(self, tag: str) -> str:
        return os.path.join(self.root, tag)

    def clean_staging(self) -> None:
        """Remove debris of interrupted saves (rank 0; call before the first save)."""
        if self.layout.is_logger:
            shutil.rmtree(os.path.join(self.root, STAGING), ignore_errors=True)
        self._barrier()

    def save(self, engine, run_state: dict[str, Any]) -> str:
        """Save ``engine`` with ``run_state`` atomically; returns the tag. Collective."""
        tag = checkpoint_tag(run_state["step"], run_state["phase"])
        staging = os.path.join(self.root, STAGING)
        if self.layout.is_logger:
            shutil.rmtree(os.path.join(staging, tag), ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
        self._barrier()
        engine.save_checkpoint(staging, tag=tag, client_state={"run_state": run_state}, save_latest=False)
        self._barrier()
        if self.layout.is_logger:
            src = os.path.join(staging, tag)
            state = {**run_state, "tag": tag, "complete": True, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_run_state(src, state)
            # re-saving a tag (rerun of the same step) swaps the directories atomically
            replace_dir(src, self.path(tag), os.path.join(staging, f"{tag}.old"))
            fsync_dir(self.root)
            # DeepSpeed drops its recovery scripts (zero_to_fp32.py) next to the tag: keep them
            # where DeepSpeed users expect them, in checkpoints/.
            for name in os.listdir(staging):
                if os.path.isfile(os.path.join(staging, name)):
                    os.replace(os.path.join(staging, name), os.path.join(self.root, name))
            if not os.listdir(staging):
                os.rmdir(staging)
            self.prune()
        self._barrier()
        return tag

    def load(self, engine, tag: str, load_optimizer: bool = True) -> dict[str, Any]:
        """Load ``tag`` into ``engine`` (module; optimizer state too if ``load_optimizer``)."""
        path, client = engine.load_checkpoint(
            self.root, tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=False,
            load_module_only=not load_optimizer,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.path(tag)}")
        return (client or {}).get("run_state", {})

    def prune(self) -> None:
        """Delete old checkpoints beyond ``keep_last`` (phase-end checkpoints are kept)."""
        found = self.complete()
        recent = {tag for tag, _ in found[-self.keep_last:]}
        for tag, state in found:
            if tag not in recent and not state.get("phase_end"):
                shutil.rmtree(self.path(tag), ignore_errors=True)
