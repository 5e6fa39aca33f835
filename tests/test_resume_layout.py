"""Resume at another TP x DP layout (CPU, gloo, fp32, seed 1234 of configs/demo.yaml, dropout off).

A run trained at TP=1 x DP=2 (torchrun), killed after step 2, resumed at TP=2 x DP=1, killed again
and resumed at TP=1 x DP=1 gives the uninterrupted one-process run's losses: in the Monarch phase
(LAMB), across the Monarch -> dense switch (re-done from a resharded Monarch checkpoint) and in the
dense phase (AdamW). Tolerance rel 2e-5: the layouts sum in other orders (DP all-reduce, TP partial
sums), so the runs agree to fp32 rounding, compounded over a few steps; a resume that lost the
optimizer moments is off by percents. Resharding through the same path at the same layout is
bitwise exact (so is a later phase's ``optimizer_state: keep`` through it), and carries the loss
scaler as DeepSpeed saved it (fp16's dynamic scaler, which
DeepSpeed builds only on a GPU, is put into a CPU checkpoint's optimizer shard here). run_state.json
versions: the older one (no "version") is read, an unknown one refused naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, ROOT, checkpoint_weights, metrics_by_step, tiny_overrides

TINY = tiny_overrides(
    "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "training.total_steps=8", "training.save_interval=2",
    "training.keep_last=10", "training.log_interval=1", "training.eval_interval=100", "training.eval_iters=1",
    "phases.0.share=0.5", "phases.0.monarch.nblocks=2", "phases.1.share=0.5",
    "phases.1.optimizer={name: adamw, lr: 1.0e-3}",
)
REL = 2e-5


def train_here(out: str, *extra: str) -> dict:
    from monarch_megatron.training.run import train

    return train(load_config(DEMO, [f"output_dir={out}", *TINY, *extra]))


def torchrun(out: str, port: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO, f"output_dir={out}", *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def resume_from(src: str, tag: str, out: str) -> str:
    """``out`` holding only checkpoint ``tag`` of the run ``src`` (what a kill after it leaves)."""
    shutil.copytree(os.path.join(src, "checkpoints", tag), os.path.join(out, "checkpoints", tag))
    return out


def assert_losses_match(run: str, reference: str, steps: range) -> None:
    got, want = metrics_by_step(run, "train"), metrics_by_step(reference, "train")
    assert sorted(got) == list(steps)
    for step in steps:
        for key in ("loss", "lm loss", "sop loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=REL), (run, step, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The uninterrupted run, one process."""
    out = str(tmp_path_factory.mktemp("layout_reference"))
    train_here(out)
    return out


def test_tp1_dp2_resumed_at_tp2_dp1_then_tp1_dp1_continues_the_uninterrupted_losses(reference, tmp_path) -> None:
    dp2 = str(tmp_path / "tp1_dp2")
    torchrun(dp2, 29641)
    assert_losses_match(dp2, reference, range(1, 9))
    # killed after step 2 (Monarch phase, LAMB moments); resumed at TP=2 x DP=1 to the end
    tp2 = resume_from(dp2, "step0000002-monarch", str(tmp_path / "tp2_dp1"))
    torchrun(tp2, 29642, "parallel.tensor_model_parallel_size=2")
    assert_losses_match(tp2, reference, range(3, 9))
    log = open(os.path.join(tp2, "train.log")).read()
    assert "was written by TP=1 x DP=2 processes; resharding" in log and "TP=2 x DP=1" in log
    state = json.load(open(os.path.join(tp2, "checkpoints", "step0000006-dense", "run_state.json")))
    assert (state["tensor_model_parallel_size"], state["data_parallel_size"], state["consumed_samples"]) == (2, 1, 48)
    # killed during the switch (Monarch phase end saved, dense not): TP=1 x DP=1 redoes the switch
    switch = resume_from(tp2, "step0000004-monarch", str(tmp_path / "switch"))
    train_here(switch)
    assert_losses_match(switch, reference, range(5, 9))
    before = metrics_by_step(switch, "switch")[4]["val-loss-before"]
    assert before == pytest.approx(metrics_by_step(reference, "switch")[4]["val-loss-before"], rel=REL)
    # killed in the dense phase (AdamW moments, resharded from TP=2)
    dense = resume_from(tp2, "step0000006-dense", str(tmp_path / "dense"))
    train_here(dense)
    assert_losses_match(dense, reference, range(7, 9))
    final, ref_final = checkpoint_weights(dense, "step0000008-dense"), checkpoint_weights(reference, "step0000008-dense")
    for key in ref_final:
        torch.testing.assert_close(final[key], ref_final[key], rtol=1e-4, atol=1e-6, msg=key)


def _through_reshard(monkeypatch) -> None:
    """Make a same-layout resume take the resharding path (read, merge, split, write back)."""
    from monarch_megatron.training.checkpoint import CheckpointManager

    monkeypatch.setattr(CheckpointManager, "same_layout", lambda self, state: False)


@pytest.mark.parametrize("tag,first", [("step0000002-monarch", 3), ("step0000006-dense", 7)])
def test_resharding_at_the_same_layout_is_bitwise_deepspeeds_own_resume(reference, tmp_path, monkeypatch, tag,
                                                                          first) -> None:
    out = resume_from(reference, tag, str(tmp_path))
    _through_reshard(monkeypatch)
    train_here(out)
    got, want = metrics_by_step(out, "train"), metrics_by_step(reference, "train")
    assert sorted(got) == list(range(first, 9))
    assert all(got[s]["loss"] == want[s]["loss"] and got[s]["grad-norm"] == want[s]["grad-norm"] for s in got)


def test_bf16_resharding_at_the_same_layout_is_bitwise_deepspeeds_own_resume(tmp_path, monkeypatch) -> None:
    """bf16: the fp32 masters come from the optimizer shards (DeepSpeed names them bf16_zero_pp_...),
    the model's bf16 weights from them."""
    reference = str(tmp_path / "reference")
    train_here(reference, "precision.dtype=bf16")
    assert any(n.startswith("bf16_zero_pp_rank_0") for n in os.listdir(os.path.join(reference, "checkpoints",
                                                                                    "step0000002-monarch")))
    out = resume_from(reference, "step0000002-monarch", str(tmp_path / "resumed"))
    _through_reshard(monkeypatch)
    train_here(out, "precision.dtype=bf16")
    got, want = metrics_by_step(out, "train"), metrics_by_step(reference, "train")
    assert sorted(got) == list(range(3, 9)) and all(got[s]["loss"] == want[s]["loss"] for s in got)


def test_optimizer_state_kept_across_phases_is_resharded_too(tmp_path, monkeypatch) -> None:
    """``optimizer_state: keep`` reloads the previous phase's last checkpoint: resharded when it was
    written at another layout (here forced at the same one: bitwise the reference)."""
    keep = "phases=[{name: short, share: 0.5, seq_length: 16, monarch: {nblocks: 2}}, " \
           "{name: long, share: 0.5, monarch: {nblocks: 2}, optimizer_state: keep}]"
    reference = str(tmp_path / "reference")
    train_here(reference, keep)
    out = resume_from(reference, "step0000002-short", str(tmp_path / "resumed"))
    _through_reshard(monkeypatch)
    train_here(out, keep)
    got, want = metrics_by_step(out, "train"), metrics_by_step(reference, "train")
    assert sorted(got) == list(range(3, 9)) and all(got[s]["loss"] == want[s]["loss"] for s in got)


def test_loss_scaler_state_is_carried(reference, tmp_path, monkeypatch) -> None:
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    from monarch_megatron.checkpointing.store import file_record, load_run_state, write_run_state
    from monarch_megatron.training import loop

    out = resume_from(reference, "step0000002-monarch", str(tmp_path))
    ckpt = os.path.join(out, "checkpoints", "step0000002-monarch")
    # What an fp16 run's ZeRO-1 shard holds: a dynamic scaler after 37 iterations, halved once at 30.
    scaler = CreateLossScaler(dtype=torch.float16, static_loss_scale=0, dynamic_scaling=True,
                              dynamic_loss_args={"init_scale": 2.0**12, "scale_window": 1000, "delayed_shift": 2,
                                                 "consecutive_hysteresis": False, "min_scale": 1.0})
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis = 2.0**11, 37, 30, 1
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard = torch.load(os.path.join(ckpt, name), weights_only=False)
    shard["optimizer_state_dict"]["loss_scaler"] = scaler
    torch.save(shard, os.path.join(ckpt, name))
    state = load_run_state(ckpt)
    write_run_state(ckpt, state, {**state.files, name: file_record(os.path.join(ckpt, name))})
    _through_reshard(monkeypatch)
    seen = {}
    original = loop.Trainer.train_phase

    def spy(trainer, phase):  # the resumed phase's engine (the switch builds a fresh one)
        seen.setdefault("scaler", dict(vars(trainer.engine.optimizer.loss_scaler)))
        return original(trainer, phase)

    monkeypatch.setattr(loop.Trainer, "train_phase", spy)
    train_here(out)
    assert {k: seen["scaler"][k] for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "dynamic")} == {
        "cur_scale": 2.0**11, "cur_iter": 37, "last_overflow_iter": 30, "cur_hysteresis": 1, "dynamic": True}


def test_run_state_versions(reference, tmp_path) -> None:
    from monarch_megatron.checkpointing import VERSION, RunState, RunStateError
    from monarch_megatron.checkpointing.store import inspect_checkpoint

    path = os.path.join(reference, "checkpoints", "step0000004-monarch", "run_state.json")
    saved = json.load(open(path))
    assert saved["version"] == VERSION == 2
    older = {k: v for k, v in saved.items() if k != "version"}  # as every checkpoint before versions
    state = RunState.from_json(older, path)
    assert (state.version, state.step, state.layout, state.monarch["nblocks"]) == (1, 4, (1, 1), 2)
    assert RunState.from_json(saved, path).to_json() == saved
    newer = os.path.join(str(tmp_path), "step0000004-monarch")
    shutil.copytree(os.path.dirname(path), newer)
    json.dump({**saved, "version": 99}, open(os.path.join(newer, "run_state.json"), "w"))
    state, problem = inspect_checkpoint(newer)
    assert state is None and problem.startswith(f"{newer}/run_state.json has version 99, which this monarch-megatron "
                                                "does not read (it reads versions 1, 2)")
    with pytest.raises(RunStateError, match="lacks an integer 'step'"):
        RunState.from_json({**saved, "step": "4"}, path)
