"""Schedules as pure functions of the step: the learning rate and PSD's progressive weight."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from `base_lr` to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def psd_alpha(step: int, total_steps: int, alpha_max: float, schedule: str = "linear") -> float:
    """PSD's distillation weight `α_k` at step `k` of `K` (docs/methods.md §5, a reconstruction).

    `linear`: `α_max · k / K` (PS-KD's ramp); `cosine`: a smooth ramp `α_max (1 - cos(π k/K)) / 2`;
    `constant`: `α_max` from the first step (the ablation without the progressive part).
    """
    frac = min(1.0, max(0.0, step / max(1, total_steps)))
    if schedule == "linear":
        return alpha_max * frac
    if schedule == "cosine":
        return alpha_max * 0.5 * (1.0 - math.cos(math.pi * frac))
    if schedule == "constant":
        return alpha_max
    raise ValueError(f"psd_schedule must be 'linear', 'cosine' or 'constant', got {schedule!r}")
