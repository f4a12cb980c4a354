"""Warm-up then decay: the one schedule behind the learning rate and the alignment weight lambda.

    value(s) = peak * (s + offset) / warmup_steps     while s < warmup_steps   (linear warm-up)
             = peak                                   decay "none" (or no room left after warm-up)
             = peak * (1 - p)  |  peak * (1 + cos(pi p)) / 2   linear | cosine, p = (s - warmup) / (total - warmup), capped at 1

`offset` is the warm-up convention, and the two users differ on purpose:
- learning rate (training.engine.lr_lambda), offset 1: LambdaLR evaluates the multiplier for the update
  optimizer step s (0-based) makes, so step 0 already applies lr / warmup_steps and the peak is reached at
  step warmup_steps - 1; an offset of 0 would make the first update a wasted zero-LR step.
- alignment weight (alignment.alignment_weight), offset 0: the micro-batches of optimizer step s run after
  `set_step(s)`, i.e. with s steps done, so lambda starts at exactly 0 (the first step trains on the task
  loss alone) and reaches the full weight at step warmup_steps.
"""

from __future__ import annotations

import math

DECAYS = ("none", "linear", "cosine")


def warmup_then_decay(step: int, *, peak: float, warmup_steps: int, total_steps: int | None, decay: str,
                      offset: int) -> float:
    """The scheduled value at step `step` (see the module docstring for `offset`); decay in DECAYS."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + offset) / warmup_steps
    if decay == "none" or not total_steps or total_steps <= warmup_steps:
        return peak
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if decay == "linear":
        return peak * (1.0 - progress)
    if decay == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}: expected one of {', '.join(DECAYS)}")


def budget_warnings(cfg) -> list[str]:
    """Warm-ups that the step budget cuts short: what the LR and lambda reach, said before training starts."""
    t, a = cfg.train, cfg.alignment
    out = []
    if t.warmup_steps > 0 and t.warmup_steps >= t.max_steps:
        # offset 1: the last optimizer step (index max_steps - 1) uses lr * max_steps / warmup_steps
        reached = t.max_steps / t.warmup_steps
        if t.warmup_steps > t.max_steps:
            out.append(f"warning: train.warmup_steps={t.warmup_steps} > train.max_steps={t.max_steps}: the learning rate never "
                       f"reaches its peak train.lr={t.lr:g}; it rises to {reached:.0%} of it ({t.lr * reached:.3g}) at the last step. "
                       "Lower train.warmup_steps or raise train.max_steps")
        else:
            out.append(f"warning: train.warmup_steps={t.warmup_steps} = train.max_steps: the learning rate reaches its peak "
                       f"train.lr={t.lr:g} only at the last step (warm-up takes the whole run). "
                       "Lower train.warmup_steps or raise train.max_steps")
    if a.enabled and a.warmup_steps > 0 and a.warmup_steps >= t.max_steps:
        # offset 0: the micro-batches of the last optimizer step use weight * (max_steps - 1) / warmup_steps
        reached = (t.max_steps - 1) / a.warmup_steps
        out.append(f"warning: alignment.warmup_steps={a.warmup_steps} >= train.max_steps={t.max_steps}: lambda never reaches "
                   f"alignment.weight={a.weight:g}; it rises to {reached:.0%} of it ({a.weight * reached:.3g}) at the last step. "
                   "Lower alignment.warmup_steps or raise train.max_steps")
    return out
