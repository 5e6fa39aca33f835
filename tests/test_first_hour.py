"""What a new user reads (issue 17): the progress line, dated logs, pruned checkpoints said, the
dry-run's learning rates, notes for silent surprises, converted checkpoints that hold only their
tensors. Tiny CPU runs; fixed seed."""

from __future__ import annotations

import logging
import os
import re

import pytest

from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, tiny_overrides

SEED = 1703


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> str:
    """6 steps, a checkpoint every step, keep_last=1: older ones are removed as the run goes."""
    from monarch_megatron.training.run import train

    out = str(tmp_path_factory.mktemp("pruned"))
    train(load_config(DEMO, [f"output_dir={out}", *tiny_overrides(
        "training.total_steps=6", "training.log_interval=2", "training.eval_interval=100", "training.eval_iters=1",
        "training.save_interval=1", "training.keep_last=1", "phases.0.share=0.5", "phases.0.monarch.nblocks=2",
        "phases.1.share=0.5", f"seed={SEED}")]))
    return out


def test_pruned_checkpoints_are_logged(pruned_run):
    log = open(os.path.join(pruned_run, "train.log")).read()
    removed = re.findall(r"removed checkpoint (\S+) \(training.keep_last=1", log)
    assert removed and all(not os.path.exists(p) for p in removed)
    assert any(p.endswith("step0000001-monarch") for p in removed)


def test_progress_line_has_megatrons_fields_and_dated_timestamps(pruned_run):
    lines = [line for line in open(os.path.join(pruned_run, "train.log")) if "] | samples" in line]
    assert lines
    line = lines[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 2/6 \[monarch\] \| samples 16 tokens 512 \| [\d,.]+ ms/step", line)
    assert "TFLOP/s |" in line and "TFLOP/s/GPU" not in line  # no GPU here
    assert "loss scale" not in line  # fp32: no dynamic loss scale to show


def test_progress_line_shows_the_fp16_loss_scale():
    from monarch_megatron.training.metrics import Metrics, logger

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())

    m = Metrics("unused", is_logger=False, total_steps=10, show_loss_scale=True)
    m.is_logger = True  # no files: only the window and the line
    m._window = [{"loss": 2.0, "lm loss": 2.0, "tokens-per-sec": 10.0, "throughput": 1.0, "iteration-time": 0.5,
                  "learning-rate": 1e-4, "loss-scale": 32768.0, "consumed-samples": 8, "consumed-tokens": 256}]
    logger.addHandler(handler)
    try:
        m.progress_line(1, "p")
    finally:
        logger.removeHandler(handler)
    assert "loss scale 32768" in lines[-1] and "500.0 ms/step" in lines[-1]


def test_a_run_logs_a_start_marker_and_its_plan(pruned_run):
    log = open(os.path.join(pruned_run, "train.log")).read()
    assert re.search(r"===== run started on \S+ \(pid \d+\), \d{4}-\d\d-\d\d", log)
    assert "# phase plan" in log and "accumulation" in log and "lr first" in log


def test_dry_run_shows_first_peak_and_last_learning_rate(capsys, monkeypatch):
    from tiny_demo import load_launcher

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # Warm-up over 5% of 150 steps, linear decay: the peak is the configured lr, reached after warm-up.
    assert load_launcher("pretrain").main(["--config", DEMO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    first, peak, last = re.search(r"\[0\] monarch.*?lr first ([\d.e+-]+), peak ([\d.e+-]+), last ([\d.e+-]+)",
                                  out, re.S).groups()
    assert float(peak) == pytest.approx(1e-2) and float(first) < float(peak) and float(last) < float(peak)


def test_padding_by_nblocks_is_noted(capsys, monkeypatch):
    from tiny_demo import load_launcher

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert load_launcher("pretrain").main(["--config", DEMO, "--dry-run", "phases.0.monarch.nblocks=3"]) == 0
    out = capsys.readouterr().out
    assert "note: phases[0].monarch: fc1 (128->512) with nblocks=3 is computed zero-padded to 129->513" in out
    assert load_launcher("pretrain").main(["--config", DEMO, "--dry-run"]) == 0
    assert "zero-padded" not in capsys.readouterr().out


def _tensor_bytes(path: str) -> int:
    import torch

    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return sum(v.numel() * v.element_size() for v in module.values() if torch.is_tensor(v))


def test_converting_a_dense_checkpoint_to_dense_says_so_and_holds_only_its_tensors(pruned_run, tmp_path):
    from monarch_megatron.convert.pipeline import convert_checkpoint

    lines: list[str] = []
    src = os.path.join(pruned_run, "checkpoints", "step0000006-dense")
    out = str(tmp_path / "dense_tp2")
    convert_checkpoint(src, out, "dense", tensor_parallel=2, log=lines.append)
    assert any("note: the input already is dense: the output is an exact copy of its weights, resharded from "
               "TP=1 to TP=2" in line for line in lines)
    for rank in (0, 1):
        path = os.path.join(out, f"mp_rank_{rank:02d}_model_states.pt")
        assert os.path.getsize(path) <= 1.05 * _tensor_bytes(path) + 64 * 1024  # + pickle and metadata
