"""slurm/bert_large_monarch.sh on a real one-node Slurm cluster started on this machine.

tests/slurm/local_cluster.sh installs Debian's Slurm and munge (apt-get) when missing and starts
munged, slurmctld and slurmd for node "localhost". The batch script then runs exactly as on a GPU
cluster -- sbatch, one srun task per node, torchrun, launcher/pretrain.py -- with the tiny CPU
demo config (CONFIG=configs/demo.yaml), one process (NPROC=1) and no GPUs (--gres=none):

* a short run through the Monarch -> dense switch ends with a complete dense checkpoint;
* the preemption path: SIGUSR1 to the batch shell (what ``#SBATCH --signal=B:USR1@300`` delivers
  before the time limit; here ``scancel --signal=USR1 --batch``) -> the trainer saves a checkpoint
  and exits -> ``scontrol requeue`` -> the job runs again with SLURM_RESTART_COUNT=1, resumes from
  that checkpoint and finishes.

Slurm polls signals and time limits coarsely, so nothing here asserts timing; every wait is
bounded, and a job that outlives its bound is cancelled and its log shown. Skipped (with the
reason) when this is not a root shell on Linux, or when Slurm is absent and either the user has not
opted in to installing it (``MONARCH_MEGATRON_INSTALL_SLURM=1``; ``.ci/run`` sets it) or it cannot
be installed.
Runtime here (2 CPUs): about 3-4 minutes, most of it Python start-up inside the jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "local_cluster.sh"
SCRIPT = "slurm/bert_large_monarch.sh"
# The 8-GPU defaults of the batch script, replaced for a CPU-only one-node cluster. The time limit
# is long enough that its own USR1 (300 s before the end) never fires during these tests.
SBATCH_CPU = ["--gres=none", "--cpus-per-task=1", "--time=00:15:00"]
# Opt-in for installing Slurm and munge system-wide (root, apt-get) when they are missing.
OPT_IN = "MONARCH_MEGATRON_INSTALL_SLURM"


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running local cluster; stopped afterwards only if this fixture started it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the local Slurm cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("tests/slurm/local_cluster.sh needs root (it installs packages and starts daemons)")
    have_slurm = all(shutil.which(b) for b in ("sbatch", "scontrol", "squeue")) and os.path.exists("/usr/sbin/slurmd")
    if not have_slurm and os.environ.get(OPT_IN) != "1":
        # Installing Slurm and munge system-wide is not something a test run does unasked.
        pytest.skip(f"Slurm is not installed; set {OPT_IN}=1 to let this test install it (apt-get) and start "
                    "a one-node cluster on this machine (what .ci/run does)")
    if not have_slurm and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    was_up = _run(["bash", str(CLUSTER), "status"], timeout=30).returncode == 0
    started = _run(["bash", str(CLUSTER), "start"], timeout=420)
    if started.returncode == 3:
        pytest.skip(f"Slurm is missing and could not be installed here: {started.stderr.strip()[-500:]}")
    assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
    yield
    if not was_up:
        _run(["bash", str(CLUSTER), "stop"], timeout=120)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Nothing of an enclosing Slurm job (if pytest itself runs under one) may leak into ours.
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        del env[key]
    env.update(NPROC="1", CONFIG="configs/demo.yaml", PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def _overrides(out: Path, data: Path, steps: int) -> list[str]:
    """The demo config, shortened; the demo corpus/tokenizer cache is shared by both tests."""
    return [f"output_dir={out}", f"data.cache_dir={data}", f"training.total_steps={steps}",
            "training.log_interval=1", "training.eval_interval=1000", "training.save_interval=1000"]


def _job_field(job: str, field: str) -> str:
    line = _run(["scontrol", "show", "job", "-o", job], timeout=30).stdout
    m = re.search(rf"\b{field}=(\S+)", line)
    return m.group(1) if m else ""


def _cancel(job: str) -> None:
    _run(["scancel", job], timeout=30)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def _final_state(out: Path) -> dict:
    """run_state.json of the newest complete checkpoint (the one with the highest step)."""
    states = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("*/run_state.json")
              if not p.parent.name.startswith(".")]
    assert states, f"no checkpoint under {out}/checkpoints"
    return max(states, key=lambda s: (s["step"], s["phase_index"]))


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-data")


def test_sbatch_runs_the_demo_through_the_switch_and_checkpoints(slurm_cluster, tmp_path, data_cache):
    out, log = tmp_path / "run", tmp_path / "job.out"
    cmd = ["sbatch", "--wait", *SBATCH_CPU, f"--output={log}", SCRIPT, *_overrides(out, data_cache, steps=6)]
    try:
        res = _run(cmd, timeout=300, cwd=REPO, env=_env())
    except subprocess.TimeoutExpired:
        _run(["scancel", "--name=bert-large-monarch"], timeout=30)
        pytest.fail(f"job did not finish within 300 s; log:\n{_read(log)[-4000:]}")
    assert res.returncode == 0, f"sbatch --wait failed ({res.returncode}): {res.stderr}\n{_read(log)[-4000:]}"

    state = _final_state(out)
    # demo phases: Monarch for 80% of the steps (5 of 6), then dense
    assert state["step"] == 6 and state["total_steps"] == 6, state
    assert state["phase_kind"] == "dense" and state["complete"] is True, state
    assert (out / "checkpoints" / "step0000005-monarch" / "run_state.json").exists()
    assert "run complete: 6 steps" in _read(log)


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, data_cache):
    out, log = tmp_path / "run", tmp_path / "job.out"
    steps = 30
    cmd = ["sbatch", "--parsable", *SBATCH_CPU, f"--output={log}", SCRIPT, *_overrides(out, data_cache, steps)]
    res = _run(cmd, timeout=60, cwd=REPO, env=_env())
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    try:
        # Signal only once training runs: the trainer installs its handler after start-up.
        deadline = time.monotonic() + 180
        while max(map(int, re.findall(rf"step (\d+)/{steps} ", _read(log))), default=0) < 3:
            assert _job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _read(log)[-4000:]
            assert time.monotonic() < deadline, f"training did not start within 180 s:\n{_read(log)[-4000:]}"
            time.sleep(1)
        # What `#SBATCH --signal=B:USR1@300` sends 300 s before the time limit: USR1 to the batch shell.
        sig = _run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
        assert sig.returncode == 0, sig.stderr

        deadline = time.monotonic() + 300
        while True:
            state = _job_field(job, "JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            assert time.monotonic() < deadline, f"job {job} not done within 300 s of the signal ({state}):\n{_read(log)[-4000:]}"
            time.sleep(2)
    finally:
        if _job_field(job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            _cancel(job)
    text = _read(log)
    assert state == "COMPLETED", f"job ended {state}:\n{text[-4000:]}"
    assert _job_field(job, "Restarts") == "1", text[-4000:]

    # First run: the signal reached the batch shell, the trainer saved mid-run and the job requeued.
    assert "received SIGUSR1" in text and f"requeueing job {job}" in text, text[-4000:]
    stopped = re.search(r"signal \d+ received: saving and exiting at step (\d+)", text)
    assert stopped, text[-4000:]
    at = int(stopped.group(1))
    assert 0 < at < steps
    tag = f"step{at:07d}-monarch" if at < 24 else None  # demo: Monarch for steps 1..24 of 30
    # Second run: SLURM_RESTART_COUNT=1, resumed from exactly that checkpoint, ran to the end.
    second = text.split(f"job {job} (restart 1)", 1)
    assert len(second) == 2, f"no restarted run in the log:\n{text[-4000:]}"
    resumed = re.search(r"resuming from checkpoint (\S+) \(step (\d+)/(\d+)", second[1])
    assert resumed and int(resumed.group(2)) == at and int(resumed.group(3)) == steps, second[1][-4000:]
    if tag:
        assert resumed.group(1).endswith(tag), resumed.group(1)
    assert f"run complete: {steps} steps" in second[1]
    assert "starting a new run" not in second[1]

    state = _final_state(out)
    assert state["step"] == steps and state["phase_kind"] == "dense", state
