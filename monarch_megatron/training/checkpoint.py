"""The trainer's checkpoints through DeepSpeed: save (atomic, verified), find the resume point, load
(at the layout that wrote it, or resharded to this job's), prune.

The format itself (tags, the scan, integrity records, staging, ``run_state.json``, the tensor
files) is :mod:`monarch_megatron.checkpointing`. Here: every rank writes its DeepSpeed files into
``checkpoints/.staging/<tag>/`` and flushes and hashes them; rank 0 writes ``run_state.json`` last
and renames the directory into place. A save that fails (a full disk above all) raises
:class:`CheckpointError` naming the checkpoint; its staging directory is removed and the previous
checkpoints are untouched (pruning runs only after a successful save). Resume takes the newest
checkpoint that verifies and logs, for every newer one it skips, why; directories that do not
verify are never pruned, and one in the way of a save (same tag) is moved to
``checkpoints/.invalid/`` first.

Resuming at another layout (another DP size, another ``parallel.tensor_model_parallel_size``, or
both): DeepSpeed's own load reads ZeRO-1 shards only at the layout that wrote them, so
:meth:`CheckpointManager.load_resharded` reads the checkpoint's global training state
(:mod:`monarch_megatron.checkpointing.reshard`: fp32 masters, moments, optimizer counters, loss
scaler), takes this TP rank's part, builds the engine from those masters and writes the moments
into its new ZeRO-1 partitions with DeepSpeed's ``safe_set_full_optimizer_state``.

Retention: the newest ``keep_last`` checkpoints, every phase's last checkpoint (the last Monarch
checkpoint before the switch is what ``convert_checkpoint.py`` and evaluation use) and the newest
checkpoint whose steps since the previous save all had finite losses (``"losses_finite"``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist

from ..checkpointing.errors import CheckpointFormatError
from ..checkpointing.reshard import TrainingState, read_training_state, shard_for
from ..checkpointing.run_state import RunState
from ..checkpointing.store import (
    INVALID,
    RUN_STATE,
    STAGING,
    check_files,
    checkpoint_tag,
    describe_write_error,
    file_owner,
    file_record,
    fsync_dir,
    inspect_checkpoint,
    replace_dir,
    scan_checkpoints,
    write_run_state,
)
from .distributed import Layout

logger = logging.getLogger("monarch_megatron.training")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names it (and says when the disk is full)."""


def nothing_verifies(root: str, damaged: list[tuple[str, str]]):
    """The :class:`~.schema_io.ConfigError` (``output_dir``) of a run whose checkpoints all fail to
    verify: it does not silently start again from step 0."""
    from .schema_io import ConfigError

    return ConfigError("output_dir", f"{root} holds checkpoints but none verifies ("
                       + "; ".join(f"{tag}: {why}" for tag, why in damaged) + "); the run does not restart from "
                       "step 0 over them: move them away (or use another output_dir) to start afresh")


def has_resume_point(output_dir: str) -> bool:
    """Whether a run in ``output_dir`` would resume (cheap: reads run_state.json files only)."""
    return bool(scan_checkpoints(os.path.join(output_dir, "checkpoints")).resumable)


class CheckpointManager:
    """Save / find / verify / load / prune checkpoints of one run (all ranks call save, latest and load)."""

    def __init__(self, output_dir: str, layout: Layout, keep_last: int) -> None:
        self.root = os.path.join(output_dir, "checkpoints")
        self.layout = layout
        self.keep_last = keep_last
        self._verified: set[str] = set()  # tags this manager saved or verified

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _gather(self, item: Any) -> list[Any]:
        """``item`` of every rank, in rank order (this rank's alone without a process group)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [item]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, item)
        return out

    def _mine(self, names: list[str], same_layout: bool = True) -> list[str]:
        """The files of a checkpoint this rank flushes and hashes (at a save) and verifies (at a
        resume). A checkpoint of another layout has files no rank owns: they are dealt round-robin."""
        lay = self.layout
        if not same_layout:
            return [n for i, n in enumerate(sorted(names)) if i % lay.world == lay.rank]
        return [n for n in names if file_owner(n) == (lay.dp_rank, lay.tp_rank) or (file_owner(n) is None and lay.rank == 0)]

    def same_layout(self, state: RunState) -> bool:
        """Whether ``state``'s checkpoint was written at this job's TP x DP layout (DeepSpeed's own
        load then reads it; otherwise :meth:`load_resharded`). Checkpoints without a recorded
        layout are taken to be of this one, as before the layout was recorded."""
        tp, dp = state.layout
        return tp is None or dp is None or (tp, dp) == (self.layout.tp, self.layout.dp)

    def complete(self) -> list[tuple[str, RunState]]:
        """All complete, consistent checkpoints of this run as (tag, run_state), oldest first
        (converted checkpoints excluded: they are neither resumed from nor pruned)."""
        return scan_checkpoints(self.root).resumable

    def path(self, tag: str) -> str:
        return os.path.join(self.root, tag)

    def verify(self, tag: str, state: RunState) -> str | None:
        """The first problem of checkpoint ``tag``'s recorded files (sizes and SHA-256; each rank
        hashes the files it loads), the same on every rank; None if it verifies. Collective."""
        problem = None
        if state.files is not None:
            problem = check_files(self.path(tag), state.files, self._mine(sorted(state.files), self.same_layout(state)))
        return next((p for p in self._gather(problem) if p is not None), None)

    def latest(self) -> tuple[str, RunState] | None:
        """The resume point: the newest checkpoint that verifies (None: a new run). Logs every
        checkpoint it skips, and why. Collective.

        Raises:
            ConfigError: (``output_dir``) checkpoints are there but none verifies: the run would
                start again from step 0, which is never done silently.
        """
        scan = scan_checkpoints(self.root)
        for tag in scan.converted:
            logger.warning("WARNING: skipping %s as a resume point: it is a converted checkpoint (run_state.json has "
                           "'converted_from'; no optimizer state). To start a new run from its weights, set "
                           "training.init_from=%s (with an output_dir that has no checkpoints)", self.path(tag),
                           self.path(tag))
        damaged = list(scan.damaged)
        for name, problem in scan.skipped:
            logger.warning("WARNING: skipping checkpoint %s: %s", self.path(name), problem)
        for tag, state in reversed(scan.resumable):
            problem = self.verify(tag, state)
            if problem is None:
                self._verified.add(tag)
                if damaged:
                    logger.warning("WARNING: resuming from %s, the newest checkpoint that verifies (skipped: %s)",
                                   self.path(tag), ", ".join(t for t, _ in damaged))
                return tag, state
            logger.warning("WARNING: skipping checkpoint %s: %s", self.path(tag), problem)
            damaged.append((tag, problem))
        if damaged:
            raise nothing_verifies(self.root, damaged)
        return None

    def is_saved(self, tag: str) -> bool:
        """Whether ``tag`` is a checkpoint of this run that verifies (a directory of that name that
        does not is saved over: moved aside first). Collective."""
        if tag in self._verified:
            return True
        state, problem = inspect_checkpoint(self.path(tag))
        if problem is not None or state.converted_from or self.verify(tag, state) is not None:
            return False
        self._verified.add(tag)
        return True

    def clean_staging(self) -> None:
        """Remove debris of interrupted saves (rank 0; call before the first save)."""
        if self.layout.is_logger:
            shutil.rmtree(os.path.join(self.root, STAGING), ignore_errors=True)
        self._barrier()

    def _move_aside(self, tag: str) -> None:
        """Move an existing directory ``tag`` that is not a verified checkpoint out of the way of a
        save, into ``.invalid/`` (kept for inspection, never trusted)."""
        dst = self.path(tag)
        state, problem = inspect_checkpoint(dst)
        if problem is None and (state.files is None or check_files(dst, state.files) is None):
            return  # a verified checkpoint of the same step: the save replaces it atomically
        os.makedirs(os.path.join(self.root, INVALID), exist_ok=True)
        aside = os.path.join(self.root, INVALID, f"{tag}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")
        os.replace(dst, aside)
        logger.warning("WARNING: %s was in the way of this save and is not a valid checkpoint (%s); moved to %s",
                       dst, problem or "its files do not match their record", aside)

    def save(self, engine, run_state: RunState) -> str:
        """Save ``engine`` with ``run_state`` atomically; returns the tag. Collective.

        Raises:
            CheckpointError: on every rank, when any rank failed to write (a full disk: "no space
                left on device"); nothing is renamed or pruned and the staging directory is removed.
        """
        tag = checkpoint_tag(run_state.step, run_state.phase)
        staging = os.path.join(self.root, STAGING)
        src = os.path.join(staging, tag)
        if self.layout.is_logger:
            shutil.rmtree(src, ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
        self._barrier()
        records, error = {}, None
        try:
            engine.save_checkpoint(staging, tag=tag, client_state={"run_state": run_state.to_json()}, save_latest=False)
            names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)))
            records = {n: file_record(os.path.join(src, n)) for n in self._mine(names)}
        except Exception as err:  # noqa: BLE001 - every rank must learn of it (below), then it is raised
            error = describe_write_error(err, src)
        gathered = self._gather((records, error))
        outcome = next((e for _, e in gathered if e is not None), None)
        if self.layout.is_logger and outcome is None:
            try:
                files = {n: r for recs, _ in gathered for n, r in recs.items()}
                for name in sorted(os.listdir(src)):  # what no rank claimed (none with DeepSpeed's names)
                    if name not in files and name != RUN_STATE and os.path.isfile(os.path.join(src, name)):
                        files[name] = file_record(os.path.join(src, name))
                state = run_state.replace(tag=tag, complete=True, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
                write_run_state(src, state, files)
                if os.path.lexists(self.path(tag)):
                    self._move_aside(tag)
                # re-saving a verified tag (rerun of the same step) swaps the directories atomically
                replace_dir(src, self.path(tag), os.path.join(staging, f"{tag}.old"))
                fsync_dir(self.root)
            except Exception as err:  # noqa: BLE001 - shared with the other ranks below
                outcome = describe_write_error(err, src)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        if outcome is not None:
            if self.layout.is_logger:  # this save's debris (the only save in flight)
                shutil.rmtree(staging, ignore_errors=True)
            self._barrier()
            raise CheckpointError(outcome)
        if self.layout.is_logger:
            # DeepSpeed drops its recovery scripts (zero_to_fp32.py) next to the tag: keep them
            # where DeepSpeed users expect them, in checkpoints/.
            for name in os.listdir(staging):
                if os.path.isfile(os.path.join(staging, name)):
                    os.replace(os.path.join(staging, name), os.path.join(self.root, name))
            if not os.listdir(staging):
                os.rmdir(staging)
            self.prune()
        self._barrier()
        self._verified.add(tag)
        return tag

    def load(self, engine, tag: str, load_optimizer: bool = True) -> None:
        """Load ``tag`` into ``engine`` (module; optimizer state too if ``load_optimizer``) with
        DeepSpeed's own load: the checkpoint must be of this layout (:meth:`same_layout`)."""
        try:
            path, client = engine.load_checkpoint(
                self.root, tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=False,
                load_module_only=not load_optimizer,
            )
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(f"loading checkpoint {self.path(tag)} failed: {type(err).__name__}: {first}") from err
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {self.path(tag)}")

    def load_optimizer_state(self, engine, tag: str) -> None:
        """The optimizer state of checkpoint ``tag`` (this run's, same step as ``engine``'s weights)
        into ``engine``: DeepSpeed's load at this layout, :meth:`read_resharded` otherwise (the
        checkpoint was written before a resume at another layout)."""
        state, problem = inspect_checkpoint(self.path(tag))
        if problem is not None:
            raise CheckpointError(f"loading checkpoint {self.path(tag)} failed: {problem}")
        if self.same_layout(state):
            self.load(engine, tag, load_optimizer=True)
        else:
            restore_optimizer_state(engine, self.read_resharded(tag, state))

    def read_resharded(self, tag: str, state: RunState) -> TrainingState:
        """This rank's part, at this job's TP x DP layout, of the training state of checkpoint
        ``tag`` written at another layout: hand ``.module`` to the new engine as its weights (fp32
        masters), then :func:`restore_optimizer_state`. Every rank reads the whole checkpoint.

        Raises:
            CheckpointError: a file is unreadable or inconsistent (nothing is written).
        """
        try:
            whole = read_training_state(self.path(tag), state)
            return shard_for(whole, self.layout.tp, self.layout.tp_rank)
        except CheckpointFormatError as err:
            raise CheckpointError(f"resharding checkpoint {self.path(tag)} to TP={self.layout.tp} x "
                                  f"DP={self.layout.dp} failed: {err}") from None

    def prune(self) -> None:
        """Delete old checkpoints beyond ``keep_last``; phase-end checkpoints and the newest one
        saved with finite losses are kept (so are directories that do not verify: never deleted)."""
        found = self.complete()
        keep = {tag for tag, _ in found[-self.keep_last:]}
        keep |= {tag for tag, state in found if state.phase_end}
        finite = [tag for tag, state in found if state.losses_finite]
        keep |= set(finite[-1:])
        for tag, _ in found:
            if tag not in keep:
                shutil.rmtree(self.path(tag), ignore_errors=True)
                logger.info("removed checkpoint %s (training.keep_last=%d keeps the newest %d, every phase's last "
                            "and the newest with finite losses)", self.path(tag), self.keep_last, self.keep_last)


def restore_optimizer_state(engine, state: TrainingState) -> None:
    """Write a resharded ``state`` (:meth:`CheckpointManager.read_resharded`) into a freshly built
    ZeRO-1 ``engine`` whose weights and fp32 masters are already ``state.module``: the moments
    (through DeepSpeed's public ``safe_set_full_optimizer_state``, which writes the part of each
    parameter that this DP rank's partition holds), the optimizer's counters, the loss scaler and
    DeepSpeed's engine counters. Local: no communication.
    """
    from deepspeed.utils import safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    inner = zero.optimizer
    if state.moments:
        # The inner optimizer's state of each flat partition (zero moments and the counters),
        # through torch's load_state_dict, which puts each entry where the optimizer keeps it (a
        # fused AdamW's step on the device, ...); then linked to the parameters' fragments, as
        # DeepSpeed does lazily at the first step, and filled through them.
        groups = inner.state_dict()["param_groups"]
        partitions = {g["params"][0]: flat["params"][0] for g, flat in zip(groups, inner.param_groups)}
        inner.load_state_dict({"param_groups": groups, "state": {
            index: {**{k: torch.zeros_like(flat) for k in state.moments},
                    # a copy per partition: torch's AdamW counts its step tensor up in place
                    **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.counters.items()}}
            for index, flat in partitions.items()}})
        for i, group in enumerate(inner.param_groups):
            lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], group["params"][0], inner.state)
        device = inner.param_groups[0]["params"][0].device
        for name, param in engine.module.named_parameters():
            for key, values in state.moments.items():
                safe_set_full_optimizer_state(param, values[name].to(device=device, dtype=torch.float32), key)
    if state.loss_scaler is not None:
        zero.loss_scaler = state.loss_scaler  # what DeepSpeed's own load does (stage_1_and_2._load_global_state)
    for key, value in state.engine_counters.items():
        setattr(engine, key, value)
