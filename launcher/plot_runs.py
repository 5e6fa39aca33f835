#!/usr/bin/env python
"""Loss curves of training runs from their metrics.jsonl: training loss, and validation loss where
the run evaluated, against steps and against training seconds; one colour per run, each run's
switch to dense marked by a dotted line.

    python launcher/plot_runs.py runs/demo --output runs.png
    python launcher/plot_runs.py runs/bert_monarch runs/bert_dense --output bert.png --metric "lm loss"

Training seconds are the sum of the step times plus the switch: start-up, validation and checkpoint
saves are left out (see monarch_megatron/training/loss_curves.py). Needs matplotlib
(``pip install -e ".[plot]"``). Exit code 2, with one line, for a missing run directory, one
without metrics.jsonl or without the metric, or no matplotlib; nothing is drawn then.
"""

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monarch_megatron.training.loss_curves import (  # noqa: E402
    PlottingUnavailable,
    draw_curve,
    finish_axes,
    mark_switches,
    pyplot,
    read_records,
    run_curves,
    save_figure,
)


class RunError(Exception):
    """A run directory that cannot be plotted (the message names it)."""


def metrics_file(run_dir: str) -> str:
    """``run_dir``'s metrics.jsonl; RunError when the directory or the file is missing."""
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunError(f"{run_dir}: no metrics.jsonl (not a run's output_dir, or the run has not logged a step yet)")
    return path


def load_curves(path: str, metric: str) -> dict:
    """The run's curves of ``metric`` (:func:`run_curves`); RunError when no training step has it."""
    rows = read_records(path)
    curves = run_curves(rows, metric)
    if not curves["train"]:
        names = sorted({k for r in rows if r.get("kind") == "train" for k in r if "loss" in k and k != "loss-scale"})
        raise RunError(f"{path}: no training step records {metric!r}"
                       + (f" (it has: {', '.join(names)})" if names else " (no training steps yet)"))
    return curves


def plot_runs(runs: dict[str, dict], output: str, metric: str = "loss"):
    """Draw ``runs`` (name -> :func:`load_curves`) into ``output``; returns the (closed) figure."""
    plt = pyplot()
    fig, (by_step, by_seconds) = plt.subplots(1, 2, figsize=(13, 4.8))
    for index, (name, curves) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        for ax, x in ((by_step, "step"), (by_seconds, "seconds")):
            draw_curve(ax, curves["train"], x, color=colour, linewidth=1, label=f"{name}: training")
            if curves["valid"]:
                draw_curve(ax, curves["valid"], x, color=colour, linestyle="--", marker="o", markersize=4,
                           label=f"{name}: validation")
            mark_switches(ax, curves["switch"], x, colour, prefix=f"{name}: ")
    finish_axes(by_step, "step", metric, f"{metric} vs step")
    finish_axes(by_seconds, "training seconds (step times + switch)", metric, f"{metric} vs training seconds")
    save_figure(fig, output)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (holding metrics.jsonl)")
    p.add_argument("--output", default="runs.png", help="the image to write (default %(default)s)")
    p.add_argument("--metric", default="loss", help='the loss to draw, e.g. "lm loss" (default %(default)s)')
    args = p.parse_args(argv)
    try:
        # Cheapest checks first: every path, then matplotlib, and only then read the records.
        paths = {os.path.normpath(d): metrics_file(d) for d in args.run_dirs}
        pyplot()
        runs = {name: load_curves(path, args.metric) for name, path in paths.items()}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        plot_runs(runs, args.output, args.metric)
    except (RunError, PlottingUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
