"""A two-node launch, as far as one host can hold it (issue 16, item 4): two ``torchrun`` node groups
(``--nnodes 2``, one process each, static rendezvous over localhost) train the tiny demo through the
Monarch -> dense switch, and give the one-node two-process run's losses bitwise: the same global
ranks, data-parallel layout and gloo reductions, so the node split must change nothing. CPU, gloo,
fp32, the demo config's seed (1234). What one host cannot show: a second machine's network and
filesystem (the Slurm scripts' multi-node srun line is checked in test_slurm_scripts.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

from monarch_megatron.parallel.distributed import free_port

from tiny_demo import DEMO, ROOT, metrics_by_step, subprocess_env, tiny_overrides

TINY = tiny_overrides("training.total_steps=6", "training.log_interval=1", "training.eval_interval=100",
                      "training.save_interval=100", "phases.0.share=0.5", "phases.0.monarch.nblocks=2",
                      "phases.1.share=0.5")


def _pretrain(out: str) -> list[str]:
    return [os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO, f"output_dir={out}", *TINY]


def _losses(out: str) -> dict[int, float]:
    return {step: row["loss"] for step, row in metrics_by_step(out, "train").items()}


def test_two_node_groups_on_one_host_give_the_one_node_losses(tmp_path) -> None:
    two_nodes, one_node = str(tmp_path / "two_nodes"), str(tmp_path / "one_node")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               *_pretrain(two_nodes)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    single = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *_pretrain(one_node)], capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    assert "switch" in open(os.path.join(two_nodes, "metrics.jsonl")).read()
    assert sorted(_losses(two_nodes)) == list(range(1, 7))
    assert _losses(two_nodes) == _losses(one_node)
    assert sorted(os.listdir(os.path.join(two_nodes, "checkpoints"))) == sorted(os.listdir(os.path.join(one_node, "checkpoints")))
