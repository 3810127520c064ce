"""The non-finite guard: a NaN or inf loss or gradient stops the run (or skips the update), and nothing non-finite is
saved.

Checking every update on the host would add a device synchronisation per step. Instead the loss of every micro-batch
and the gradient norm of every update are checked on the device, into a flag and the first bad step, and the flag is
read only where the Trainer synchronises anyway or something is about to be written: at logging, evaluation and save
steps, epoch ends and the end of training. The run stops there with a `NonFiniteError` naming the stage, the first bad
step and the training samples of that step (with the ones holding non-finite inputs), before any checkpoint, prepared
head or model is written; the last good checkpoint stays. `on_nonfinite="skip"` instead drops an update whose
gradient is not finite (its gradients are discarded before the optimizer step, and the running statistics its forward
passes changed are put back) and counts it; deciding that before the step costs one synchronisation per update, as
AMP's gradient scaler does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import TrainerCallback

if TYPE_CHECKING:
    from .trainer import HeadPrepTrainer

logger = logging.getLogger(__name__)

POLICIES = ("raise", "skip", "ignore")


class NonFiniteError(RuntimeError):
    """A loss or gradient stopped being finite; the message names the stage, step, samples and what to do."""


def nonfinite_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` holding a NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(state: dict[str, torch.Tensor], what: str, trained: bool = True) -> None:
    """Refuse to write `what` when a tensor of `state` is not finite (`NonFiniteError` naming the tensors);
    `trained=False`: no update has run (the weights came so)."""
    bad = nonfinite_keys(state)
    if bad:
        why = (
            "Training diverged: fix the data, or start a new run with a lower learning rate (resuming refuses changed "
            "settings, which would mix two runs; the last good checkpoint's weights can be the new run's start)."
            if trained
            else "No update has run: the weights came so (a damaged file, or set to NaN/inf before the trainer got "
            "them); load them again from a good copy."
        )
        raise NonFiniteError(
            f"Not writing {what}: {len(bad)} tensor(s) hold NaN or inf values ({', '.join(bad[:5])}). {why}"
        )


class NonFiniteGuard(TrainerCallback):
    """Watches the losses and gradients of a [`HeadPrepTrainer`] run on the device (see the module docstring)."""

    def __init__(self, trainer: HeadPrepTrainer, policy: str = "ignore"):
        self.trainer = trainer
        self.reset(policy)

    def reset(self, policy: str) -> None:
        """A new run under `policy` (`"raise"`, `"skip"` or `"ignore"`)."""
        self.policy = policy
        self.skipped: list[int] = []
        self._bad: torch.Tensor | None = None
        self._first: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | float | None = None
        self._running_stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, copy) at the update's start

    @property
    def active(self) -> bool:
        return self.policy != "ignore"

    @property
    def watches_steps(self) -> bool:
        # Under fp16 mixed precision the gradient scaler owns overflow: it skips such steps and lowers its scale, so
        # a non-finite scaled loss or gradient is routine there. The guard then checks what is written only.
        return self.active and getattr(self.trainer.accelerator, "scaler", None) is None

    def record_loss(self, loss: torch.Tensor, step: int) -> None:
        """Note a micro-batch's loss of update `step` (on the device, no synchronisation)."""
        if self.watches_steps:
            self._note(~torch.isfinite(loss.detach()).all(), step)

    def _note(self, bad: torch.Tensor, step: int) -> None:
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.bool, device=bad.device)
            self._first = torch.full((), -1, dtype=torch.long, device=bad.device)
        self._first = torch.where(bad & ~self._bad, torch.full_like(self._first, step), self._first)
        self._bad = self._bad | bad

    def note_grad_norm(self, norm: torch.Tensor | float | None) -> None:
        """The gradient norm Trainer computed for this update (for clipping and logging), read by the next
        `on_pre_optimizer_step` instead of a second norm over every gradient."""
        self._grad_norm = norm

    def _update_grad_norm(self) -> torch.Tensor | None:
        norm, self._grad_norm = self._grad_norm, None
        if norm is not None:
            # (a float under DeepSpeed, whose engine already read it)
            return torch.as_tensor(norm, device=self.trainer.accelerator.device)
        # No norm from Trainer (a release that does not compute one every update): compute it.
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None

    def on_step_begin(self, args, state, control, **kwargs):
        # Under "skip", the running statistics (BatchNorm's) as this update finds them: its forward passes update
        # them before the gradient says whether the update is dropped, and a non-finite input makes them NaN.
        if self.policy == "skip" and self.watches_steps:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            self._running_stats = [
                (buffer, buffer.detach().clone())
                for module in model.modules()
                if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats
                for buffer in module.buffers(recurse=False)
            ]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.watches_steps:
            return
        norm = self._update_grad_norm()
        if norm is None:
            return
        bad = ~torch.isfinite(norm)
        if self.policy != "skip":
            self._note(bad, state.global_step)
        elif bool(bad):  # one synchronisation per update, the price of deciding before the step
            for param in self.trainer.model.parameters():
                param.grad = None  # torch optimizers leave parameters without a gradient untouched
            with torch.no_grad():  # and the running statistics as they were before the update's forward passes
                for buffer, saved in self._running_stats:
                    buffer.copy_(saved)
            self.skipped.append(state.global_step + 1)
            stage = self.trainer.stage_plan.stage_at(state.global_step)
            self.trainer.dynamics.setdefault("skipped_updates", []).append(
                {"stage": stage, "update": state.global_step + 1}
            )
            self._bad = self._first = None  # the skipped update's losses do not count either
            logger.warning(
                "Skipped update %d: its gradient is not finite (%d skipped so far).",
                state.global_step + 1,
                len(self.skipped),
            )

    def on_step_end(self, args, state, control, **kwargs):
        if (
            control.should_log
            or control.should_save
            or control.should_evaluate
            or state.global_step >= state.max_steps
        ):
            self.check()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.check()

    def on_train_end(self, args, state, control, **kwargs):
        self.check()

    def check(self) -> None:
        """Raise `NonFiniteError` when a loss or gradient was not finite since the start (one synchronisation)."""
        if not self.active:
            return
        if self.policy == "skip":
            self._bad = self._first = None  # losses of updates that were applied are finite when their gradients are
            return
        accelerator = self.trainer.accelerator
        bad = self._bad if self._bad is not None else torch.zeros((), dtype=torch.bool, device=accelerator.device)
        if accelerator.num_processes > 1:  # every rank stops together (a rank's local loss may be the only bad one)
            bad = accelerator.reduce(bad.to(accelerator.device).int().reshape(1), reduction="sum").reshape(()) > 0
        if not bool(bad):
            return
        step = (
            int(self._first) if self._first is not None and int(self._first) >= 0 else self.trainer.state.global_step
        )
        raise NonFiniteError(self._message(step))

    def _message(self, step: int) -> str:
        trainer = self.trainer
        stage = "HP" if trainer.stage_plan.stage_at(step) == "hp" else "FT"
        samples, holders = self._samples_of(step)
        where = (
            f" The update used training samples {samples[:16]}{' ...' if len(samples) > 16 else ''}."
            if samples
            else ""
        )
        if holders:
            where += f" Non-finite input values in: {'; '.join(holders[:8])}."
        hint = ""
        if not holders and trainer.args.bf16 and trainer.args.device.type == "cpu" and torch.backends.mkldnn.enabled:
            # A known torch issue, not the run's data or settings (README "Real images", bf16): seen with torch
            # 2.14.1 on an AVX512-BF16 CPU, finite in a process's first training and inf/NaN in the next ones.
            hint = (
                " Under bf16 on the CPU this can also be torch's oneDNN bf16 kernels (seen with torch 2.14.1 on "
                "AVX512-BF16 CPUs from the second training in one process): set torch.backends.mkldnn.enabled = "
                "False before training, or train with bf16=False on the CPU."
            )
        return (
            f"The loss or gradient became NaN/inf at update {step + 1} ({stage}).{where} Training stopped before "
            "anything non-finite was written; the last good checkpoint is kept. Fix the data, or start a new run with "
            "a lower learning rate, more gradient clipping or on_nonfinite='skip' (which drops such updates): "
            "resuming refuses changed settings, which would mix two runs; the last good checkpoint's weights can be "
            f"the new run's start.{hint}"
        )

    def _samples_of(self, step: int) -> tuple[list[int], list[str]]:
        """The training samples of update `step` (from the trainer's seeded batch order) and those with non-finite
        input values (`index: key`). Empty when the order cannot be rebuilt (iterable datasets)."""
        from .feature_cache import global_batches

        trainer = self.trainer
        try:
            loader = trainer.get_train_dataloader()
            per_epoch = len(global_batches(loader, 0, trainer.accelerator.num_processes))
            ga = trainer.args.gradient_accumulation_steps
            updates = max(math.ceil(per_epoch / ga), 1)
            epoch, update = divmod(step, updates)  # the loop's epochs run on through both stages
            batches = global_batches(loader, epoch, trainer.accelerator.num_processes)[update * ga : (update + 1) * ga]
        except (TypeError, AttributeError, ValueError):
            return [], []
        samples = sorted(i for batch in batches for i in batch)
        # Labels are named only for an inf (NaN marks a missing label of multi-label and regression tasks: every
        # such sample was listed, and the message's first eight could leave out the input that held the inf).
        labels = set(trainer.label_names or [trainer.label_key])
        holders = []
        for index in samples:
            item = trainer.train_dataset[index]
            for key, value in item.items() if isinstance(item, Mapping) else []:
                if key in labels and not nonfinite_value(value, nan=False):
                    continue
                if nonfinite_value(value):
                    holders.append(f"sample {index} '{key}'")
        return samples, holders


def nonfinite_value(value, nan: bool = True) -> bool:
    """Whether an item's value is floating-point data holding NaN or inf (`nan=False`: inf only): a tensor, or a
    numpy array or float (items of pipelines that give numpy, e.g. a `datasets.Dataset` with
    `with_format("numpy")`)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return False
        return not bool(torch.isfinite(value).all()) if nan else bool(torch.isinf(value).any())
    if isinstance(value, (np.ndarray, np.floating, float)):
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            return False
        return not bool(np.isfinite(array).all()) if nan else bool(np.isinf(array).any())
    return False
