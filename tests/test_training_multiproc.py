"""Two processes on CPU (gloo) through DeepSpeed: DP=2 under torchrun and TP=2 under the deepspeed
launcher give the same per-step losses as one process (dropout off; rel 1e-5), and the TP=2 run's
in-job Monarch -> dense switch is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny_demo import DEMO, ROOT, metrics_by_step, tiny_overrides

TINY = tiny_overrides(
    "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "training.total_steps=6", "training.log_interval=1",
    "training.eval_interval=100", "training.eval_iters=1", "training.save_interval=100", "phases.0.share=0.5",
    "phases.0.monarch.nblocks=2", "phases.1.share=0.5",
)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> str:
    from monarch_megatron.training.config import load_config
    from monarch_megatron.training.run import train

    out = str(tmp_path_factory.mktemp("dp1"))
    train(load_config(DEMO, [f"output_dir={out}", *TINY]))
    return out


def _run(launcher: list[str], out: str, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO, f"output_dir={out}", *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same_losses(a: str, b: str) -> None:
    ra, rb = metrics_by_step(a, "train"), metrics_by_step(b, "train")
    assert sorted(ra) == sorted(rb) == list(range(1, 7))
    for step in ra:
        for key in ("loss", "lm loss", "sop loss", "grad-norm"):
            assert ra[step][key] == pytest.approx(rb[step][key], rel=1e-5), (step, key)


def test_data_parallel_2_under_torchrun_matches_one_process(single: str, tmp_path) -> None:
    out = str(tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631"], out)
    _assert_same_losses(single, out)
    state = json.load(open(os.path.join(out, "checkpoints", "step0000006-dense", "run_state.json")))
    assert state["data_parallel_size"] == 2 and state["tensor_model_parallel_size"] == 1
    files = os.listdir(os.path.join(out, "checkpoints", "step0000006-dense"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(files)


def test_tensor_parallel_2_under_deepspeed_launcher_matches_and_switch_is_exact(single: str, tmp_path) -> None:
    out = str(tmp_path)
    _run(["deepspeed", "--num_gpus", "2", "--master_port", "29632"], out, "parallel.tensor_model_parallel_size=2")
    _assert_same_losses(single, out)
    switch = metrics_by_step(out, "switch")[3]
    assert switch["val-loss-after"] == pytest.approx(switch["val-loss-before"], rel=1e-5)
    assert switch["val-loss-before"] == pytest.approx(metrics_by_step(single, "switch")[3]["val-loss-before"], rel=1e-5)
    files = os.listdir(os.path.join(out, "checkpoints", "step0000006-dense"))
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(files)
    # evaluate.py on the TP=2 checkpoint (2 processes) equals the one-process run's checkpoint.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29633",
           os.path.join(ROOT, "launcher", "evaluate.py"), "--config", DEMO, "--checkpoint",
           os.path.join(out, "checkpoints", "step0000003-monarch"), f"output_dir={out}", *TINY,
           "parallel.tensor_model_parallel_size=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tp2 = float(proc.stdout.strip().splitlines()[-1].split("=")[1])
    from monarch_megatron.training.config import load_config
    from monarch_megatron.training.evaluate import evaluate

    one = evaluate(load_config(DEMO, [f"output_dir={single}", *TINY]),
                   os.path.join(single, "checkpoints", "step0000003-monarch"))["loss"]
    assert tp2 == pytest.approx(one, rel=1e-5)
