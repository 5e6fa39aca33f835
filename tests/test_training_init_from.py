"""training.init_from (CPU, gloo): a new run starts from a checkpoint's model weights.

A tiny dense run (2 steps) is converted to Monarch (nblocks=2) with convert_checkpoint; a new run
with ``training.init_from`` and a Monarch first phase then starts from exactly those weights: its
fixed-batch loss right after loading equals that of the converted weights loaded into a fresh
model (rel 1e-6, fp32), at step 0 with fresh optimizer moments; in bf16 the fp32 master weights
equal the loaded weights. Resume wins over init_from. A converted checkpoint copied into a run's
checkpoints/ is never a resume point. Mismatches (nblocks, kind, model size, incomplete
checkpoint, TP) are one ConfigError naming training.init_from (exit 2 from pretrain.py), raised
before any process group, with the checkpoint untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, ROOT, tiny_overrides

TINY = tiny_overrides(
    "training.total_steps=2", "training.log_interval=1", "training.eval_interval=100", "training.eval_iters=1",
    "training.save_interval=100",
)
DENSE = "phases=[{name: dense, steps: 2, monarch: null}]"
SPARSE = "phases=[{name: sparse, steps: 2, monarch: {nblocks: 2}}]"


def cfg_for(out: str, *extra: str):
    return load_config(DEMO, [f"output_dir={out}", *TINY, *extra])


def train(out: str, *extra: str) -> dict:
    from monarch_megatron.training.run import train as run_train

    return run_train(cfg_for(out, *extra))


def convert(src: str, out: str, **kw) -> str:
    from monarch_megatron.convert.pipeline import convert_checkpoint

    convert_checkpoint(src, out, log=lambda line: None, **kw)
    return out


def digest(path: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))}


def train_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A dense trainer checkpoint and its Monarch (nblocks=2) conversion."""
    root = tmp_path_factory.mktemp("init_from")
    run = str(root / "dense_run")
    assert train(run, DENSE)["step"] == 2
    dense = os.path.join(run, "checkpoints", "step0000002-dense")
    return {"dense": dense, "monarch": convert(dense, str(root / "monarch2"), to="monarch", nblocks=2), "root": str(root)}


def _capture_start(monkeypatch, precision: str) -> dict:
    """Patch Trainer.train_phase: on its first call (right after the engine was built) record the
    step, the engine's fixed-batch loss, the fixed batch, the fp32 master weights and the optimizer state."""
    from monarch_megatron.models import build_model, forward_step
    from monarch_megatron.training import loop
    from monarch_megatron.training.switch import fixed_batch_loss, full_precision_params

    seen: dict = {}
    original = loop.Trainer.train_phase

    def hooked(self, phase):
        if not seen:
            from megatron.core import parallel_state

            batch = self.data(phase).valid_micro_batches()[0]
            seen.update(step=self.step, phase=phase.name,
                        loss=fixed_batch_loss(self.engine, batch, self.cfg.model.kind,
                                              parallel_state.get_data_parallel_group()),
                        masters=full_precision_params(self.engine, precision),
                        module={n: p.detach().clone() for n, p in self.engine.module.named_parameters()},
                        opt_state=len(self.engine.optimizer.optimizer.state))
            # The reference: the converted weights in a fresh fp32 model, same batch, eval mode.
            fresh = build_model(self.model_cfg, phase.monarch, "fp32")
            sd = torch.load(os.path.join(self.cfg.training.init_from, "mp_rank_00_model_states.pt"),
                            weights_only=False)["module"]
            fresh.load_state_dict(sd, strict=True)
            fresh.eval()
            with torch.no_grad():
                seen["reference"] = float(forward_step(fresh, batch, self.cfg.model.kind)[0])
            seen["weights"] = {k: v for k, v in sd.items() if torch.is_tensor(v)}
        return original(self, phase)

    monkeypatch.setattr(loop.Trainer, "train_phase", hooked)
    return seen


def test_new_run_starts_from_converted_weights_exactly(checkpoints, tmp_path, monkeypatch) -> None:
    out = str(tmp_path / "sparse")
    before = digest(checkpoints["monarch"])
    seen = _capture_start(monkeypatch, "fp32")
    summary = train(out, SPARSE, f"training.init_from={checkpoints['monarch']}")
    assert summary == {**summary, "stopped": False, "step": 2}
    assert seen["step"] == 0 and seen["phase"] == "sparse" and seen["opt_state"] == 0  # step 0, fresh moments
    assert seen["loss"] == pytest.approx(seen["reference"], rel=1e-6)
    for name, value in seen["masters"].items():
        assert torch.equal(value, seen["weights"][name]), name
    assert [r["step"] for r in train_rows(out)] == [1, 2]
    state = json.load(open(os.path.join(out, "checkpoints", "step0000002-sparse", "run_state.json")))
    assert state["phase_kind"] == "monarch" and state["monarch"]["nblocks"] == 2 and "converted_from" not in state
    log = open(os.path.join(out, "train.log")).read()
    assert f"initialised from the model weights of {checkpoints['monarch']}" in log and "is ignored" not in log
    assert digest(checkpoints["monarch"]) == before  # only read

    # Resume always wins: re-running the finished run does not re-initialise (nor train) and says so.
    assert train(out, SPARSE, f"training.init_from={checkpoints['monarch']}")["step"] == 2
    log = open(os.path.join(out, "train.log")).read()
    assert "is ignored" in log and "resuming always wins" in log and log.count("initialised from") == 1
    assert len(train_rows(out)) == 2


def test_bf16_master_weights_equal_the_loaded_fp32_weights(checkpoints, tmp_path, monkeypatch) -> None:
    seen = _capture_start(monkeypatch, "bf16")
    train(str(tmp_path / "bf16"), SPARSE, "precision.dtype=bf16", f"training.init_from={checkpoints['monarch']}")
    assert seen["masters"].keys() == seen["module"].keys()
    for name, master in seen["masters"].items():
        assert master.dtype == torch.float32 and torch.equal(master, seen["weights"][name]), name  # not bf16-rounded
        assert torch.equal(seen["module"][name], seen["weights"][name].to(torch.bfloat16)), name


def test_converted_checkpoint_in_checkpoints_dir_is_not_a_resume_point(checkpoints, tmp_path) -> None:
    from monarch_megatron.training.checkpoint import CheckpointManager, has_resume_point
    from monarch_megatron.training.distributed import Layout

    out = str(tmp_path)
    shutil.copytree(checkpoints["monarch"], os.path.join(out, "checkpoints", "step0000002-sparse"))
    manager = CheckpointManager(out, Layout(1, 0, 1, 0, 1, 0), 3)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("monarch_megatron.training")
    log.addHandler(handler)
    try:
        assert manager.latest() is None
    finally:
        log.removeHandler(handler)
    text = " ".join(r.getMessage() for r in records)
    assert "converted checkpoint" in text and "training.init_from=" in text
    assert not has_resume_point(out) and manager.complete() == []
    manager.prune()  # never deletes it either
    assert os.path.isdir(os.path.join(out, "checkpoints", "step0000002-sparse"))


def _incomplete(checkpoints) -> str:
    path = os.path.join(checkpoints["root"], "incomplete")
    if not os.path.isdir(path):
        shutil.copytree(checkpoints["monarch"], path)
        state = json.load(open(os.path.join(path, "run_state.json")))
        state.pop("complete")
        json.dump(state, open(os.path.join(path, "run_state.json"), "w"))
    return path


def _tp2(checkpoints) -> str:
    path = os.path.join(checkpoints["root"], "monarch2_tp2")
    return path if os.path.isdir(path) else convert(checkpoints["monarch"], path, to="monarch", tensor_parallel=2)


@pytest.mark.parametrize("case,source,extra,expect", [
    ("nblocks", "monarch", ["phases=[{name: sparse, steps: 2, monarch: {nblocks: 4}}]"], "nblocks=2"),
    ("kind", "monarch", [DENSE], "is a monarch checkpoint (phase_kind)"),
    ("dense-into-monarch", "dense", [SPARSE], "--to monarch --nblocks 2"),
    ("model size", "monarch", [SPARSE, "model.ffn_hidden_size=128"], "model.ffn_hidden_size is 64"),
    ("incomplete", "incomplete", [SPARSE], "not a complete checkpoint"),
    ("missing", "nowhere", [SPARSE], "is not a directory"),
    ("tp", "tp2", [SPARSE], "--tensor-parallel 1"),
])
def test_mismatch_is_one_config_error_before_any_work(checkpoints, tmp_path, case, source, extra, expect) -> None:
    from monarch_megatron.training.schema_io import ConfigError

    path = {"incomplete": lambda: _incomplete(checkpoints), "tp2": lambda: _tp2(checkpoints),
            "nowhere": lambda: str(tmp_path / "nowhere")}.get(source, lambda: checkpoints[source])()
    before = digest(path) if os.path.isdir(path) else None
    out = str(tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        train(out, *extra, f"training.init_from={path}")
    assert str(err.value).startswith("config error: training.init_from: ") and expect in str(err.value), str(err.value)
    assert not os.path.exists(out)  # nothing done: no output_dir, no process group, no data
    if before is not None:
        assert digest(path) == before


def test_pretrain_cli_exits_2_naming_the_key(checkpoints, tmp_path) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config", DEMO, f"output_dir={tmp_path}/run",
           *TINY, "phases=[{name: sparse, steps: 2, monarch: {nblocks: 4}}]", f"training.init_from={checkpoints['monarch']}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "training.init_from" in r.stderr and "nblocks" in r.stderr
