"""Atomic, verified, resumable checkpoints under ``<output_dir>/checkpoints/<tag>/`` via DeepSpeed save/load.

Layout of one checkpoint (``tag = step<NNNNNNN>-<phase name>``)::

    checkpoints/<tag>/mp_rank_XX_model_states.pt             DeepSpeed (module, per TP rank)
    checkpoints/<tag>/zero_pp_rank_D_mp_rank_XX_optim_states.pt  DeepSpeed (ZeRO-1 shard per DP rank)
    checkpoints/<tag>/run_state.json                          ours, human readable

Atomicity: every rank writes into ``checkpoints/.staging/<tag>/``, then flushes (fsync) and hashes
the files it wrote; rank 0 gathers those records and writes ``run_state.json`` last (``"complete":
true`` and ``"files": {name: {"size", "sha256"}}`` for every other file), fsyncs it and renames the
directory into ``checkpoints/``. A crash mid-save leaves only ``.staging`` debris, which the next
run deletes before it writes anything else.

Integrity: a checkpoint is resumed from only if it verifies: ``run_state.json`` parses, marks the
checkpoint complete and names the step and phase its directory is named after; every recorded file
exists with its recorded size (checked by every scan) and its recorded SHA-256 (checked before a
resume, each rank hashing the files it loads; ``sha256sum`` gives the same digests). Resume takes
the newest checkpoint that verifies and logs, for every newer one it skips, why (the file named).
Directories that do not verify are never pruned; one in the way of a save (same tag) is moved to
``checkpoints/.invalid/`` first. Checkpoints written before files were recorded (no ``"files"``)
are trusted as they are.

A save that fails (a full disk above all) raises :class:`CheckpointError` naming the checkpoint and,
for a full disk, saying "no space left on device"; its staging directory is removed and the
previous checkpoints are untouched (pruning runs only after a successful save).

Converted checkpoints (``launcher/convert_checkpoint.py`` marks their ``run_state.json`` with
``converted_from``; they hold no optimizer state) are never resume points, even when copied into a
run's ``checkpoints/``: the scan skips them with a warning. Start a new run from one with
``training.init_from`` (:mod:`.init_from`).

Retention: the newest ``keep_last`` checkpoints, every phase's last checkpoint (the last Monarch
checkpoint before the switch is what ``convert_checkpoint.py`` and evaluation use) and the newest
checkpoint whose steps since the previous save all had finite losses (``"losses_finite"``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any, NamedTuple

import torch.distributed as dist

from .distributed import Layout

STAGING = ".staging"
INVALID = ".invalid"
RUN_STATE = "run_state.json"
_TAG = re.compile(r"^step(\d{7,})-(.+)$")
# Whose files are whose (DeepSpeed's names): a rank writes and loads its ZeRO shard; DP rank 0 of a
# TP rank writes that rank's model file. Anything else is rank 0's to flush and hash.
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_")
_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_CHUNK = 16 * 2**20
# A failed write with less free space than this left on its filesystem is reported as a full disk
# (torch.save reports ENOSPC as "unexpected pos ...", without errno).
_FULL_BELOW = 2**20

logger = logging.getLogger("monarch_megatron.training")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names it (and says when the disk is full)."""


def checkpoint_tag(step: int, phase_name: str) -> str:
    return f"step{step:07d}-{phase_name}"


def _sha256(f) -> str:
    """SHA-256 of the rest of the binary file ``f`` (python 3.10 has no ``hashlib.file_digest``)."""
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str) -> dict[str, Any]:
    """Flush ``path`` to disk and return ``{"size", "sha256"}`` of its bytes."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        sha = _sha256(f)
        return {"size": f.tell(), "sha256": sha}


def check_files(ckpt_dir: str, files: dict[str, Any], names: list[str] | None = None, hashes: bool = True) -> str | None:
    """The first problem of the recorded ``files`` of ``ckpt_dir`` (restricted to ``names``), naming
    the file: missing, another size, or (``hashes``) other bytes; None if they all match."""
    for name in sorted(files) if names is None else names:
        path, want = os.path.join(ckpt_dir, name), files[name]
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != want.get("size"):
            return f"{path} has {size} bytes but {want.get('size')} were saved (truncated or replaced)"
        if hashes:
            with open(path, "rb") as f:
                if _sha256(f) != want.get("sha256"):
                    return f"{path} does not match the sha256 recorded at the save (its bytes changed)"
    return None


def check_model_files(ckpt_dir: str, state: dict[str, Any]) -> str | None:
    """:func:`check_files` of the model files (``mp_rank_XX_model_states.pt``) recorded in a
    checkpoint's ``state``: what a reader of its weights alone (evaluation, ``init_from``) needs;
    None without a record."""
    files = state.get("files")
    if not isinstance(files, dict):
        return None
    return check_files(ckpt_dir, files, sorted(n for n in files if _MODEL_FILE.match(n)))


def inspect_checkpoint(ckpt_dir: str, strict: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """``(run_state, problem)`` of a checkpoint directory without reading its weights.

    ``problem`` (naming the file) when ``run_state.json`` is missing, does not parse or does not
    mark a complete checkpoint; with ``strict`` (a run's ``checkpoints/<tag>``) also when it names
    another step or phase than the directory (converted checkpoints are exempt) or a recorded file
    is missing or has another size.
    """
    path = os.path.join(ckpt_dir, RUN_STATE)
    if not os.path.isfile(path):
        return None, f"{path} is missing (not a checkpoint, or an interrupted copy)"
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        return None, f"{path} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or not state.get("complete"):
        return None, f"{path} does not mark a complete checkpoint (no \"complete\": true)"
    if not strict:
        return state, None
    if not state.get("converted_from"):
        problem = _tag_problem(ckpt_dir, state, path)
        if problem:
            return None, problem
    files = state.get("files")
    if files is not None:
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            return None, f"{path} has an unreadable 'files' record"
        problem = check_files(ckpt_dir, files, hashes=False)
        if problem:
            return None, problem
    return state, None


def _tag_problem(ckpt_dir: str, state: dict[str, Any], path: str) -> str | None:
    step, phase = state.get("step"), state.get("phase")
    if not isinstance(step, int) or not isinstance(phase, str) or not isinstance(state.get("phase_index"), int):
        return f"{path} lacks an integer 'step', 'phase_index' or a 'phase' name"
    tag = os.path.basename(os.path.normpath(ckpt_dir))
    if checkpoint_tag(step, phase) != tag:
        return f"{path} says step {step} of phase {phase!r}, which is not the checkpoint {tag} it is in"
    return None


def read_run_state(ckpt_dir: str) -> dict[str, Any] | None:
    """``run_state.json`` of a checkpoint directory (anywhere, any name) if it is complete, else None."""
    return inspect_checkpoint(ckpt_dir, strict=False)[0]


class Scan(NamedTuple):
    """What :func:`scan_checkpoints` found under a checkpoints directory."""

    resumable: list[tuple[str, dict[str, Any]]]  # (tag, run_state), oldest first; sizes checked
    converted: list[str]  # complete checkpoints marked converted_from (never resume points)
    skipped: list[tuple[str, str]]  # (name, problem) of directories that do not verify

    @property
    def damaged(self) -> list[tuple[str, str]]:
        """The skipped directories named like checkpoints (``step<N>-<phase>``)."""
        return [(tag, why) for tag, why in self.skipped if _TAG.match(tag)]


def scan_checkpoints(root: str) -> Scan:
    """The checkpoints under ``root`` (cheap: run_state.json files and file sizes, no hashing)."""
    if not os.path.isdir(root):
        return Scan([], [], [])
    found, converted, skipped = [], [], []
    for tag in sorted(os.listdir(root)):
        if tag.startswith(".") or not os.path.isdir(os.path.join(root, tag)):
            continue
        state, problem = inspect_checkpoint(os.path.join(root, tag))
        if problem is not None:
            skipped.append((tag, problem))
        elif state.get("converted_from"):
            converted.append(tag)
        else:
            found.append((tag, state))
    return Scan(sorted(found, key=lambda ts: (ts[1]["step"], ts[1]["phase_index"])), converted, skipped)


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


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_run_state(ckpt_dir: str, state: dict[str, Any], files: dict[str, Any] | None = None) -> None:
    """Write ``run_state.json`` into ``ckpt_dir`` with the integrity record ``files`` (None: flush
    and hash every other file of ``ckpt_dir`` now), and flush it and the directory to disk."""
    if files is None:
        files = {n: file_record(os.path.join(ckpt_dir, n)) for n in sorted(os.listdir(ckpt_dir))
                 if n != RUN_STATE and os.path.isfile(os.path.join(ckpt_dir, n))}
    with open(os.path.join(ckpt_dir, RUN_STATE), "w") as f:
        json.dump({**state, "files": files}, f, indent=2)
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


def _free_bytes(path: str) -> int | None:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def describe_write_error(err: BaseException, path: str) -> str:
    """One line for a failed checkpoint write at ``path``: "no space left on device" when the disk
    (or quota) is full, else the error itself."""
    free = _free_bytes(path)
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (free is not None and free < _FULL_BELOW)
    first = (str(err).strip().splitlines() or [""])[0]
    if full:
        return (f"no space left on device while saving checkpoint {path} ({free} bytes free there; "
                f"{type(err).__name__}: {first}); the previous checkpoints are intact: free space (or lower "
                "training.keep_last) and re-run the same command to resume")
    return f"saving checkpoint {path} failed: {type(err).__name__}: {first}"


def _owner(name: str) -> tuple[int, int] | None:
    """(DP rank, TP rank) that writes and loads the checkpoint file ``name`` (None: rank 0's)."""
    m = _OPTIM_FILE.search(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = _MODEL_FILE.match(name)
    return (0, int(m.group(1))) if m else None


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

    def _mine(self, names: list[str]) -> list[str]:
        """The files of a checkpoint this rank flushes and hashes (at a save) and verifies (at a resume)."""
        lay = self.layout
        return [n for n in names if _owner(n) == (lay.dp_rank, lay.tp_rank) or (_owner(n) is None and lay.rank == 0)]

    def complete(self) -> list[tuple[str, dict[str, Any]]]:
        """All complete, consistent checkpoints of this run as (tag, run_state), oldest first
        (converted checkpoints excluded: they are neither resumed from nor pruned)."""
        return scan_checkpoints(self.root).resumable

    def path(self, tag: str) -> str:
        return os.path.join(self.root, tag)

    def verify(self, tag: str, state: dict[str, Any]) -> str | None:
        """The first problem of checkpoint ``tag``'s recorded files (sizes and SHA-256; each rank
        hashes the files it loads), the same on every rank; None if it verifies. Collective."""
        files = state.get("files")
        problem = None
        if files is not None:
            problem = check_files(self.path(tag), files, self._mine(sorted(files)))
        return next((p for p in self._gather(problem) if p is not None), None)

    def latest(self) -> tuple[str, dict[str, Any]] | None:
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
        if problem is not None or state.get("converted_from") or self.verify(tag, state) is not None:
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
        if problem is None and (state.get("files") is None or check_files(dst, state["files"]) is None):
            return  # a verified checkpoint of the same step: the save replaces it atomically
        os.makedirs(os.path.join(self.root, INVALID), exist_ok=True)
        aside = os.path.join(self.root, INVALID, f"{tag}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")
        os.replace(dst, aside)
        logger.warning("WARNING: %s was in the way of this save and is not a valid checkpoint (%s); moved to %s",
                       dst, problem or "its files do not match their record", aside)

    def save(self, engine, run_state: dict[str, Any]) -> str:
        """Save ``engine`` with ``run_state`` atomically; returns the tag. Collective.

        Raises:
            CheckpointError: on every rank, when any rank failed to write (a full disk: "no space
                left on device"); nothing is renamed or pruned and the staging directory is removed.
        """
        tag = checkpoint_tag(run_state["step"], run_state["phase"])
        staging = os.path.join(self.root, STAGING)
        src = os.path.join(staging, tag)
        if self.layout.is_logger:
            shutil.rmtree(src, ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
        self._barrier()
        records, error = {}, None
        try:
            engine.save_checkpoint(staging, tag=tag, client_state={"run_state": run_state}, save_latest=False)
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
                state = {**run_state, "tag": tag, "complete": True, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
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

    def load(self, engine, tag: str, load_optimizer: bool = True) -> dict[str, Any]:
        """Load ``tag`` into ``engine`` (module; optimizer state too if ``load_optimizer``)."""
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
        return (client or {}).get("run_state", {})

    def prune(self) -> None:
        """Delete old checkpoints beyond ``keep_last``; phase-end checkpoints and the newest one
        saved with finite losses are kept (so are directories that do not verify: never deleted)."""
        found = self.complete()
        keep = {tag for tag, _ in found[-self.keep_last:]}
        keep |= {tag for tag, state in found if state.get("phase_end")}
        finite = [tag for tag, state in found if state.get("losses_finite", True)]
        keep |= set(finite[-1:])
        for tag, _ in found:
            if tag not in keep:
                shutil.rmtree(self.path(tag), ignore_errors=True)
                logger.info("removed checkpoint %s (training.keep_last=%d keeps the newest %d, every phase's last "
                            "and the newest with finite losses)", self.path(tag), self.keep_last, self.keep_last)
