"""The in-job switch and resume around it: the fixed-batch validation loss before and after the
switch agree (rel 1e-5, fp32); a run killed before, during or after the switch (its checkpoint
directory cut back to what such a kill leaves) resumes to the uninterrupted run's final state
(identical losses and weights); evaluate.py gives a Monarch checkpoint and its dense conversion
the same val_loss."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
import torch

from monarch_megatron.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
DATA = os.path.join(tempfile.gettempdir(), "monarch_megatron_test_demo_data")
TINY = [
    f"data.cache_dir={DATA}", "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
    "model.ffn_hidden_size=64", "model.max_position_embeddings=32", "training.seq_length=32",
    "training.micro_batch_size=4", "training.global_batch_size=8", "training.total_steps=10",
    "training.log_interval=5", "training.eval_interval=100", "training.eval_iters=2", "training.save_interval=3",
    "training.keep_last=10", "phases.0.share=0.6", "phases.0.monarch.nblocks=2", "phases.1.share=0.4",
]


def cfg_for(out: str):
    return load_config(DEMO, [f"output_dir={out}", *TINY])


def train(out: str) -> dict:
    from monarch_megatron.training.run import train as run_train

    return run_train(cfg_for(out))


def rows(out: str, kind: str) -> dict[int, dict]:
    found = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == kind:
                found[row["step"]] = row
    return found


def weights(out: str, tag: str) -> dict[str, torch.Tensor]:
    path = os.path.join(out, "checkpoints", tag, "mp_rank_00_model_states.pt")
    return {k: v for k, v in torch.load(path, weights_only=False)["module"].items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("switch_reference"))
    train(out)
    return out


def test_switch_validation_loss_is_unchanged(reference: str) -> None:
    switch = rows(reference, "switch")
    assert list(switch) == [6]
    assert switch[6]["val-loss-after"] == pytest.approx(switch[6]["val-loss-before"], rel=1e-5)
    tags = sorted(t for t in os.listdir(os.path.join(reference, "checkpoints")) if t.startswith("step"))
    assert tags == ["step0000003-monarch", "step0000006-dense", "step0000006-monarch", "step0000009-dense",
                    "step0000010-dense"]


def _cut_back(reference: str, out: str, keep: list[str]) -> None:
    """The checkpoint directory a kill at that point leaves (plus a torn save in .staging)."""
    for tag in keep:
        shutil.copytree(os.path.join(reference, "checkpoints", tag), os.path.join(out, "checkpoints", tag))
    torn = os.path.join(out, "checkpoints", ".staging", "step0000009-dense")
    os.makedirs(torn)
    open(os.path.join(torn, "mp_rank_00_model_states.pt"), "wb").close()


@pytest.mark.parametrize("where,keep", [
    ("before", ["step0000003-monarch"]),
    ("during", ["step0000003-monarch", "step0000006-monarch"]),  # Monarch saved, dense not yet
    ("after", ["step0000003-monarch", "step0000006-monarch", "step0000006-dense"]),
])
def test_killed_around_the_switch_resumes_to_the_same_final_state(reference: str, tmp_path, where: str, keep) -> None:
    out = str(tmp_path)
    _cut_back(reference, out, keep)
    assert train(out)["step"] == 10
    resumed, ref = rows(out, "train"), rows(reference, "train")
    first = min(resumed)
    assert first == {"before": 4, "during": 7, "after": 7}[where]
    for step in range(first, 11):
        assert resumed[step]["loss"] == ref[step]["loss"], step
    if where != "after":  # the switch is re-done from the Monarch checkpoint, identically
        redone, first_time = rows(out, "switch")[6], rows(reference, "switch")[6]
        for key in ("val-loss-before", "val-loss-after"):
            assert redone[key] == first_time[key]
    final, ref_final = weights(out, "step0000010-dense"), weights(reference, "step0000010-dense")
    assert final.keys() == ref_final.keys()
    for key in final:
        assert torch.equal(final[key], ref_final[key]), key
    state = json.load(open(os.path.join(out, "checkpoints", "step0000010-dense", "run_state.json")))
    assert state["phase_kind"] == "dense" and state["step"] == 10 and state["complete"]


def test_evaluate_gives_monarch_checkpoint_and_its_dense_switch_the_same_val_loss(reference: str) -> None:
    from monarch_megatron.training.evaluate import evaluate

    cfg = cfg_for(reference)
    ckpt = os.path.join(reference, "checkpoints")
    monarch = evaluate(cfg, os.path.join(ckpt, "step0000006-monarch"))
    dense = evaluate(cfg, os.path.join(ckpt, "step0000006-dense"), phase="monarch")
    assert dense["loss"] == pytest.approx(monarch["loss"], rel=1e-5)
    assert dense["loss"] != pytest.approx(evaluate(cfg, os.path.join(ckpt, "step0000010-dense"))["loss"], rel=1e-6)
