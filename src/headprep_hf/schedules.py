"""Two-stage learning-rate schedules: one `LambdaLR` whose per-group factors know the HP/FT boundary.

The schedule shapes are transformers' own (`transformers.get_scheduler`, every step-indexed `lr_scheduler_type`):
`step_factor` builds the named scheduler on a throwaway optimizer and takes its multiplier function. What is ours is
only the composition: HP steps follow the HP schedule at `hp_learning_rate` (0 for the frozen backbone), FT steps
restart the FT schedule at `learning_rate`. A run without HP steps uses `Trainer.create_scheduler` unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType

# Schedules that are a function of the step (a LambdaLR), so they can follow another stage in one run.
STEP_SCHEDULES = tuple(
    s.value for s in SchedulerType if s not in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY)
)
# The HP schedules: those of them that need no `lr_scheduler_kwargs` (`cosine_with_min_lr` and
# `cosine_warmup_with_min_lr` need `min_lr`/`min_lr_rate`, `warmup_stable_decay` needs `num_decay_steps`; HP has no
# kwargs field, and `get_scheduler` raises without them).
HP_SCHEDULES = tuple(
    s for s in STEP_SCHEDULES if s not in ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
)


def step_factor(
    kind: str, num_steps: int, warmup_steps: int, peak_lr: float, scheduler_kwargs: dict | None = None
) -> Callable[[int], float]:
    """The multiplier of transformers' `kind` schedule at a step, for `num_steps` steps with `warmup_steps` of warmup.

    `peak_lr` is the optimizer learning rate the schedule is built for (`cosine_with_min_lr` turns an absolute `min_lr`
    into a rate with it).
    """
    kind = getattr(kind, "value", kind)
    if kind not in STEP_SCHEDULES:
        raise ValueError(
            f"lr schedule {kind!r} is not a function of the step ({', '.join(STEP_SCHEDULES)} are) and cannot share "
            "one run with the other stage; use hp_epochs=0, or probe_head() then finetune() (whose FT stage takes "
            "any lr_scheduler_type)."
        )
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak_lr if peak_lr > 0 else 1.0)
    scheduler = get_scheduler(
        kind,
        dummy,
        num_warmup_steps=warmup_steps,
        num_training_steps=max(num_steps, 1),
        scheduler_specific_kwargs=dict(scheduler_kwargs or {}),
    )
    return scheduler.lr_lambdas[0]


def _no_steps(step: int) -> float:
    return 0.0


def _stage_lr(step: int, hp_steps: int, hp_lr: float, hp_factor, ft_lr: float, ft_factor) -> float:
    if step < hp_steps:
        return hp_lr * hp_factor(step)
    return ft_lr * ft_factor(step - hp_steps)


def stage_schedule(hp_steps: int, hp_lr: float, hp_factor, ft_lr: float, ft_factor) -> Callable[[int], float]:
    """Learning rate of one parameter group at a global step: HP steps `< hp_steps`, then FT restarted at 0.

    A `functools.partial`, not an object with attributes: `LambdaLR.load_state_dict` restores the attributes of
    callable objects, which would bring back a resumed checkpoint's schedule length instead of the current one (the
    Trainer's own schedules are partials too).
    """
    return functools.partial(
        _stage_lr, hp_steps=hp_steps, hp_lr=hp_lr, hp_factor=hp_factor, ft_lr=ft_lr, ft_factor=ft_factor
    )


def two_stage_scheduler(
    optimizer, args, hp_steps: int, ft_steps: int, ft_learning_rate: float | None = None
) -> LambdaLR:
    """A `LambdaLR` over `optimizer`'s groups (base lr 1.0, `headprep_part` "head"/"backbone"): HP at
    `hp_learning_rate` with `hp_lr_scheduler_type` for the head (0 for the backbone), then FT at `ft_learning_rate`
    (default `learning_rate`; the `lr` of `optimizer_cls_and_kwargs`, as Trainer takes it) with `lr_scheduler_type`,
    both shapes from `transformers.get_scheduler`.

    Raises `ValueError` for groups the trainer did not build (no `headprep_part`, e.g. an overridden
    `create_optimizer` with its own learning rates): their rates would be multiplied by the stage's."""
    foreign = [i for i, group in enumerate(optimizer.param_groups) if "headprep_part" not in group]
    if foreign:
        raise ValueError(
            f"With head probing the optimizer's parameter groups must be the trainer's (groups {foreign} have no "
            "'headprep_part'; an overridden create_optimizer?): the two-stage schedule sets each group's rate as a "
            "factor of base rate 1.0, so a group's own lr would be multiplied by the stage's. Build the groups with "
            "self.stages.param_groups(...) (each at lr 1.0), pass the optimizer class and settings as "
            "optimizer_cls_and_kwargs, or train with hp_epochs=0, which takes any optimizer as Trainer does."
        )
    ft_learning_rate = args.learning_rate if ft_learning_rate is None else ft_learning_rate
    hp_factor = step_factor(
        args.hp_lr_scheduler_type, hp_steps, math.ceil(args.hp_warmup_ratio * hp_steps), args.hp_learning_rate
    )
    if ft_steps > 0:
        ft_factor = step_factor(
            args.lr_scheduler_type,
            ft_steps,
            args.get_warmup_steps(ft_steps),
            ft_learning_rate,
            args.lr_scheduler_kwargs,
        )
    else:  # an HP-only loop (probe_head(), cached HP): the FT schedule never applies, whatever its kind
        ft_factor = _no_steps
    lambdas = []
    for group in optimizer.param_groups:
        hp_lr = args.hp_learning_rate if group["headprep_part"] == "head" else 0.0
        lambdas.append(stage_schedule(hp_steps, hp_lr, hp_factor, ft_learning_rate, ft_factor))
    return LambdaLR(optimizer, lambdas)
