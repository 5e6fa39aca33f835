"""``--dry-run``: the resolved config, parallel layout, parameter counts and the phase plan.

Pure arithmetic on the validated config (no process group, no model, no data): works on a laptop
for any config, BERT-large included.
"""

from __future__ import annotations

from ..parallel.kinds import layer_kind
from .config import RunConfig, describe_world, monarch_layer_widths
from .flops import count_parameters, train_flops_per_sequence
from .phases import build_plan, total_steps
from .schedule import learning_rate


def _m(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def learning_rates(ph, total: int) -> tuple[float, float, float]:
    """(first, peak, last) learning rate of phase ``ph`` (the peak by evaluating every step; cheap:
    a schedule is arithmetic)."""
    rates = [learning_rate(ph, step, total) for step in range(ph.start, ph.end)]
    return rates[0], max(rates), rates[-1]


def config_notes(cfg: RunConfig) -> list[str]:
    """One-line notes on what the config does that a user may not have meant (not errors): a
    structured layer whose widths ``nblocks`` does not divide is zero-padded."""
    notes = []
    widths = monarch_layer_widths(cfg.model)
    for i, ph in enumerate(cfg.phases):
        if ph.monarch is None:
            continue
        b = ph.monarch.nblocks
        for name in ph.monarch.layers:
            n_in, n_out, _ = widths[name]
            p_in, p_out = -(-n_in // b) * b, -(-n_out // b) * b
            if (p_in, p_out) != (n_in, n_out):
                notes.append(f"note: phases[{i}].monarch: {name} ({n_in}->{n_out}) with nblocks={b} is computed "
                             f"zero-padded to {p_in}->{p_out} (nblocks does not divide its widths; the padding costs "
                             f"FLOPs and is cut from the output)")
    return notes


def plan_lines(cfg: RunConfig) -> list[str]:
    """The parallel layout, config hash and phase plan (what --dry-run prints after the config, and
    what a run logs when it starts): parameters, batch arithmetic, learning rates, FLOPs, data."""
    lay = describe_world(cfg)
    plan = build_plan(cfg)
    total = total_steps(plan)
    d = cfg.data
    data = "the demo corpus (built locally)" if d.source == "demo" else f"{d.prefix} (tokenizer {d.tokenizer_model})"
    lines = [f"# parallel layout: world {lay['world']} = TP {lay['tp']} x DP {lay['dp']} (pipeline 1); "
             f"ZeRO stage 1 over DP; precision {cfg.precision.dtype}",
             f"# data: {data}, split {d.split[0]:g}/{d.split[1]:g}",
             f"# config hash {cfg.config_hash()}", "", "# phase plan"]
    for ph in plan:
        p = count_parameters(cfg.model, cfg.vocab_size, ph.monarch)
        flops = train_flops_per_sequence(cfg.model, cfg.vocab_size, ph.monarch, ph.seq_length, ph.head_positions) * ph.global_batch_size
        title = "Monarch" if ph.monarch is None else layer_kind(ph.monarch.kind).title
        mon = "dense (stock megatron-core local spec)" if ph.monarch is None else \
            f"{ph.monarch.kind} layers={','.join(ph.monarch.layers)} nblocks={ph.monarch.nblocks}"
        lr0, peak, lr1 = learning_rates(ph, total)
        lines += [
            f"[{ph.index}] {ph.name}: steps {ph.start}..{ph.end - 1} ({ph.steps} steps, {ph.kind}); {mon}",
            f"    params: total {_m(p['total'])} ({p['total']:,}), in {title} factors {_m(p['monarch'])}, "
            f"dense equivalent {_m(p['dense_equivalent'])}",
            f"    batch: seq {ph.seq_length}, micro {ph.micro_batch_size}, global {ph.global_batch_size}, "
            f"accumulation {ph.grad_accumulation(lay['dp'])} (global = micro x accumulation x DP {lay['dp']}); "
            f"{ph.steps * ph.global_batch_size:,} samples",
            f"    optimizer {ph.optimizer.name} lr {ph.optimizer.lr:g} wd {ph.optimizer.weight_decay:g} "
            f"clip {ph.optimizer.grad_clip:g}; schedule {ph.schedule.decay_style} (scope {ph.schedule.scope}), "
            f"lr first {lr0:.3e}, peak {peak:.3e}, last {lr1:.3e}; rewarmup {ph.rewarmup_steps}; "
            f"optimizer state at entry: {ph.optimizer_state}",
            f"    training FLOPs per step {flops / 1e12:,.3f} TFLOP",
        ]
    lines.append(f"total: {total} steps")
    return lines + config_notes(cfg)


def dry_run_report(cfg: RunConfig) -> str:
    """The multi-line report ``launcher/pretrain.py --dry-run`` prints."""
    return "\n".join(["# resolved config", cfg.to_yaml().rstrip(), "", *plan_lines(cfg)])
