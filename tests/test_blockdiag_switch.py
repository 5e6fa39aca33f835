"""The demo config with ``monarch.kind: blockdiag`` through the real trainer (CPU, one process, fp32):
block-diagonal phase, the in-job switch to dense, checkpoints; then launcher/convert_checkpoint.py
and evaluate on its checkpoints.

Checked: the switch is exact (fixed-batch loss before == after); the block-diagonal checkpoint
records its kind; its offline dense conversion evaluates to the block-diagonal checkpoint's
validation loss; projecting that dense conversion back (``--to blockdiag``) returns the trained
blocks bit for bit; resharding to TP=2 and back is exact.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, load_launcher, metrics_by_step, tiny_overrides

OVERRIDES = tiny_overrides(
    "training.global_batch_size=4", "training.total_steps=4", "training.eval_iters=1", "training.eval_interval=100",
    "training.save_interval=100", "phases.0.share=0.5", "phases.0.monarch.kind=blockdiag", "phases.1.share=0.5",
    "phases.1.rewarmup_steps=0",
)
BLOCKDIAG_TAG = "step0000002-monarch"  # the demo's first phase is named "monarch"
CONVERT = load_launcher("convert_checkpoint").main


def _module(path: str, rank: int = 0) -> dict:
    return torch.load(os.path.join(path, f"mp_rank_{rank:02d}_model_states.pt"), map_location="cpu",
                      weights_only=False)["module"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    from monarch_megatron.training.run import train

    base = tmp_path_factory.mktemp("blockdiag")
    out = str(base / "run")
    cfg = load_config(DEMO, [f"output_dir={out}", *OVERRIDES])
    summary = train(cfg)
    assert summary["step"] == 4 and not summary["stopped"]
    paths = {"out": out, "cfg": cfg, "blockdiag": os.path.join(out, "checkpoints", BLOCKDIAG_TAG),
             "dense": str(base / "dense"), "back": str(base / "back"), "tp2": str(base / "tp2"), "tp1": str(base / "tp1")}
    assert CONVERT(["--input", paths["blockdiag"], "--output", paths["dense"], "--to", "dense"]) == 0
    return paths


def test_switch_is_exact_and_the_checkpoint_records_the_kind(run):
    switch = metrics_by_step(run["out"], "switch")
    assert len(switch) == 1
    rec = next(iter(switch.values()))
    assert rec["val-loss-after"] == pytest.approx(rec["val-loss-before"], rel=1e-5)
    state = json.load(open(os.path.join(run["blockdiag"], "run_state.json")))
    assert state["phase_kind"] == "monarch"
    assert state["monarch"] == {"kind": "blockdiag", "layers": ["fc1", "fc2", "qkv", "proj"], "nblocks": 4}
    module = _module(run["blockdiag"])
    assert any(k.endswith("mlp.linear_fc1.blkdiag") for k in module)
    assert not any(k.endswith((".blkdiag1", ".blkdiag2")) for k in module)


def test_converted_dense_checkpoint_evaluates_to_the_same_loss(run):
    from monarch_megatron.training.evaluate import evaluate

    dense_state = json.load(open(os.path.join(run["dense"], "run_state.json")))
    assert dense_state["phase_kind"] == "dense" and dense_state["converted_from"]["monarch"]["kind"] == "blockdiag"
    a = evaluate(run["cfg"], run["blockdiag"])["loss"]
    b = evaluate(run["cfg"], run["dense"])["loss"]
    assert b == pytest.approx(a, rel=1e-5)


def test_projection_of_the_dense_conversion_returns_the_blocks_and_resharding_is_exact(run, capsys):
    assert CONVERT(["--input", run["dense"], "--output", run["back"], "--to", "blockdiag", "--nblocks", "4"]) == 0
    errors = [float(e) for e in re.findall(r"nblocks=4\s+relative error (\S+)", capsys.readouterr().out)]
    assert errors and max(errors) < 1e-6  # block-diagonal inputs project exactly
    src, back = _module(run["blockdiag"]), _module(run["back"])
    assert list(src) == list(back)
    assert all(torch.equal(src[k], back[k]) for k in src if torch.is_tensor(src[k]))
    state = json.load(open(os.path.join(run["back"], "run_state.json")))
    assert state["monarch"] == {"kind": "blockdiag", "layers": ["fc1", "fc2", "qkv", "proj"], "nblocks": 4}

    assert CONVERT(["--input", run["blockdiag"], "--output", run["tp2"], "--to", "blockdiag", "--tensor-parallel", "2"]) == 0
    fc1 = next(k for k in src if k.endswith("mlp.linear_fc1.blkdiag"))
    assert _module(run["tp2"], 1)[fc1].shape == (2, *src[fc1].shape[1:])  # whole blocks per rank
    assert CONVERT(["--input", run["tp2"], "--output", run["tp1"], "--to", "blockdiag", "--tensor-parallel", "1"]) == 0
    tp1 = _module(run["tp1"])
    assert all(torch.equal(src[k], tp1[k]) for k in src if torch.is_tensor(src[k]))
