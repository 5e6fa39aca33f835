"""Learning-rate schedule: linear warm-up, then linear / polynomial / cosine decay (or constant).

``scope: run`` (default) measures warm-up and decay over the whole run, so consecutive phases share
one curve; ``scope: phase`` restarts the curve at the phase start over the phase's length (the
paper's BERT recipe: the dense phase at sequence 512 has its own warm-up). ``rewarmup_steps`` of a
phase multiplies the curve by a ramp ``(k + 1) / rewarmup_steps`` over the phase's first steps
(a short re-warm-up after the switch, when the optimizer moments are fresh). The rate is a pure
function of the global step, so resumed runs follow it exactly.
"""

from __future__ import annotations

import math

from .phases import Phase


def base_lr(step: int, total: int, lr: float, min_lr: float, warmup: int, style: str, power: float) -> float:
    """Rate at ``step`` (0-based) of a ``total``-step curve peaking at ``lr`` after ``warmup`` steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    span = max(total - warmup, 1)
    frac = min(max(step - warmup, 0) / span, 1.0)
    if style == "linear":
        decay = 1.0 - frac
    elif style == "polynomial":
        decay = (1.0 - frac) ** power
    elif style == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * frac))
    else:
        raise ValueError(f"unknown decay_style {style!r}")
    return min_lr + (lr - min_lr) * decay


def learning_rate(phase: Phase, step: int, total_steps: int) -> float:
    """The learning rate of global ``step`` inside ``phase``."""
    s, lr = phase.schedule, phase.optimizer.lr
    if s.scope == "phase":
        local, length = step - phase.start, phase.steps
    else:
        local, length = step, total_steps
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_fraction * length)
    rate = base_lr(local, length, lr, s.min_lr, warmup, s.decay_style, s.power)
    k = step - phase.start
    if phase.rewarmup_steps > 0 and k < phase.rewarmup_steps:
        rate *= (k + 1) / phase.rewarmup_steps
    return rate
