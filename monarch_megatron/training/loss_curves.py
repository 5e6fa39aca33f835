"""Loss curves of a run from its ``metrics.jsonl`` (written by :mod:`.metrics`), and the matplotlib
drawing that ``launcher/plot_runs.py`` and ``benchmarks/time_to_quality.py`` share.

The time axis is **training seconds**: the running sum of the steps' ``iteration-time`` plus each
switch to dense (its ``switch`` record's ``seconds``, counted after the step it follows). Start-up,
validation and checkpoint saves are left out: they do not depend on the layers being compared, and
metrics.jsonl records no clock time that would include them.

matplotlib is optional (``pip install -e ".[plot]"``): it is imported only by :func:`pyplot`, which
raises :class:`PlottingUnavailable` with that command when it is missing.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

INSTALL_HINT = 'pip install -e ".[plot]" -c constraints.txt'


class PlottingUnavailable(ImportError):
    """matplotlib is not installed."""


def read_records(path: str) -> list[dict]:
    """The rows of a metrics.jsonl, in file order. A line torn by a kill is skipped: the run
    rewrites that step when it resumes (:meth:`.metrics.Metrics.resume_at`)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "kind" in row and "step" in row:
                rows.append(row)
    return rows


def _last_per_step(rows: Sequence[dict], kind: str) -> list[dict]:
    """The last ``kind`` row of each step, by step: a re-done step counts once."""
    by_step = {int(r["step"]): r for r in rows if r.get("kind") == kind}
    return [by_step[s] for s in sorted(by_step)]


def training_seconds(rows: Sequence[dict], excess: Mapping[int, float] | None = None) -> tuple[dict[int, float], float]:
    """Training seconds at the end of each training step, and in all (the module docstring's axis).

    ``excess``: step -> seconds to take off that step's time (the benchmark removes graph
    re-captures that an uninterrupted run would not do)."""
    excess = excess or {}
    switch_seconds = {int(r["step"]): float(r.get("seconds") or 0.0) for r in _last_per_step(rows, "switch")}
    at, total = {}, 0.0
    for r in _last_per_step(rows, "train"):
        step = int(r["step"])
        total += float(r["iteration-time"]) - excess.get(step, 0.0)
        at[step] = total
        total += switch_seconds.get(step, 0.0)  # the switch follows this step
    return at, total


def run_curves(rows: Sequence[dict], metric: str = "loss", excess: Mapping[int, float] | None = None) -> dict[str, Any]:
    """A run's curves of ``metric``, each point with ``step``, ``seconds`` and ``loss``:

    * ``train``: every training step that recorded ``metric``;
    * ``valid``: every validation that recorded it (with the validation row's other values too);
    * ``switch``: each switch to dense, at the end of the step it follows (``seconds``), with its
      record's values (``switch_seconds``: how long the switch took);
    * ``train_seconds``: the run's training seconds in all.
    """
    at, total = training_seconds(rows, excess)
    train = [{"step": int(r["step"]), "seconds": at[int(r["step"])], "loss": r[metric]}
             for r in _last_per_step(rows, "train") if r.get(metric) is not None]
    # ``loss`` last: a validation row has a ``loss`` of its own (BERT: lm + sop), which is not ``metric``'s.
    valid = [{**{k: v for k, v in r.items() if k != "kind"}, "step": int(r["step"]), "seconds": at[int(r["step"])],
              "loss": r[metric]}
             for r in _last_per_step(rows, "valid") if r.get(metric) is not None and int(r["step"]) in at]
    switch = [{**{k: v for k, v in r.items() if k not in ("kind", "seconds")}, "step": int(r["step"]),
               "seconds": at.get(int(r["step"])), "switch_seconds": r.get("seconds")}
              for r in _last_per_step(rows, "switch")]
    return {"train": train, "valid": valid, "switch": switch, "train_seconds": total}


# -- drawing (matplotlib) ---------------------------------------------------------------------------
def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: no display needed on a cluster node)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlottingUnavailable(f"matplotlib is not installed: {INSTALL_HINT}") from err
    return plt


def draw_curve(ax, points: Sequence[dict], x: str, scale: float = 1.0, **style):
    """Points' ``loss`` against their ``x`` (``step``, ``tokens``, ``seconds``) times ``scale``;
    ``style``: matplotlib's line keywords. Returns the line."""
    (line,) = ax.plot([pt[x] * scale for pt in points], [pt["loss"] for pt in points], **style)
    return line


def mark_switches(ax, switches: Sequence[dict], x: str, colour: str, scale: float = 1.0, prefix: str = "") -> None:
    """A dotted vertical line in the run's colour at each switch to dense."""
    for sw in switches:
        if sw.get(x) is not None:
            ax.axvline(sw[x] * scale, color=colour, linestyle=":", linewidth=1,
                       label=f"{prefix}switch to dense (step {sw['step']})")


def finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
