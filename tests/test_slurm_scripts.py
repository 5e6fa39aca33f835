"""The Slurm scripts and the recipe configs, checked without a cluster.

bash syntax of every script; the #SBATCH defaults for 8-GPU nodes; every config in configs/
through ``launcher/pretrain.py --config F --dry-run`` at the world sizes of 1, 2 and 4 nodes of 8
GPUs; misspelt keys rejected with the key named; argument handling of the batch script, and the
script run outside Slurm (it then starts torchrun on this machine) in dry-run mode.
The real-cluster runs are in test_slurm_local.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BATCH_SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
ALL_SCRIPTS = BATCH_SCRIPTS + sorted((REPO / "tests" / "slurm").glob("*.sh"))
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RECIPES = ["bert_large_monarch.yaml", "bert_large_blockdiag.yaml", "bert_large_dense.yaml", "gpt2_small_monarch.yaml",
           "gpt2_medium_monarch.yaml", "gpt2_small_monarch_attn.yaml", "gpt2_medium_monarch_attn.yaml"]


def _pretrain_main():
    """launcher/pretrain.py's ``main`` (the launcher directory is not a package)."""
    spec = importlib.util.spec_from_file_location("monarch_pretrain_launcher", REPO / "launcher" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _demo_data() -> list[str]:
    """Overrides pointing a recipe at the demo's indexed data (built once, shared with the trainer
    tests): --dry-run checks that the data exist, and the recipes' data/wiki and data/owt are not here."""
    from monarch_megatron.data.demo_corpus import prepare_demo_data

    from tiny_demo import DATA

    prefix, model = prepare_demo_data(DATA)
    return [f"data.prefix={prefix}", f"data.tokenizer_model={model}"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(extra)
    return env


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses_with_bash_n(script: Path):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", [p for p in BATCH_SCRIPTS if p.name != "common.sh"], ids=lambda p: p.name)
def test_batch_script_defaults_fit_8_gpu_nodes_with_preemption(script: Path):
    directives = dict(
        (m.group(1), m.group(2))
        for m in re.finditer(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", script.read_text(), re.M))
    assert directives["ntasks-per-node"] == "1"          # one torchrun per node
    assert directives["gres"] == "gpu:8"
    assert "exclusive" in directives and "requeue" in directives
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"])
    assert directives["open-mode"] == "append"           # the requeued run appends to the same log
    out_dir = REPO / Path(directives["output"]).parent    # Slurm does not create it: it must exist
    assert out_dir.is_dir(), out_dir
    assert "monarch_slurm_main configs/" in script.read_text()


def test_recipes_exist():
    names = {p.name for p in CONFIGS}
    assert set(RECIPES) <= names, set(RECIPES) - names


@pytest.mark.parametrize("world", [None, "8", "16", "32"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_passes_dry_run(config: Path, world: str | None, monkeypatch, capsys):
    """Batch arithmetic checked for one process and for 1, 2 and 4 nodes of 8 GPUs."""
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        if config.name == "demo.yaml":
            pytest.skip("the demo is a one-process CPU run")
        monkeypatch.setenv("WORLD_SIZE", world)
    data = _demo_data() if "source: indexed" in config.read_text() else []
    rc = _pretrain_main()(["--config", str(config), "--dry-run", *data])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "phase plan" in out.out


def test_misspelt_key_in_a_config_is_rejected_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    text = (REPO / "configs" / "bert_large_monarch.yaml").read_text()
    assert "  warmup_fraction: 0.2843" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  warmup_fraction: 0.2843", "  warmup_fracton: 0.2843"))
    assert _pretrain_main()(["--config", str(bad), "--dry-run"]) == 2
    assert "lr_schedule.warmup_fracton" in capsys.readouterr().err


def test_misspelt_override_is_rejected_by_name(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = _pretrain_main()(["--config", str(REPO / "configs" / "gpt2_small_monarch.yaml"), "--dry-run",
                           "training.micro_batch_sise=8"])
    assert rc == 2
    assert "training.micro_batch_sise" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["bogus"], ["--config"]])
def test_batch_script_rejects_unknown_arguments(args):
    res = subprocess.run(["bash", "slurm/bert_large_monarch.sh", *args], cwd=REPO, capture_output=True,
                         text=True, env=_clean_env(NPROC="1"), timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_batch_script_outside_slurm_runs_torchrun_with_config_and_overrides():
    """CONFIG / OVERRIDES from the environment, command-line overrides applied after them."""
    env = _clean_env(NPROC="1", PYTHON=sys.executable, CONFIG="configs/gpt2_small_monarch.yaml",
                     OVERRIDES=" ".join(["training.total_steps=500", "run_name=from_env", *_demo_data()]))
    res = subprocess.run(["bash", "slurm/bert_large_monarch.sh", "training.total_steps=700", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "not inside a Slurm job: running torchrun on this machine" in out
    assert "total: 700 steps" in out                 # the command line wins over OVERRIDES
    assert "run_name: from_env" in out               # OVERRIDES applied
    assert "kind: gpt" in out                        # CONFIG from the environment


def test_two_node_launch_forms_one_world():
    """Two "nodes" on this machine, started as the batch script starts them on each node
    (node rank from SLURM_NODEID, node count from SLURM_NNODES), meet in one torchrun world."""
    port = str(20000 + os.getpid() % 10000)
    procs = []
    for node in (0, 1):
        env = _clean_env(NPROC="1", PYTHON=sys.executable, SLURM_NNODES="2", SLURM_NODEID=str(node),
                         MASTER_PORT=port, CONFIG="configs/bert_large_monarch.yaml")
        procs.append(subprocess.Popen(["bash", "slurm/bert_large_monarch.sh", "--dry-run", *_demo_data()], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-4000:]
        assert f"node_rank={node}" in out
        assert "world 2 = TP 1 x DP 2" in out, out[-4000:]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (optional lint)")
def test_scripts_pass_shellcheck():
    res = subprocess.run(["shellcheck", "-x", *map(str, ALL_SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_srun_line_for_multi_node_container_jobs(tmp_path):
    """Inside a (simulated) 2-node allocation: one task per node, the first host as MASTER_ADDR,
    the job's CPUs passed on, pyxis options only when CONTAINER_IMAGE is set. `srun` and
    `scontrol` are stand-ins that print what they were given."""
    (tmp_path / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (tmp_path / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a01\\ngpu-a02\\n"\n')
    for f in ("srun", "scontrol"):
        (tmp_path / f).chmod(0o755)
    base = _clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
                      SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_CPUS_PER_TASK="64", SLURM_SUBMIT_DIR=str(REPO))

    def srun_args(**extra: str) -> list[str]:
        res = subprocess.run(["bash", "slurm/gpt2_monarch.sh", "output_dir=/shared/r1"], cwd=REPO,
                             capture_output=True, text=True, env={**base, **extra}, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        return [line for line in res.stdout.splitlines() if not line.startswith("[monarch-slurm")]

    plain = srun_args()
    assert plain[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert {f"--chdir={REPO}", "--cpus-per-task=64"} <= set(plain[3:6])
    assert not any(a.startswith("--container") for a in plain)
    for flag in ("--nnodes=2", "--nproc_per_node=8", "--master_addr=gpu-a01", "--master_port=14242"):
        assert flag in plain, plain
    assert plain[-4:] == ["launcher/pretrain.py", "--config", "configs/gpt2_small_monarch.yaml", "output_dir=/shared/r1"]

    boxed = srun_args(CONTAINER_IMAGE="/shared/monarch.sqsh", PROJECT_DIR="/opt/monarch-megatron", GPUS_PER_NODE="4")
    assert "--container-image=/shared/monarch.sqsh" in boxed
    assert "--container-workdir=/opt/monarch-megatron" in boxed
    assert not any(a.startswith(("--chdir", "--container-mounts")) for a in boxed)  # not a host path
    assert "--nproc_per_node=4" in boxed

    mounted = srun_args(CONTAINER_IMAGE="/shared/monarch.sqsh")
    assert f"--container-mounts={REPO}:{REPO}" in mounted
