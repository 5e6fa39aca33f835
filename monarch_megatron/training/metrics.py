"""Run logging: TensorBoard (Megatron's scalar names), train.log, per-step metrics.jsonl, console.

Only the logging rank (global rank 0) writes; all methods are no-ops elsewhere. Scalars:
``lm loss``, ``sop loss``, ``learning-rate``, ``loss-scale``, ``grad-norm``, ``iteration-time``
(seconds per step), ``throughput`` (TFLOP/s per GPU, Monarch FLOPs counted as they are executed),
``tokens-per-sec``, ``phase`` (phase index), validation ``lm loss validation`` /
``sop loss validation``, and ``switch/val-loss-before`` / ``switch/val-loss-after``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import torch

logger = logging.getLogger("monarch_megatron.training")


def setup_logging(output_dir: str, is_logger: bool) -> None:
    """Console + ``<output_dir>/train.log`` on the logging rank; warnings only elsewhere."""
    root = logging.getLogger("monarch_megatron")
    root.handlers.clear()
    root.propagate = False
    # Dated: train.log appends across resumes, which can be days apart.
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if is_logger:
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
        root.setLevel(logging.INFO)
    else:
        root.setLevel(logging.WARNING)


def _human(n: float) -> str:
    """``1234567`` -> ``1.23M`` (consumed tokens on the progress line)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Metrics:
    """TensorBoard writer + jsonl record + console progress lines for one run."""

    def __init__(self, output_dir: str, is_logger: bool, total_steps: int, show_loss_scale: bool = False) -> None:
        self.is_logger = is_logger
        self.show_loss_scale = show_loss_scale  # fp16: the dynamic loss scale belongs on the console line
        self.total = total_steps
        self.tb_dir = os.path.join(output_dir, "tensorboard")
        self.writer = None
        self.jsonl = None
        self._window: list[dict[str, float]] = []
        self._pending: list[tuple] = []
        self._seen: set[tuple[str, int]] = set()
        if is_logger:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tb_dir)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, value, step)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (``kind``: train / valid / switch), unless the file has
        that row already from before a resume (:meth:`resume_at`)."""
        if self.jsonl is not None and (kind, step) not in self._seen:
            self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
            self.jsonl.flush()

    def train_step(self, step: int, phase_index: int, values: torch.Tensor, names: tuple[str, ...],
                   optimizer_values: dict[str, Any], timing: tuple[Any, Any], tokens: int, flops: float,
                   world: int) -> None:
        """Queue completed global step ``step`` (1-based) of ``phase_index``; nothing is read from
        the device until :meth:`flush` (so a step never waits for the GPU to finish).

        ``values``: ``[len(names)]`` device tensor of this rank's step means (``loss``, ``lm loss``,
        ...); ``optimizer_values``: ``learning-rate``, ``loss-scale``, ``grad-norm`` (floats or device
        scalars); ``timing``: the step's (start, stop) marks of a :class:`StepClock`; ``tokens`` /
        ``flops``: per step, whole job.
        """
        self._pending.append((step, phase_index, values, names, optimizer_values, timing, tokens, flops, world))

    def flush_steps(self, reduce_mean) -> list[tuple[int, dict[str, Any]]]:
        """Read the queued steps back (one synchronisation), average their losses over data-parallel
        ranks with ``reduce_mean`` (``[steps, n]`` tensor -> same, one collective on every rank),
        and write them (TensorBoard, metrics.jsonl, the window of the next progress line).

        Returns, on every rank, ``(step, values)`` per flushed step, oldest first: the losses and the
        optimizer values (what the non-finite guard inspects)."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        table = reduce_mean(torch.stack([p[2] for p in pending])).tolist()
        rows = []
        for (step, _, _, names, opt, *_), row_values in zip(pending, table):
            row = dict(zip(names, row_values))
            row.update({k: (float(v) if torch.is_tensor(v) else v) for k, v in opt.items()})
            rows.append((step, row))
        if not self.is_logger:
            return rows
        for (step, phase_index, _, _, _, (t0, t1), tokens, flops, world), (_, row) in zip(pending, rows):
            seconds = StepClock.seconds(t0, t1)
            tps = tokens / seconds if seconds > 0 else 0.0
            tflops = flops / seconds / world / 1e12 if seconds > 0 else 0.0
            row = {**row, "iteration-time": seconds, "tokens-per-sec": tps, "throughput": tflops, "phase": phase_index}
            if torch.cuda.is_available():
                row["max-memory-gb"] = torch.cuda.max_memory_allocated() / 2**30  # GiB, peak of the phase
            for name, v in row.items():
                if name != "loss" and v is not None:
                    self.scalar(name, v, step)
            self.record("train", step, row)
            self._window.append(row)
        return rows

    def resume_at(self, step: int) -> None:
        """A run resumes after ``step``: drop the metrics.jsonl rows past it (the resumed run writes
        them again), and have TensorBoard hide its events past it; a row of ``step`` itself that the
        resumed run writes again (a re-done switch or final validation) is not written twice."""
        if not self.is_logger:
            return
        path = self.jsonl.name
        kept, dropped, self._seen = [], 0, set()
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                    at = int(row["step"])
                except (ValueError, KeyError, TypeError):
                    dropped += 1
                    continue  # a line torn by a kill
                if at > step:
                    dropped += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
                if at == step:
                    self._seen.add((row.get("kind"), at))
        if not dropped:
            return
        self.jsonl.close()
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(self.tb_dir, purge_step=step + 1)

    def progress_line(self, step: int, phase_name: str) -> None:
        """Console line of the steps since the previous line (Megatron's fields): consumed samples
        and tokens, ms per step, losses, learning rate, fp16 loss scale, tokens/s, TFLOP/s (per GPU
        on GPUs), gradient norm, peak memory, ETA."""
        if not self.is_logger or not self._window:
            return
        w = self._window
        mean = {k: sum(r[k] for r in w if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in w))
                for k in ("loss", "lm loss", "sop loss", "tokens-per-sec", "throughput", "iteration-time")}
        # ETA from this window's steps: the first window also holds the CUDA-graph capture.
        eta = (self.total - step) * mean["iteration-time"]
        last = w[-1]
        parts = [f"step {step}/{self.total} [{phase_name}]"]
        if last.get("consumed-samples") is not None:
            parts.append(f"samples {last['consumed-samples']:,} tokens {_human(last['consumed-tokens'])}")
        parts += [f"{1e3 * mean['iteration-time']:,.1f} ms/step", f"loss {mean['loss']:.4f}", f"lm {mean['lm loss']:.4f}"]
        if any(r.get("sop loss") is not None for r in w):
            parts.append(f"sop {mean['sop loss']:.4f}")
        parts.append(f"lr {last['learning-rate']:.3e}")
        if self.show_loss_scale:
            parts.append(f"loss scale {last['loss-scale']:g}")
        per = "TFLOP/s/GPU" if torch.cuda.is_available() else "TFLOP/s"
        parts += [f"{mean['tokens-per-sec']:,.0f} tok/s", f"{mean['throughput']:.3f} {per}"]
        if last.get("grad-norm") is not None:
            parts.append(f"gnorm {last['grad-norm']:.3f}")
        if last.get("max-memory-gb") is not None:
            parts.append(f"mem {last['max-memory-gb']:.1f} GiB")
        parts.append(f"ETA {format_duration(eta)}")
        logger.info(" | ".join(parts))
        self._window = []

    def validation(self, step: int, values: dict[str, float], phase_name: str) -> None:
        if not self.is_logger:
            return
        for name, v in values.items():
            self.scalar(f"{name} validation", v, step)
        self.record("valid", step, values)
        logger.info("validation at step %d [%s]: %s", step, phase_name,
                    ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


class StepClock:
    """Step times without synchronising: on CUDA a pair of timing events per step (recorded in
    stream order, read at flush time), on CPU the host clock (CPU work is synchronous)."""

    @staticmethod
    def mark() -> Any:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def seconds(start: Any, stop: Any) -> float:
        """Seconds between two marks (waits for ``stop`` on CUDA)."""
        if isinstance(start, float):
            return stop - start
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
