"""``--dry-run``: the resolved config, parallel layout, parameter counts and the phase plan.

Pure arithmetic on the validated config (no process group, no model, no data): works on a laptop
for any config, BERT-large included.
"""

from __future__ import annotations

from ..parallel.kinds import layer_kind
from .config import RunConfig, describe_world
from .flops import count_parameters, train_flops_per_sequence
from .phases import build_plan, total_steps
from .schedule import learning_rate


def _m(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def dry_run_report(cfg: RunConfig) -> str:
    """The multi-line report ``launcher/pretrain.py --dry-run`` prints."""
    lay = describe_world(cfg)
    plan = build_plan(cfg)
    total = total_steps(plan)
    lines = ["# resolved config", cfg.to_yaml().rstrip(), "",
             f"# parallel layout: world {lay['world']} = TP {lay['tp']} x DP {lay['dp']} (pipeline 1); "
             f"ZeRO stage 1 over DP; precision {cfg.precision.dtype}",
             f"# config hash {cfg.config_hash()}", "", "# phase plan"]
    for ph in plan:
        p = count_parameters(cfg.model, cfg.vocab_size, ph.monarch)
        flops = train_flops_per_sequence(cfg.model, cfg.vocab_size, ph.monarch, ph.seq_length, ph.head_positions) * ph.global_batch_size
        title = "Monarch" if ph.monarch is None else layer_kind(ph.monarch.kind).title
        mon = "dense (stock megatron-core local spec)" if ph.monarch is None else \
            f"{ph.monarch.kind} layers={','.join(ph.monarch.layers)} nblocks={ph.monarch.nblocks}"
        lr0, lr1 = learning_rate(ph, ph.start, total), learning_rate(ph, ph.end - 1, total)
        lines += [
            f"[{ph.index}] {ph.name}: steps {ph.start}..{ph.end - 1} ({ph.steps} steps, {ph.kind}); {mon}",
            f"    params: total {_m(p['total'])} ({p['total']:,}), in {title} factors {_m(p['monarch'])}, "
            f"dense equivalent {_m(p['dense_equivalent'])}",
            f"    batch: seq {ph.seq_length}, micro {ph.micro_batch_size}, global {ph.global_batch_size}, "
            f"accumulation {ph.grad_accumulation(lay['dp'])} (global = micro x accumulation x DP {lay['dp']}); "
            f"{ph.steps * ph.global_batch_size:,} samples",
            f"    optimizer {ph.optimizer.name} lr {ph.optimizer.lr:g} wd {ph.optimizer.weight_decay:g} "
            f"clip {ph.optimizer.grad_clip:g}; schedule {ph.schedule.decay_style} (scope {ph.schedule.scope}), "
            f"lr {lr0:.3e} -> {lr1:.3e}; rewarmup {ph.rewarmup_steps}; optimizer state at entry: {ph.optimizer_state}",
            f"    training FLOPs per step {flops / 1e12:,.3f} TFLOP",
        ]
    lines.append(f"total: {total} steps")
    return "\n".join(lines)
