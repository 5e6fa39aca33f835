"""The non-finite guard: stop a run whose loss or gradient norm goes non-finite, before it saves.

The loop keeps losses on the device and reads them back at a flush (every ``log_interval`` steps,
before every save, at a stop and at a phase's end: training/loop.py). The guard inspects the rows
of each flush, in step order, counting *consecutive* non-finite steps across flushes:

* a step is non-finite when one of its losses is (``loss``, ``lm loss``, ``sop loss``), or its
  gradient norm is, except in fp16: there DeepSpeed skips a step whose scaled gradients overflow
  (reporting its norm as inf) and lowers the loss scale, which is normal; those steps are counted
  and logged, not held against the run;
* ``training.max_nonfinite_steps`` consecutive non-finite steps stop the run with
  :class:`NonFiniteError` (exit code 3), without saving or pruning;
* :meth:`NonFiniteGuard.before_save` runs before every save: it refuses to write a checkpoint from
  a non-finite step or from parameters that are no longer finite (an update applied with a
  non-finite step size shows in the weights before it shows in any loss), and records in the run
  state whether every step since the previous save was finite (``losses_finite``: pruning keeps
  the newest such checkpoint).

Every rank decides alike: the losses are averaged over data-parallel ranks before they are read,
the gradient norm is global, and the parameter check is all-reduced.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("monarch_megatron.training")

EXIT_CODE = 3


class NonFiniteError(RuntimeError):
    """The run went non-finite; nothing was saved after it. ``exit_code`` is the launcher's."""

    exit_code = EXIT_CODE


def _nonfinite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isfinite(value)


class NonFiniteGuard:
    """Counts non-finite steps of one run (module docstring). ``checkpoints``: the run's
    :class:`~.checkpoint.CheckpointManager` (named in the stop message)."""

    def __init__(self, limit: int, fp16: bool, checkpoints) -> None:
        self.limit, self.fp16, self.checkpoints = limit, fp16, checkpoints
        self.consecutive = 0
        self.first_bad: int | None = None
        self.last_bad: tuple[int, list[str]] | None = None
        self.skipped = 0
        self.window_finite = True

    def bad_values(self, row: dict[str, Any]) -> list[str]:
        """``"name value"`` of the non-finite values of one flushed step that count against the run."""
        bad = [f"{k} {v}" for k, v in row.items() if k.endswith("loss") and _nonfinite(v)]
        if _nonfinite(row.get("grad-norm")) and not self.fp16:
            bad.append(f"grad-norm {row['grad-norm']}")
        return bad

    def observe(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """Inspect the ``(step, values)`` rows of one flush, oldest first.

        Raises:
            NonFiniteError: ``limit`` consecutive non-finite steps.
        """
        skipped = 0
        for step, row in rows:
            if self.fp16 and _nonfinite(row.get("grad-norm")):
                skipped += 1
            bad = self.bad_values(row)
            if not bad:
                self.consecutive, self.first_bad = 0, None
                continue
            self.consecutive += 1
            self.window_finite = False
            self.first_bad = self.first_bad or step
            self.last_bad = (step, bad)
            if self.consecutive >= self.limit:
                raise NonFiniteError(self._message(f"{self.consecutive} consecutive steps had non-finite values "
                                                   f"(training.max_nonfinite_steps={self.limit})"))
        if skipped:
            self.skipped += skipped
            logger.info("fp16: %d step(s) skipped for gradient overflow up to step %d (loss scale now %s); "
                        "%d in this run so far", skipped, rows[-1][0], rows[-1][1].get("loss-scale"), self.skipped)

    def _message(self, what: str) -> str:
        step, bad = self.last_bad if self.last_bad else (None, [])
        span = f"steps {self.first_bad}..{step}" if self.first_bad not in (None, step) else f"step {step}"
        finite = [(tag, s) for tag, s in self.checkpoints.complete() if s.losses_finite]
        last = (f"the newest checkpoint saved with finite losses is {self.checkpoints.path(finite[-1][0])} "
                f"(step {finite[-1][1].step}); re-running the command resumes from it"
                if finite else "no checkpoint with finite losses exists yet")
        return (f"non-finite training: {what}; {span}: {', '.join(bad)}. Stopped without saving or pruning; {last}. "
                "Usual causes: a learning rate too high for the batch or the warm-up, fp16 overflow at every loss "
                "scale (use precision.dtype=bf16), a corrupt data file (README, Troubleshooting)")

    def before_save(self, engine, step: int) -> bool:
        """Check that step ``step`` may be saved; returns whether every step since the previous save
        was finite (the checkpoint's ``losses_finite``). Collective (the parameter check).

        Raises:
            NonFiniteError: the newest step, or a parameter, is not finite.
        """
        if self.consecutive:
            raise NonFiniteError(self._message(f"step {step} is to be saved but its values are not finite"))
        params = [p for p in engine.module.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all().to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite.item()):  # a sync: a save waits for the device anyway
            self.last_bad, self.first_bad = (step, ["parameters"]), None
            raise NonFiniteError(self._message(f"the model's parameters are not finite after step {step} "
                                               "(its losses were finite: the last update made them so)"))
        finite_window, self.window_finite = self.window_finite, True
        return finite_window


__all__ = ["EXIT_CODE", "NonFiniteError", "NonFiniteGuard"]
