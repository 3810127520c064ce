"""Progress bars: one per stage in a training loop, and one for each forward-only pass, drawn as transformers draws.

* The Trainer's `ProgressCallback` draws one tqdm bar over all updates of a `train()` call (none with `disable_tqdm`;
  only the main process draws). `start_stage_bar` names that bar after the stage it counts (`HP` / `FT`); at the
  HP->FT boundary of one `train()` call `finish_stage_bar` completes and closes the HP bar (it stays on screen) and
  `new_stage_bar` hands the callback a new `FT` bar over the FT updates, so each stage has its own rate and ETA (an
  HP update, backbone frozen, is several times cheaper than an FT update: one bar's ETA would mix the two). They read
  and set `ProgressCallback.training_bar` and `current_step` (pinned in `tests/test_upstream_canaries.py`) and run
  after the callback's own events (`StageCallback` is added after it). A run without HP (`hp_epochs=0`, `train()`)
  keeps Trainer's bar as it is.
* `pass_bar` wraps a forward-only pass (energy, drift probe, feature cache, BatchNorm statistics) in a transient bar
  (`leave=False`) under the same rules, with `transformers.utils.logging.tqdm` (which also honours
  `transformers.utils.logging.disable_progress_bar()`).
* `announce` writes one line where the Trainer's own log records appear at default settings: above the bars (as
  `ProgressCallback.on_log` does), printed when `disable_tqdm` gave the Trainer a `PrinterCallback`, else to this
  module's logger (a sweep's quiet jobs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback
from transformers.trainer_utils import has_length
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

STAGE_LABELS = {"hp": "HP", "ft": "FT"}


class QuietProgressCallback(ProgressCallback):
    """`ProgressCallback` without the log records it writes above the bar (a sweep's jobs: the sweep's own bar shows
    each job's result, and the records still reach `report_to`, `state.log_history` and `sweep.json`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def training_progress(trainer) -> ProgressCallback | None:
    """The trainer's `ProgressCallback` while it draws a training bar (bars on, main process, in a training loop)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and getattr(callback, "training_bar", None) is not None:
            return callback
    return None


def start_stage_bar(trainer, state) -> None:
    """Name the training bar after the stage of the next update; a loop resumed in its FT part gets a bar over the FT
    updates only. Called at the start of a training loop (after `ProgressCallback.on_train_begin`)."""
    plan = trainer.stage_plan
    progress = training_progress(trainer)
    if progress is None or _plain(plan):
        return  # no bar, or a plain run: Trainer's bar as it is
    if plan.plan == "both" and plan.hp_steps > 0 and state.global_step >= plan.hp_steps:
        new_stage_bar(trainer, "ft", plan.ft_steps, state.global_step, done=state.global_step - plan.hp_steps)
        return
    bar = progress.training_bar
    if plan.plan == "both" and plan.hp_steps > 0:  # HP first: the bar counts the HP updates
        bar.reset(total=plan.hp_steps)
    bar.set_description(stage_label(trainer, "hp" if plan.plan == "hp" or plan.hp_steps > 0 else "ft"))


def stage_label(trainer, stage: str) -> str:
    """`HP` / `FT`, followed by the trainer's `progress_label` when it has one (a sweep names its jobs)."""
    return " ".join(filter(None, (STAGE_LABELS[stage], getattr(trainer, "progress_label", None))))


def finish_stage_bar(trainer, state) -> None:
    """The HP bar at the boundary: brought to the current step and closed (left on screen)."""
    progress = training_progress(trainer)
    if progress is None:
        return
    progress.training_bar.update(state.global_step - progress.current_step)
    progress.current_step = state.global_step
    progress.training_bar.close()
    progress.training_bar = None


def new_stage_bar(trainer, stage: str, total: int, global_step: int, done: int = 0) -> None:
    """Give the trainer's `ProgressCallback` a new bar for `stage` over its `total` updates, `done` of them already
    done; the callback counts from `global_step` on. Nothing when the trainer draws no bars."""
    progress = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
    if progress is None or not trainer.is_world_process_zero():
        return
    if progress.training_bar is not None:
        progress.training_bar.close()
    # As ProgressCallback.on_train_begin builds its bar (tqdm.auto, dynamic width).
    progress.training_bar = tqdm(total=total, initial=done, desc=stage_label(trainer, stage), dynamic_ncols=True)
    progress.current_step = global_step


def restart_stage_clock(trainer) -> None:
    """Restart the training bar's clock (tqdm's `unpause`) when no update was counted yet: the measurement passes
    run before the first FT update (energy, drift probe) are not FT updates and would distort the rate and ETA."""
    progress = training_progress(trainer)
    if progress is not None and not _plain(trainer.stage_plan):
        progress.training_bar.unpause()


def _plain(plan) -> bool:
    # `train()` without HP: Trainer's bar is left as it is.
    return plan.plan == "both" and plan.hp_steps == 0 and not plan.hp_outside_loop


def pass_bar(trainer, iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """`iterable` in a transient progress bar named `desc` (none with `disable_tqdm`, none off the main process)."""
    if total is None and has_length(iterable):  # (a loader over an IterableDataset has `__len__` that raises)
        total = len(iterable)
    disable = trainer.args.disable_tqdm or not trainer.is_world_process_zero()
    return hf_logging.tqdm(
        iterable, desc=desc, total=total, unit="batch", leave=False, dynamic_ncols=True, disable=disable
    )


def announce(trainer, message: str) -> None:
    """`message` (main process) where the Trainer's log records appear: above the progress bars (tqdm's `write`, as
    `ProgressCallback.on_log`), printed beside the records `PrinterCallback` prints, else logged at INFO level."""
    if not trainer.is_world_process_zero():
        return
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(c, ProgressCallback) for c in callbacks):
        tqdm.write(message)
    elif any(isinstance(c, PrinterCallback) for c in callbacks) or not trainer.args.disable_tqdm:
        print(message)  # (PrinterCallback with disable_tqdm; a notebook's NotebookProgressCallback otherwise)
    else:
        logger.info(message)


def format_values(values: dict[str, float | None]) -> str:
    """`name value` pairs, 4 decimals, `n/a` for values that are not defined (e.g. no accuracy in regression)."""
    return ", ".join(f"{name} {'n/a' if value is None else f'{value:.4f}'}" for name, value in values.items())
