"""The phase plan: each phase of the config resolved to concrete numbers.

A phase covers global steps ``[start, start + steps)``; its model is structured (``monarch`` set:
Monarch or block-diagonal layers, ``monarch.kind``) or dense (``monarch is None``). Everything the
loop needs per phase is resolved here once, so the loop and resume logic never look at raw config
overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.masking import masked_positions_bound
from ..models.config import MonarchConfig
from ..models.family import model_family
from .config import (
    OptimizerSection,
    RunConfig,
    ScheduleSection,
    phase_steps,
    resolved_optimizer,
    resolved_schedule,
)


@dataclass(frozen=True)
class Phase:
    """One resolved phase (see module docstring). ``kind`` is "monarch" (structured layers of either
    kind: ``monarch.kind``) or "dense"; it is the checkpoints' ``phase_kind``."""

    index: int
    name: str
    start: int
    steps: int
    monarch: MonarchConfig | None
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    optimizer: OptimizerSection
    schedule: ScheduleSection
    optimizer_state: str
    rewarmup_steps: int
    # Positions per sequence the LM head runs on: BERT with training.mlm_head_masked_only, the
    # masking budget at this sequence length; None = every position.
    head_positions: int | None = None

    @property
    def kind(self) -> str:
        return "dense" if self.monarch is None else "monarch"

    @property
    def end(self) -> int:
        """First global step after the phase."""
        return self.start + self.steps

    def grad_accumulation(self, dp: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return grad_accumulation(self.global_batch_size, self.micro_batch_size, dp)

    def same_structure(self, other: "Phase") -> bool:
        """True when both phases build the same parameters (so weights copy over as they are)."""
        return self.monarch == other.monarch


def grad_accumulation(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches per optimizer step on each of ``dp`` data-parallel ranks: global = micro x
    accumulation x DP (the config check makes it exact)."""
    return global_batch // (micro_batch * dp)


def build_plan(cfg: RunConfig) -> list[Phase]:
    """All phases of ``cfg`` in order, with consecutive step ranges."""
    plan, start = [], 0
    for i, (ph, n) in enumerate(zip(cfg.phases, phase_steps(cfg))):
        t = cfg.training
        seq = ph.seq_length or t.seq_length
        head = None
        if model_family(cfg.model.kind).masked_lm and t.mlm_head_masked_only:
            head = masked_positions_bound(seq, cfg.data.masked_lm_prob)
        monarch = None if ph.monarch is None else MonarchConfig(layers=tuple(ph.monarch.layers), nblocks=ph.monarch.nblocks,
                                                                kind=ph.monarch.kind)
        plan.append(Phase(
            index=i, name=ph.name, start=start, steps=n, monarch=monarch,
            seq_length=seq,
            micro_batch_size=ph.micro_batch_size or t.micro_batch_size,
            global_batch_size=ph.global_batch_size or t.global_batch_size,
            optimizer=resolved_optimizer(cfg, i), schedule=resolved_schedule(cfg, i),
            optimizer_state=ph.optimizer_state, rewarmup_steps=ph.rewarmup_steps, head_positions=head,
        ))
        start += n
    return plan


def phase_at(plan: list[Phase], step: int) -> Phase:
    """The phase that runs global step ``step`` (the last phase for ``step >= total``)."""
    for ph in plan:
        if step < ph.end:
            return ph
    return plan[-1]


def total_steps(plan: list[Phase]) -> int:
    return plan[-1].end
