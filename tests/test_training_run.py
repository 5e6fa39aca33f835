"""Single-process training service on CPU: a two-phase run (Monarch -> dense switch) with
checkpoints; run_state.json; TensorBoard scalars; kill -9 mid-run then resume with identical
losses; SIGTERM saves and exits cleanly; evaluate.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, ROOT, tiny_overrides

# 10 steps: Monarch for 6, dense for 4; checkpoints every 3 steps.
TINY = tiny_overrides(
    "training.total_steps=10", "training.log_interval=2", "training.eval_interval=5", "training.eval_iters=1",
    "training.save_interval=3", "training.keep_last=3", "phases.0.share=0.6", "phases.0.monarch.nblocks=2",
    "phases.1.share=0.4",
)


def tiny_args(out: str, *extra: str) -> list[str]:
    return [f"output_dir={out}", *TINY, *extra]


def train_in_process(out: str, *extra: str) -> dict:
    from monarch_megatron.training.run import train

    return train(load_config(DEMO, tiny_args(out, *extra)))


def train_losses(out: str) -> dict[int, float]:
    """step -> loss (the last record of each step: a resumed run re-runs a few steps)."""
    losses = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "train":
                losses[row["step"]] = row["loss"]
    return losses


def launch(out: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO, *tiny_args(out, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, out: str, step: int, timeout: float = 240) -> None:
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and max(train_losses(out) or {0: 0}) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for step {step}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("reference"))
    summary = train_in_process(out)
    assert summary["step"] == 10 and not summary["stopped"]
    return out


def test_run_trains_both_phases_and_lays_out_output_dir(reference: str) -> None:
    assert sorted(train_losses(reference)) == list(range(1, 11))
    for name in ("tensorboard", "checkpoints", "train.log", "config.yaml", "metrics.jsonl"):
        assert os.path.exists(os.path.join(reference, name)), name
    root = os.path.join(reference, "checkpoints")
    tags = sorted(t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t)))
    # step 3 pruned (keep_last=3); the Monarch phase's last checkpoint is always kept.
    assert tags == ["step0000006-dense", "step0000006-monarch", "step0000009-dense", "step0000010-dense"]
    log = open(os.path.join(reference, "train.log")).read()
    assert "step 10/10 [dense]" in log and "TFLOP/s" in log and "ETA" in log and "tok/s" in log


def test_run_state_json_records_step_phase_and_kind(reference: str) -> None:
    from monarch_megatron.checkpointing.store import read_run_state

    ckpt = os.path.join(reference, "checkpoints")
    mon = read_run_state(os.path.join(ckpt, "step0000006-monarch"))
    dense = read_run_state(os.path.join(ckpt, "step0000006-dense"))
    last = read_run_state(os.path.join(ckpt, "step0000010-dense"))
    cfg_hash = load_config(DEMO, tiny_args(reference)).config_hash()
    assert mon.complete and mon.step == 6 and mon.phase == "monarch" and mon.phase_kind == "monarch"
    assert mon.phase_index == 0 and mon.phase_end and mon.consumed_samples == 48
    assert mon.monarch == {"layers": ["fc1", "fc2", "qkv", "proj"], "nblocks": 2}
    assert dense.phase_kind == "dense" and dense.phase_index == 1 and dense.phase_step == 0 and dense.monarch is None
    assert last.step == 10 and last.consumed_samples == 80 and last.phase_consumed_samples == 32
    assert {mon.config_hash, dense.config_hash, last.config_hash} == {cfg_hash}


def test_tensorboard_has_megatron_scalar_names(reference: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(reference, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("lm loss", "sop loss", "learning-rate", "loss-scale", "grad-norm", "iteration-time", "throughput",
                 "tokens-per-sec", "phase", "lm loss validation", "switch/val-loss-before", "switch/val-loss-after"):
        assert name in tags, name
    assert [e.value for e in acc.Scalars("phase")] == [0.0] * 6 + [1.0] * 4


def test_kill_9_mid_run_then_resume_gives_identical_losses(reference: str, tmp_path) -> None:
    out = str(tmp_path)
    proc = launch(out)
    wait_for_step(proc, out, 4)  # past the step-3 checkpoint, inside the Monarch phase
    proc.kill()
    proc.wait()
    os.makedirs(os.path.join(out, "checkpoints", ".staging", "step0000005-monarch"), exist_ok=True)  # a torn save
    summary = train_in_process(out)
    assert summary["step"] == 10
    assert train_losses(out) == train_losses(reference)  # bitwise: CPU, fp32
    assert not os.path.exists(os.path.join(out, "checkpoints", ".staging", "step0000005-monarch"))


def test_sigterm_saves_and_exits_cleanly_then_resumes(reference: str, tmp_path) -> None:
    out = str(tmp_path)
    proc = launch(out)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    from monarch_megatron.training.checkpoint import CheckpointManager
    from monarch_megatron.training.distributed import Layout

    tag, state = CheckpointManager(out, Layout(1, 0, 1, 0, 1, 0), 3).latest()
    assert 2 <= state.step < 10 and state.complete
    train_in_process(out)
    assert train_losses(out) == train_losses(reference)


def test_rerunning_a_finished_run_does_not_train_again(reference: str) -> None:
    before = train_losses(reference)
    summary = train_in_process(reference)
    assert summary["step"] == 10 and train_losses(reference) == before


def test_evaluate_cli_prints_deterministic_val_loss(reference: str) -> None:
    ckpt = os.path.join(reference, "checkpoints", "step0000010-dense")
    cmd = [sys.executable, os.path.join(ROOT, "launcher", "evaluate.py"), "--config", DEMO, "--checkpoint", ckpt,
           *tiny_args(reference)]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    last = [r.stdout.strip().splitlines()[-1] for r in runs]
    assert last[0].startswith("val_loss=") and last[0] == last[1]
    assert float(last[0].split("=")[1]) > 0


def test_resuming_at_another_layout_reshards_and_a_missing_shard_is_one_config_error(reference: str, tmp_path) -> None:
    from monarch_megatron.training.run import check_resume_layout
    from monarch_megatron.training.schema_io import ConfigError

    cfg = load_config(DEMO, tiny_args(reference))
    assert check_resume_layout(cfg, 1) is None  # the layout that wrote the checkpoints
    assert "written by TP=1 x DP=1 processes, at TP=1 x DP=2: its weights, optimizer state" in check_resume_layout(cfg, 2)
    # A checkpoint from before files were recorded that claims DP=2 but has one ZeRO shard.
    out = str(tmp_path)
    tag = "step0000010-dense"
    shutil.copytree(os.path.join(reference, "checkpoints", tag), os.path.join(out, "checkpoints", tag))
    path = os.path.join(out, "checkpoints", tag, "run_state.json")
    state = json.load(open(path))
    del state["files"]
    json.dump({**state, "data_parallel_size": 2, "world_size": 2}, open(path, "w"))
    with pytest.raises(ConfigError, match=r"written by TP=1 x DP=2 processes, and resharding it to TP=1 x DP=1 "
                                          r"needs all their files, but zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        check_resume_layout(load_config(DEMO, tiny_args(out)), 1)
    before = sorted(os.listdir(os.path.join(out, "checkpoints", tag)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO,
                           *tiny_args(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config error: parallel:" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(out, "checkpoints", tag))) == before
    assert not os.path.exists(os.path.join(out, "train.log"))
