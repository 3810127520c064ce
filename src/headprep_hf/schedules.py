"""Two-stage learning-rate schedules: one `LambdaLR` whose per-group factors know the HP/FT boundary.

The optimizer keeps the same parameter groups for the whole run (head first, then backbone); each group gets a
`StageSchedule` that returns the absolute learning rate for a global step (the groups' base lr is 1.0). The
backbone's factor is 0 during HP, so a frozen parameter can never move even if it received a gradient.
"""

from __future__ import annotations

import math

SUPPORTED_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """Multiplier in [0, 1] of a schedule at `step` of `total` steps with `warmup` linear warmup steps.

    Follows the definitions of `transformers.get_scheduler` for the same names.
    """
    if kind not in SUPPORTED_SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; supported: {list(SUPPORTED_SCHEDULES)}.")
    if kind == "constant":
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant_with_warmup":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class StageSchedule:
    """Learning rate of one parameter group as a function of the global step.

    Args:
        hp_steps: Number of HP updates; steps `< hp_steps` are HP, the rest FT.
        ft_steps: Number of FT updates.
        hp_lr: Peak learning rate in HP (0 for a frozen group).
        ft_lr: Peak learning rate in FT.
        hp_kind / ft_kind: Schedule names (see `SUPPORTED_SCHEDULES`).
        hp_warmup / ft_warmup: Warmup steps of each stage.
    """

    def __init__(
        self,
        hp_steps: int,
        ft_steps: int,
        hp_lr: float,
        ft_lr: float,
        hp_kind: str = "constant",
        ft_kind: str = "linear",
        hp_warmup: int = 0,
        ft_warmup: int = 0,
    ):
        self.hp_steps = hp_steps
        self.ft_steps = ft_steps
        self.hp_lr = hp_lr
        self.ft_lr = ft_lr
        self.hp_kind = hp_kind
        self.ft_kind = ft_kind
        self.hp_warmup = hp_warmup
        self.ft_warmup = ft_warmup

    def __call__(self, step: int) -> float:
        if step < self.hp_steps:
            return self.hp_lr * schedule_factor(self.hp_kind, step, self.hp_steps, self.hp_warmup)
        return self.ft_lr * schedule_factor(self.ft_kind, step - self.hp_steps, self.ft_steps, self.ft_warmup)
