"""The in-job switch and resume around it: the fixed-batch validation loss before and after the
switch agree (rel 1e-5, fp32); a run killed before, during or after the switch (its checkpoint
directory cut back to what such a kill leaves) resumes to the uninterrupted run's final state
(identical losses and weights); so does a run stopped by SIGTERM during the Monarch phase's last
step or during the switch (the checkpoint it leaves is the phase-end / switch one, and the resume
switches once); evaluate.py gives a Monarch checkpoint and its dense conversion the same val_loss."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, checkpoint_weights, metrics_by_step, tiny_overrides

TINY = tiny_overrides(
    "training.total_steps=10", "training.log_interval=5", "training.eval_interval=100", "training.eval_iters=2",
    "training.save_interval=3", "training.keep_last=10", "phases.0.share=0.6", "phases.0.monarch.nblocks=2",
    "phases.1.share=0.4",
)


def cfg_for(out: str, *extra: str):
    return load_config(DEMO, [f"output_dir={out}", *TINY, *extra])


def train(out: str, *extra: str) -> dict:
    from monarch_megatron.training.run import train as run_train

    return run_train(cfg_for(out, *extra))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("switch_reference"))
    train(out)
    return out


def test_switch_validation_loss_is_unchanged(reference: str) -> None:
    switch = metrics_by_step(reference, "switch")
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
    resumed, ref = metrics_by_step(out, "train"), metrics_by_step(reference, "train")
    first = min(resumed)
    assert first == {"before": 4, "during": 7, "after": 7}[where]
    for step in range(first, 11):
        assert resumed[step]["loss"] == ref[step]["loss"], step
    if where != "after":  # the switch is re-done from the Monarch checkpoint, identically
        redone, first_time = metrics_by_step(out, "switch")[6], metrics_by_step(reference, "switch")[6]
        for key in ("val-loss-before", "val-loss-after"):
            assert redone[key] == first_time[key]
    final, ref_final = checkpoint_weights(out, "step0000010-dense"), checkpoint_weights(reference, "step0000010-dense")
    assert final.keys() == ref_final.keys()
    for key in final:
        assert torch.equal(final[key], ref_final[key]), key
    state = json.load(open(os.path.join(out, "checkpoints", "step0000010-dense", "run_state.json")))
    assert state["phase_kind"] == "dense" and state["step"] == 10 and state["complete"]


@pytest.mark.parametrize("when,extra,saved", [
    ("last-step", [], "step0000006-monarch"),  # used to save nothing: the resume redid steps 4-6
    ("switch", [], "step0000006-dense"),
    ("switch", ["training.save_at_switch=false"], "step0000006-dense"),
])
def test_signal_at_phase_end_or_switch_saves_and_resumes_to_the_same_final_state(
        reference: str, tmp_path, monkeypatch, when: str, extra, saved: str) -> None:
    from monarch_megatron.training import loop

    if when == "last-step":  # SIGTERM while the Monarch phase's last step (step 6) runs
        original = loop.learning_rate

        def hook(phase, step, total):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(phase, step, total)

        monkeypatch.setattr(loop, "learning_rate", hook)
    else:  # SIGTERM while the Monarch -> dense switch runs
        original = loop.transition

        def hook(trainer, old, new):
            os.kill(os.getpid(), signal.SIGTERM)
            return original(trainer, old, new)

        monkeypatch.setattr(loop, "transition", hook)
    out = str(tmp_path)
    assert train(out, *extra) == {"stopped": True, "step": 6}
    monkeypatch.undo()
    from monarch_megatron.training.checkpoint import CheckpointManager
    from monarch_megatron.training.distributed import Layout

    tag, _ = CheckpointManager(out, Layout(1, 0, 1, 0, 1, 0), 10).latest()
    assert tag == saved  # the resume point is the phase end (or the switch), not step 3
    state = json.load(open(os.path.join(out, "checkpoints", saved, "run_state.json")))
    assert state["step"] == 6 and state["complete"]
    assert train(out, *extra)["step"] == 10
    assert {k: r["loss"] for k, r in metrics_by_step(out, "train").items()} == {k: r["loss"] for k, r in metrics_by_step(reference, "train").items()}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert sum(json.loads(line)["kind"] == "switch" for line in f) == 1  # switched once, no redo
    final, ref_final = checkpoint_weights(out, "step0000010-dense"), checkpoint_weights(reference, "step0000010-dense")
    for key in ref_final:
        assert torch.equal(final[key], ref_final[key]), key


def test_evaluate_gives_monarch_checkpoint_and_its_dense_switch_the_same_val_loss(reference: str) -> None:
    from monarch_megatron.training.evaluate import evaluate

    cfg = cfg_for(reference)
    ckpt = os.path.join(reference, "checkpoints")
    monarch = evaluate(cfg, os.path.join(ckpt, "step0000006-monarch"))
    dense = evaluate(cfg, os.path.join(ckpt, "step0000006-dense"), phase="monarch")
    assert dense["loss"] == pytest.approx(monarch["loss"], rel=1e-5)
    assert dense["loss"] != pytest.approx(evaluate(cfg, os.path.join(ckpt, "step0000010-dense"))["loss"], rel=1e-6)
