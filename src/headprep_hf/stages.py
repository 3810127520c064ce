"""Stage mechanics: what head probing (HP) and finetuning (FT) change in a model, in one place.

* `StagePlan` is the state of a run's stages (which stages the `train()` call runs, how many updates each has, whether
  FT has begun). It is what a checkpoint serialises (`headprep_state.json`), so a resumed run knows its stage.
* `Stages` knows which parameters train in a stage, the HP module modes (frozen backbone in eval mode, the HP modules
  in train mode), the optimizer groups (head/backbone x decay/no-decay) and what happens at the HP->FT boundary.
  The trainer, cached HP (`feature_cache`) and the BatchNorm statistics pass (`batchnorm`) all use it; nothing else
  re-implements it.
* `StageCallback` does the HP->FT boundary inside the training loop (with the stage's progress bar, `progress`) and
  keeps early stopping to FT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import EarlyStoppingCallback, TrainerCallback

from .files import read_json, write_json
from .progress import finish_stage_bar, new_stage_bar, restart_stage_clock, start_stage_bar
from .split import ModelSplit

STATE_NAME = "headprep_state.json"
PLANS = ("both", "hp", "ft")
_METHODS = {"both": "train", "hp": "probe_head", "ft": "finetune"}


@dataclass
class StagePlan:
    """Where a run stands. Updates `< hp_steps` are HP, the rest FT (the stage is a function of the global step).

    Attributes:
        plan: What the `train()` call runs: `"both"` (`train()`), `"hp"` (`probe_head()`) or `"ft"` (`finetune()`).
        hp_steps / ft_steps: Planned updates of each stage in this loop (0 HP steps when HP ran on cached features
            before the loop, `hp_outside_loop`).
        ft_started: FT has begun (the boundary work is done: BatchNorm statistics, fresh optimizer, measurements).
        hp_outside_loop: HP ran on cached features before the training loop, which then covers FT only.
        tag: Who may resume the run's checkpoints (`HeadPrepTrainer.run_tag`, e.g. a sweep's fingerprint).
        hp_done: The trainer's own HP ran before this loop (`probe_head()` then `finetune()`): a fresh trainer that
            resumes the FT checkpoint restores it (`HeadPrepTrainer.hp_done`, the model card's tau).
        start_head: The prepared head the run's model carried when it started (`load_prepared_head`'s record: tau,
            HP settings, source), None for none; `UNRECORDED` in a checkpoint written before it was recorded. A resume
            checks it against the resuming model's (the card reports the head FT started from).
    """

    plan: str = "both"
    hp_steps: int = 0
    ft_steps: int = 0
    ft_started: bool = False
    hp_outside_loop: bool = False
    tag: str | None = None
    hp_done: bool = False
    start_head: dict | str | None = "unrecorded"

    def stage_at(self, step: int) -> str:
        """The stage of update number `step` (0-based)."""
        return "hp" if step < self.hp_steps else "ft"

    @property
    def method(self) -> str:
        return _METHODS[self.plan]

    def save(self, folder: str) -> None:
        write_json(os.path.join(folder, STATE_NAME), dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: str) -> StagePlan | None:
        """The plan saved in checkpoint `folder`, or None when it has none (a checkpoint of `transformers.Trainer`)."""
        path = os.path.join(folder, STATE_NAME)
        if not os.path.isfile(path):
            return None
        data = read_json(path)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def for_resume(cls, checkpoint: str, plan: str, hp_epochs: int, tag: str | None = None) -> StagePlan:
        """The plan to resume checkpoint `checkpoint` with, in a run of `plan`; a `ValueError` naming the method to
        use when the checkpoint belongs to another one. A checkpoint without a plan (written by `Trainer`, or without
        HP) resumes as FT that has begun, which only a run without HP can do."""
        saved = cls.load(checkpoint)
        if saved is None:
            if plan != "ft" and hp_epochs > 0:
                raise ValueError(
                    f"{checkpoint} has no {STATE_NAME}: it was written without head probing (e.g. by "
                    "transformers.Trainer). Resume it with hp_epochs=0 or with finetune()."
                )
            return cls(plan=plan, ft_started=True)
        if saved.tag != tag:
            raise ValueError(
                f"{checkpoint} was written by a run with other settings (tag {saved.tag}, this run {tag}); resuming "
                "it would mix the two. Use another output_dir, or rerun with the settings that wrote it."
            )
        if saved.plan != plan:
            raise ValueError(
                f"{checkpoint} was written by {saved.method}(); resume it with {saved.method}("
                f"resume_from_checkpoint=...), not {cls(plan=plan).method}()."
            )
        return saved


class StopRequestGate(TrainerCallback):
    """Notes, in `on_evaluate`, whether training was asked to stop before the early stoppers that follow it ran."""

    def __init__(self):
        self.stop_before = False

    def on_evaluate(self, args, state, control, **kwargs):
        self.stop_before = bool(control.should_training_stop)


class StopperHoldBack(TrainerCallback):
    """Just after the last early stopper: holds back the stoppers' stop in HP (`StageCallback.hold_back`), before any
    later callback asks for its own."""

    def __init__(self, stage: StageCallback):
        self.stage = stage

    def on_evaluate(self, args, state, control, **kwargs):
        self.stage.hold_back(control)


class StageCallback(TrainerCallback):
    """The HP->FT boundary (before the first FT update), the stage labels of the progress bar (`HP`, then a new `FT`
    bar at the boundary) and early stopping in FT only.

    Args:
        trainer: The [`HeadPrepTrainer`] (its `stage_plan` and `callback_handler`).
        begin_ft: Called once at the start of FT: after the last HP update, or before the first update of a run
            without HP in its loop.
    """

    def __init__(self, trainer, begin_ft):
        self.trainer, self.begin_ft = trainer, begin_ft
        # (the trainer puts these just before the first early stopper and just after the last; this after both)
        self.gate, self.gate_after = StopRequestGate(), StopperHoldBack(self)

    def on_train_begin(self, args, state, control, **kwargs):
        plan = self.trainer.stage_plan
        start_stage_bar(self.trainer, state)
        if plan.plan != "hp" and plan.hp_steps == 0 and not plan.ft_started:
            self.begin_ft()
            restart_stage_clock(self.trainer)  # the FT bar's rate and ETA count FT updates, not the passes before

    def on_step_end(self, args, state, control, **kwargs):
        plan = self.trainer.stage_plan
        if plan.plan == "hp" and state.global_step == state.max_steps:
            # `probe_head()` with load_best_model_at_end: Trainer loaded the best HP checkpoint at the loop's end, an
            # earlier epoch's head, written as the prepared head of tau = hp_epochs (the review's run). The last
            # update's model is now the only candidate (its evaluation and save follow this event), so the head
            # kept is the one of tau = hp_epochs; best model selection is FT's (`finetune()` starts afresh).
            state.best_metric = state.best_global_step = state.best_model_checkpoint = None
        if plan.plan != "hp" and 0 < plan.hp_steps == state.global_step and not plan.ft_started:
            finish_stage_bar(self.trainer, state)  # the HP bar ends before the boundary's passes and line
            self.begin_ft()
            new_stage_bar(self.trainer, "ft", plan.ft_steps, state.global_step)
            # Best model and early stopping look at FT (and its starting point, the prepared model) only.
            state.best_metric = state.best_global_step = state.best_model_checkpoint = None
            for callback in self.trainer.callback_handler.callbacks:
                if isinstance(callback, EarlyStoppingCallback):
                    callback.early_stopping_patience_counter = 0
            if args.logging_strategy != "no":
                control.should_log = True  # one log exactly at the boundary keeps the stages' losses apart

    def hold_back(self, control) -> None:
        # Early stopping acts in FT only: during HP the head's metric plateaus by design. A stop asked for before the
        # stoppers ran (the gate saw it) or after them (the hold-back runs first), another callback's, e.g. a time
        # budget's, is not theirs and stays. (One asked for between two stoppers cannot be told from theirs.)
        plan = self.trainer.stage_plan
        stop = control.should_training_stop and not self.gate.stop_before
        if plan.hp_steps > 0 and not plan.ft_started and stop:
            stoppers = [c for c in self.trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
            if any(c.early_stopping_patience_counter >= c.early_stopping_patience for c in stoppers):
                control.should_training_stop = False


class Stages:
    """Which parameters train and which modules run in train mode in each stage, for one model split.

    Args:
        split: The backbone/head split (`find_split`).
        backbone_mode: `"eval"` keeps the frozen backbone in eval mode during HP (BatchNorm statistics fixed);
            `"train"` leaves the modes to the Trainer (the authors' research code).
    """

    def __init__(self, split: ModelSplit, backbone_mode: str = "eval"):
        self.split = split
        self.backbone_mode = backbone_mode
        self._user_flags: dict[str, bool] = {}
        self._applied: str | None = None

    # ------------------------------------------------------------------ trainable parameters
    def remember_trainable(self, model: nn.Module) -> None:
        """Record which parameters the user left trainable; stages only ever switch those."""
        self._user_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self._applied = None

    def apply(self, model: nn.Module, stage: str) -> None:
        """HP: only the head and `reinit_modules` train; FT: everything the user left trainable."""
        if self._applied == stage:
            return
        for name, param in model.named_parameters():
            user = self._user_flags.get(name, param.requires_grad)
            param.requires_grad_(user and (stage == "ft" or self.split.is_hp_trainable(name)))
        self._applied = stage

    def restore(self, model: nn.Module) -> None:
        """The user's `requires_grad` flags, as before the run."""
        self.apply(model, "ft")

    # ------------------------------------------------------------------ HP module modes
    def set_hp_modes(self, model: nn.Module, force: bool = False) -> None:
        """HP modes: the frozen backbone in eval mode (BatchNorm statistics fixed), the HP modules in train mode.
        With `hp_backbone_mode="train"` the Trainer's modes stay, unless `force` (forward passes of the HP modules
        alone: cached HP, BatchNorm statistics)."""
        if self.backbone_mode != "eval" and not force:
            return
        model.eval()
        for module in self.split.hp_modules(model):
            module.train()

    @contextlib.contextmanager
    def hp_modes(self, model: nn.Module) -> Iterator[None]:
        """Inside: the HP modes (forced); every module's train/eval flag is restored on exit."""
        saved = [(m, m.training) for m in model.modules()]
        try:
            self.set_hp_modes(model, force=True)
            yield
        finally:
            for module, mode in saved:
                module.training = mode

    def hp_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copy of everything HP changes: the HP modules' parameters and buffers, plus every buffer of the model with
        `hp_backbone_mode="train"` (BatchNorm statistics move then)."""
        buffers = {n for n, _ in model.named_buffers()} if self.backbone_mode == "train" else set()
        return {
            n: t.detach().clone().cpu()
            for n, t in model.state_dict().items()
            if self.split.is_hp_trainable(n) or n in buffers
        }

    # ------------------------------------------------------------------ optimizer
    def param_groups(
        self, model: nn.Module, decay_names: set[str], hp_weight_decay: float, weight_decay: float
    ) -> list[dict]:
        """Every trainable parameter in fixed groups (head/backbone x decay/no-decay) for both stages.

        The layout never changes during a run, which is what makes resuming exact; the frozen backbone gets no
        gradient in HP (torch optimizers skip it) and a learning rate of 0 from the schedule. Base `lr` is 1.0: the
        schedule's factors are absolute learning rates.
        """
        groups = []
        for part in ("head", "backbone"):
            for with_decay in (True, False):
                params = [
                    p
                    for n, p in model.named_parameters()
                    if p.requires_grad
                    and self.split.is_hp_trainable(n) == (part == "head")
                    and (n in decay_names) == with_decay
                ]
                if not params:
                    continue
                decay = (hp_weight_decay if part == "head" else weight_decay) if with_decay else 0.0
                groups.append(
                    {
                        "params": params,
                        "weight_decay": decay,
                        "lr": 1.0,
                        "headprep_part": part,
                        "headprep_decay": with_decay,
                    }
                )
        return groups

    @staticmethod
    def begin_ft(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        """The HP->FT boundary for the optimizer: its state is cleared (FT starts as with a fresh optimizer, no HP
        momentum or Adam moments) and the head's decay group takes the FT weight decay."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
        optimizer.state.clear()
        for group in optimizer.param_groups:
            if group.get("headprep_part") == "head" and group.get("headprep_decay"):
                group["weight_decay"] = weight_decay
