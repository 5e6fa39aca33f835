"""launcher/plot_runs.py on two real tiny demo runs (Monarch -> dense, and dense only): the figure
draws exactly the rows of each run's metrics.jsonl against steps and training seconds, with the
switch marked; a missing run, a directory without metrics.jsonl, an unknown metric and a missing
matplotlib are one-line errors (exit 2) that write nothing."""

from __future__ import annotations

import itertools
import os
import sys

import pytest

from monarch_megatron.training.config import load_config

from tiny_demo import DEMO, load_launcher, metrics_by_step, tiny_overrides

plot_runs = load_launcher("plot_runs")

# 6 steps, validation every 2; no checkpoint saves before the end (the plot reads metrics.jsonl only).
SCHEDULE = ("training.total_steps=6", "training.log_interval=2", "training.eval_interval=2", "training.eval_iters=1",
            "training.save_interval=100", "training.keep_last=1")
REVERSE = ("phases.0.share=0.5", "phases.0.monarch.nblocks=2", "phases.1.share=0.5")  # the switch after step 3
DENSE = ("phases=[{name: dense, share: 1.0, monarch: null}]",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    from monarch_megatron.training.run import train

    out = {}
    for name, phases in (("reverse", REVERSE), ("dense", DENSE)):
        out[name] = str(tmp_path_factory.mktemp(name))
        train(load_config(DEMO, [f"output_dir={out[name]}", *tiny_overrides(*SCHEDULE, *phases)]))
    return out


def _expected_seconds(run_dir: str) -> dict[int, float]:
    """Training seconds at each step, from the records: step times summed, the switch after its step."""
    train, switch = metrics_by_step(run_dir, "train"), metrics_by_step(run_dir, "switch")
    seconds = itertools.accumulate(train[s]["iteration-time"] + (switch[s - 1]["seconds"] if s - 1 in switch else 0.0)
                                   for s in sorted(train))
    return dict(zip(sorted(train), seconds))


def test_figure_draws_each_runs_records_against_steps_and_seconds_with_the_switch_marked(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the "plot" extra; the "test" extra installs it
    png = str(tmp_path / "figures" / "runs.png")  # the folder is created
    assert plot_runs.main([runs["reverse"], runs["dense"], "--output", png, "--metric", "lm loss"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {png}" and os.path.getsize(png) > 10_000

    curves = {name: plot_runs.load_curves(os.path.join(d, "metrics.jsonl"), "lm loss") for name, d in runs.items()}
    fig = plot_runs.plot_runs(curves, str(tmp_path / "again.png"), "lm loss")
    by_step, by_seconds = fig.axes
    for name, run_dir in runs.items():
        train, valid = metrics_by_step(run_dir, "train"), metrics_by_step(run_dir, "valid")
        seconds = _expected_seconds(run_dir)
        assert sorted(train) == list(range(1, 7)) and sorted(valid) == [2, 4, 6]
        for ax, x_of in ((by_step, float), (by_seconds, seconds.get)):
            lines = {line.get_label(): line for line in ax.get_lines()}
            for label, rows in ((f"{name}: training", train), (f"{name}: validation", valid)):
                line = lines[label]
                assert list(line.get_xdata()) == pytest.approx([x_of(s) for s in sorted(rows)])
                # "lm loss", not the validation row's own "loss" (lm + sop for BERT)
                assert list(line.get_ydata()) == pytest.approx([rows[s]["lm loss"] for s in sorted(rows)])
    # The switch: after step 3 of the reverse run only, in that run's colour, at the end of step 3.
    (switch_step,) = metrics_by_step(runs["reverse"], "switch")
    assert switch_step == 3
    for ax, x in ((by_step, 3.0), (by_seconds, _expected_seconds(runs["reverse"])[3])):
        lines = {line.get_label(): line for line in ax.get_lines()}
        marks = [line for line in ax.get_lines() if "switch to dense" in line.get_label()]
        assert [line.get_label() for line in marks] == ["reverse: switch to dense (step 3)"]
        assert list(marks[0].get_xdata()) == pytest.approx([x, x])
        assert marks[0].get_color() == lines["reverse: training"].get_color()


def test_missing_run_or_metrics_or_metric_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    png = str(tmp_path / "runs.png")
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    cases = [([str(tmp_path / "nowhere")], "no such run directory"),
             ([runs["dense"], str(empty)], "no metrics.jsonl"),
             ([runs["dense"], "--metric", "mlm loss"], "no training step records 'mlm loss' (it has: lm loss, loss, sop loss)")]
    for args, message in cases:
        assert plot_runs.main([*args, "--output", png]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not os.path.exists(png)


def test_without_matplotlib_the_error_names_the_install_command(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    png = str(tmp_path / "runs.png")
    assert plot_runs.main([runs["reverse"], "--output", png]) == 2
    assert capsys.readouterr().err == 'error: matplotlib is not installed: pip install -e ".[plot]" -c constraints.txt\n'
    assert not os.path.exists(png)
