"""The on-disk layout of a run's checkpoints: tags, the scan for resume points, integrity records,
atomic staging.

Layout of one checkpoint (``tag = step<NNNNNNN>-<phase name>``)::

    checkpoints/<tag>/mp_rank_XX_model_states.pt                 model shard of TP rank XX (DeepSpeed's file)
    checkpoints/<tag>/zero_pp_rank_D_mp_rank_XX_optim_states.pt  ZeRO-1 optimizer shard of DP rank D, TP rank XX
    checkpoints/<tag>/run_state.json                             :class:`~.run_state.RunState`, written last

Atomicity: every rank writes into ``checkpoints/.staging/<tag>/``, then flushes (fsync) and hashes
the files it wrote; rank 0 writes ``run_state.json`` last (``"complete": true`` and ``"files":
{name: {"size", "sha256"}}`` for every other file), fsyncs it and renames the directory into
``checkpoints/`` (:func:`replace_dir`). A crash mid-save leaves only ``.staging`` debris.

Integrity: a checkpoint is a resume point only if it verifies: ``run_state.json`` parses, is a
version this code reads, marks the checkpoint complete and names the step and phase its directory
is named after; every recorded file exists with its recorded size (:func:`scan_checkpoints`) and
SHA-256 (checked before a resume by the trainer, each rank hashing the files it loads; ``sha256sum``
gives the same digests). Checkpoints written before files were recorded (no ``"files"``) are
trusted as they are. Converted checkpoints (``converted_from``) are never resume points.

Who writes these files with DeepSpeed, and loads, prunes and retries them, is
:mod:`monarch_megatron.training.checkpoint`; how their tensors are read is :mod:`.shards`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from typing import Any, NamedTuple

from .run_state import RunState, RunStateError

STAGING = ".staging"
INVALID = ".invalid"
RUN_STATE = "run_state.json"
_TAG = re.compile(r"^step(\d{7,})-(.+)$")
# Whose files are whose (DeepSpeed's names): a rank writes and loads its ZeRO shard; DP rank 0 of a
# TP rank writes that rank's model file. Anything else is rank 0's to flush and hash.
OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_")
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_CHUNK = 16 * 2**20
# A failed write with less free space than this left on its filesystem is reported as a full disk
# (torch.save reports ENOSPC as "unexpected pos ...", without errno).
_FULL_BELOW = 2**20



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


def check_model_files(ckpt_dir: str, state: RunState) -> str | None:
    """:func:`check_files` of the model files (``mp_rank_XX_model_states.pt``) recorded in a
    checkpoint's ``state``: what a reader of its weights alone (evaluation, ``init_from``) needs;
    None without a record."""
    if state.files is None:
        return None
    return check_files(ckpt_dir, state.files, sorted(n for n in state.files if MODEL_FILE.match(n)))


def load_run_state(ckpt_dir: str) -> RunState:
    """The :class:`RunState` of the checkpoint directory ``ckpt_dir`` (complete or not).

    Raises:
        RunStateError: ``run_state.json`` is missing, unreadable, or not a version this code reads
            (the message names the file).
    """
    path = os.path.join(ckpt_dir, RUN_STATE)
    if not os.path.isfile(path):
        raise RunStateError(f"{path} is missing (not a checkpoint, or an interrupted copy)")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as err:
        raise RunStateError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    return RunState.from_json(obj, path)


def inspect_checkpoint(ckpt_dir: str, strict: bool = True) -> tuple[RunState | None, str | None]:
    """``(run_state, problem)`` of a checkpoint directory without reading its weights.

    ``problem`` (naming the file) when ``run_state.json`` is missing, does not parse, is of a
    version this code does not read or does not mark a complete checkpoint; with ``strict`` (a
    run's ``checkpoints/<tag>``) also when it names another step or phase than the directory
    (converted checkpoints are exempt) or a recorded file is missing or has another size.
    """
    try:
        state = load_run_state(ckpt_dir)
    except RunStateError as err:
        return None, str(err)
    path = os.path.join(ckpt_dir, RUN_STATE)
    if not state.complete:
        return None, f"{path} does not mark a complete checkpoint (no \"complete\": true)"
    if not strict:
        return state, None
    tag = os.path.basename(os.path.normpath(ckpt_dir))
    if not state.converted_from and checkpoint_tag(state.step, state.phase) != tag:
        return None, f"{path} says step {state.step} of phase {state.phase!r}, which is not the checkpoint {tag} it is in"
    if state.files is not None:
        problem = check_files(ckpt_dir, state.files, hashes=False)
        if problem:
            return None, problem
    return state, None


def read_run_state(ckpt_dir: str) -> RunState | None:
    """``run_state.json`` of a checkpoint directory (anywhere, any name) if it is complete, else None."""
    return inspect_checkpoint(ckpt_dir, strict=False)[0]


class Scan(NamedTuple):
    """What :func:`scan_checkpoints` found under a checkpoints directory."""

    resumable: list[tuple[str, RunState]]  # (tag, run_state), oldest first; sizes checked
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
        elif state.converted_from:
            converted.append(tag)
        else:
            found.append((tag, state))
    return Scan(sorted(found, key=lambda ts: (ts[1].step, ts[1].phase_index)), converted, skipped)


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


def write_run_state(ckpt_dir: str, state: RunState, files: dict[str, Any] | None = None) -> None:
    """Write ``state`` as ``run_state.json`` into ``ckpt_dir`` with the integrity record ``files``
    (None: flush and hash every other file of ``ckpt_dir`` now), and flush it and the directory."""
    if files is None:
        files = {n: file_record(os.path.join(ckpt_dir, n)) for n in sorted(os.listdir(ckpt_dir))
                 if n != RUN_STATE and os.path.isfile(os.path.join(ckpt_dir, n))}
    with open(os.path.join(ckpt_dir, RUN_STATE), "w") as f:
        json.dump(state.replace(files=files).to_json(), f, indent=2)
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


def file_owner(name: str) -> tuple[int, int] | None:
    """(DP rank, TP rank) that writes and loads the checkpoint file ``name`` (None: rank 0's)."""
    m = OPTIM_FILE.search(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = MODEL_FILE.match(name)
    return (0, int(m.group(1))) if m else None


