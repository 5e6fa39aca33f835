"""One trainer per ``output_dir``: a lock file held by rank 0 for the run's lifetime.

``<output_dir>/run.lock`` is locked with ``flock`` (the kernel drops the lock when the process
dies, however it dies; NFS clients map it onto their lock protocol) and holds the holder's host,
PID, start time and Slurm job as JSON, so that a second trainer can say who is running. On release
the file is emptied and unlocked, never deleted (deleting would let two late-comers lock two
different files).

A lock file with content but no lock on it was left by a trainer that died (kill -9, node
failure): it is taken over, with a warning naming the dead holder. Where the filesystem refuses
``flock`` the content alone decides: the holder is alive if it runs on this host under the same
PID and process start time, or runs on another host in another Slurm job (which cannot be checked
from here: the message says to delete the file if that job is gone); a requeued job (same
``SLURM_JOB_ID``) takes over its own previous lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from .schema_io import ConfigError

LOCK_FILE = "run.lock"


class RunLocked(ConfigError):
    """Another trainer holds the run's output directory."""


def _start_ticks(pid: int) -> str | None:
    """The process start time of ``pid`` in clock ticks since boot (Linux), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "start_ticks": _start_ticks(os.getpid()), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "command": " ".join(sys.argv)[:300]}


def _read(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "started": "? (unreadable lock file)"}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process described by ``holder`` may still run (for filesystems without flock)."""
    if holder.get("host") != socket.gethostname():
        job = os.environ.get("SLURM_JOB_ID")
        return not (job and holder.get("slurm_job_id") == job)
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start_ticks") in (None, ticks)


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}{job}"


class RunLock:
    """The lock of ``output_dir`` (which must exist). ``acquire()`` raises :class:`RunLocked`."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd: int | None = None

    def _refuse(self, fd: int, holder: dict[str, Any] | None, extra: str = "") -> None:
        os.close(fd)
        raise RunLocked("output_dir", f"{os.path.dirname(self.path)} is in use by another trainer ({describe(holder)}; "
                        f"lock file {self.path}). One trainer per output_dir: wait for it to end, stop it, or use "
                        f"another output_dir{extra}")

    def acquire(self) -> dict[str, Any] | None:
        """Lock; returns the holder recorded by a trainer that died holding it (a stale lock), if any."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(fd, _read(fd))
        except OSError as err:  # no flock here (some parallel filesystems): the content decides
            if err.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                os.close(fd)
                raise
            holder = _read(fd)
            if holder and _alive(holder):
                self._refuse(fd, holder, f" (this filesystem has no flock: if that trainer is gone, delete {self.path})")
        previous = _read(fd)
        try:  # best effort: on a full disk the lock itself still holds
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
            os.fsync(fd)
        except OSError:
            pass
        self.fd = fd
        return previous

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


__all__ = ["LOCK_FILE", "RunLock", "RunLocked"]
