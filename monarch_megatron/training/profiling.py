"""A profiler in the service: ``training.profile.start_step`` / ``num_steps`` record a
torch.profiler trace of those optimizer steps and log a one-screen summary.

Written per rank into ``<output_dir>/profile/``:

* ``rank<R>_steps<A>-<B>.pt.trace.json``: the Chrome-format trace (open it in Perfetto,
  https://ui.perfetto.dev, or ``chrome://tracing``; TensorBoard's profile plugin reads it too);
* ``rank<R>_steps<A>-<B>.summary.json``: the numbers of the summary.

The summary (logged by rank 0): wall time per step (host clock, the device synchronised at both
ends of the window), device busy time per step (the union of the intervals in which any kernel,
copy or memset ran, so overlapping work is counted once) and its share of the wall time, aten
operators issued per step (what the host had to launch) and the top device kernels by time, or
on CPU the top operators by self CPU time. Like Megatron-LM's ``--profile`` and torchtitan's
``profiling.enable_profiling``, but it runs on CPU too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from .config import ProfileSection

logger = logging.getLogger("monarch_megatron.training")

TOP_KERNELS = 40  # in the summary file; the log shows the first LOGGED
TOP_HOST_OPS = 20
LOGGED = 12


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (``(start, end)`` pairs, any order, may overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(events, num_steps: int, wall_seconds: float, on_device: bool) -> dict[str, Any]:
    """The summary numbers of a finished profile.

    ``events``: the profiler's ``events()`` (FunctionEvents); ``num_steps`` steps took
    ``wall_seconds`` of host time in all. Device intervals are the events whose ``device_type`` is
    CUDA (kernels, memcpy, memset), leaving out user annotations (``record_function`` ranges drawn
    on the device timeline), which span idle gaps too and are listed apart under ``ranges``; times
    in the result are milliseconds per step.
    """
    from torch.autograd import DeviceType

    device_intervals, by_kernel, by_op, ranges = [], {}, {}, {}
    aten_ops = 0
    for e in events:
        if e.device_type == DeviceType.CUDA and getattr(e, "is_user_annotation", False):
            # A ``record_function`` range projected onto the device timeline ("micro-steps",
            # "Optimizer.step#..."): it spans idle gaps too, so it is reported apart and never
            # counted as device work.
            r = ranges.setdefault(e.name, [0.0, 0])
            r[0] += e.time_range.end - e.time_range.start
            r[1] += 1
        elif e.device_type == DeviceType.CUDA:
            device_intervals.append((e.time_range.start, e.time_range.end))
            k = by_kernel.setdefault(e.name, [0.0, 0])
            k[0] += e.time_range.end - e.time_range.start
            k[1] += 1
        elif e.device_type == DeviceType.CPU:
            if e.name.startswith("aten::"):
                aten_ops += 1
            o = by_op.setdefault(e.name, [0.0, 0])
            o[0] += e.self_cpu_time_total
            o[1] += 1
    wall_ms = 1e3 * wall_seconds / num_steps
    busy_ms = _union_length(device_intervals) / 1e3 / num_steps
    table = by_kernel if on_device else by_op
    top = sorted(table.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return {
        "steps": num_steps,
        "wall_ms_per_step": wall_ms,
        "device_busy_ms_per_step": busy_ms if on_device else None,
        "device_busy_fraction": (busy_ms / wall_ms if wall_ms > 0 else 0.0) if on_device else None,
        "device_kernel_ms_per_step": (sum(t for t, _ in by_kernel.values()) / 1e3 / num_steps) if on_device else None,
        "aten_ops_per_step": aten_ops / num_steps,
        "ranges": [{"name": name, "span_ms_per_step": t / 1e3 / num_steps, "calls_per_step": n / num_steps}
                   for name, (t, n) in sorted(ranges.items(), key=lambda kv: -kv[1][0])],
        "top": [{"name": name, "ms_per_step": t / 1e3 / num_steps, "calls_per_step": n / num_steps}
                for name, (t, n) in top],
        "top_kind": "device kernels" if on_device else "operators by self CPU time",
        # Where the host's time went (on a device run too: a host-bound step shows here).
        "top_host": [{"name": name, "self_cpu_ms_per_step": t / 1e3 / num_steps, "calls_per_step": n / num_steps}
                     for name, (t, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:TOP_HOST_OPS]],
    }


def format_summary(summary: dict[str, Any], first: int, last: int, trace: str) -> str:
    """The one-screen text of :func:`summarize`'s result."""
    lines = [f"profile of steps {first}-{last}: {summary['wall_ms_per_step']:.1f} ms per step (wall), "
             f"{summary['aten_ops_per_step']:,.0f} aten ops per step"]
    if summary["device_busy_ms_per_step"] is not None:
        lines[0] += (f", device busy {summary['device_busy_ms_per_step']:.1f} ms per step "
                     f"({100 * summary['device_busy_fraction']:.0f}% of the wall time)")
    lines.append(f"  top {summary['top_kind']} (ms per step, calls per step):")
    for row in summary["top"][:LOGGED]:
        lines.append(f"    {row['ms_per_step']:9.3f} ms  {row['calls_per_step']:7.1f}x  {row['name'][:100]}")
    lines.append(f"  trace: {trace}")
    return "\n".join(lines)


class StepProfiler:
    """Profiles optimizer steps ``[start, start + num_steps)`` (1-based) of a run, for each start.

    The loop calls :meth:`step_begin` before and :meth:`step_end` after every step; outside the
    window both do nothing (no synchronisation, no overhead).
    """

    def __init__(self, cfg: ProfileSection, output_dir: str, rank: int, is_logger: bool) -> None:
        starts = cfg.start_step if isinstance(cfg.start_step, list) else [cfg.start_step]
        self.windows = {s: s + cfg.num_steps - 1 for s in starts if s is not None}
        self.first = self.last = 0
        self.dir = os.path.join(output_dir, "profile")
        self.rank, self.is_logger = rank, is_logger
        self.prof = None
        self.t0 = 0.0
        self.summaries: list[dict[str, Any]] = []

    def step_begin(self, step: int) -> None:
        if step not in self.windows or self.prof is not None:
            return
        self.first, self.last = step, self.windows[step]
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        _sync()  # the window starts with an idle device: nothing of earlier steps is counted
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def step_end(self, step: int) -> None:
        if self.prof is None or step != self.last:
            return
        _sync()
        wall = time.perf_counter() - self.t0
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        stem = os.path.join(self.dir, f"rank{self.rank}_steps{self.first}-{self.last}")
        trace = stem + ".pt.trace.json"
        prof.export_chrome_trace(trace)
        summary = summarize(prof.events(), self.last - self.first + 1, wall, torch.cuda.is_available())
        summary.update(first_step=self.first, last_step=self.last, trace=trace)
        self.summaries.append(summary)
        with open(stem + ".summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        if self.is_logger:
            logger.info(format_summary(summary, self.first, self.last, trace))

    def close(self) -> None:
        """End a window the run did not finish (stopped early): discard it, say so."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
            if self.is_logger:
                logger.info("profile window %d-%d not finished (the run stopped first); no trace written",
                            self.first, self.last)
