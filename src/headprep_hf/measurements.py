"""`MeasurementCallback`: what the paper measures during a [`HeadPrepTrainer`] run, as a `TrainerCallback`.

* At the start of FT: energy, HP train accuracy, p0 (logits and labels only) and the probe features z_0 (the head's
  input). The trainer asks for it at the HP->FT boundary (or before the first step when the run has no HP). Where
  the head inputs of the training set are already at hand, the head alone runs on them instead of a pass of the
  model over the training set: cached HP's (`head_inputs`, exactly the views the energy pass would read), or those
  the last uncached HP epoch passed to the head (`HPEpochInputs`: the backbone is frozen in eval mode during HP, so
  they are what a pass over the same views computes). `dynamics["energy_source"]` says which path ran.
* During FT: the drift of the probe features from z_0 at every epoch end, evaluation and the end of training, and the
  head's gradient norm at every update (summed on the device, read at logging steps).
* Values are merged into the trainer's next log record (as trl merges its extra metrics in `log()`), never logged as
  records of their own, so `state.log_history` keeps the Trainer's record layout.
* `save` writes the measurement state into a checkpoint (the trainer calls it before the checkpoint is committed,
  see `checkpoints`); `load` restores it on resume.

Measurements that need the head (drift, head gradient norm) are skipped, with one warning naming the fix, when the
model has no head the split can find.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import has_length

from .dynamics import (
    DRIFT_KEYS,
    FeatureModuleNotCalled,
    HeadInputNotATensor,
    InMemoryDataset,
    OutputsDoNotFitLabels,
    PassResult,
    ReplayedBatches,
    drift_metrics,
    grad_norm,
    head_input,
    histogram,
    kept_buffers,
    measure,
    preserved_state,
    probe_in_memory,
)
from .files import read_json, read_safetensors, write_json
from .labels import keys_without_labels
from .losses import task_energy
from .progress import pass_bar
from .split import BatchDoesNotFitForward, extract_logits

if TYPE_CHECKING:
    from .trainer import HeadPrepTrainer

logger = logging.getLogger(__name__)

MEASUREMENTS_NAME = "headprep_measurements.json"
FEATURES_NAME = "headprep_measurements.safetensors"
# The drift probe's definition, saved with z_0: "evenly spaced" samples (`spread_indices`); a z_0 without it was
# written by an earlier version from the FIRST samples, and is used only where those are the same (the whole set).
PROBE_METADATA = {"probe": "evenly spaced"}
DYNAMICS_NAME = "headprep_dynamics.json"


@dataclass
class HeadInputs:
    """The head inputs of the whole training set as cached HP read them (view 0), with what decides that view."""

    features: torch.Tensor
    labels: torch.Tensor
    seed: int
    batch_size: int
    num_workers: int


KEPT_INPUTS_MAX_BYTES = 2**30  # head inputs of one HP epoch kept for the energy (on their device) at most


class HPEpochInputs:
    """The head inputs and labels of the training micro-batches of one uncached HP epoch, kept where they were
    computed (no copy, no host sync), for the start-of-FT energy.

    A forward pre-hook on the first head module takes its input while `active` (the trainer sets it around its
    training step only, so evaluation passes are not recorded); `record(labels)` pairs it with the step's labels.
    With `model`, a forward hook on it also keeps the shape of the logits the whole model returned (`logit_shapes`):
    the head alone must give that shape for its logits to be the model's (not so when the model computes more after
    its head, e.g. GPT-2 picking each sequence's last token after `score`). Past `max_bytes` everything is dropped
    (`dropped` says why) and the separate pass runs instead.
    """

    def __init__(
        self,
        feature_module: torch.nn.Module,
        max_bytes: int = KEPT_INPUTS_MAX_BYTES,
        model: torch.nn.Module | None = None,
    ):
        self.features: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.logit_shapes: list[tuple[int, ...] | None] | None = [] if model is not None else None
        self.num_samples, self.nbytes, self.max_bytes = 0, 0, max_bytes
        self.dropped: str | None = None  # why nothing usable is kept
        self.active = False
        self._pending: torch.Tensor | None = None
        self._pending_shape: tuple[int, ...] | None = None
        self._handle = feature_module.register_forward_pre_hook(self._hook, with_kwargs=True)
        self._model_handle = model.register_forward_hook(self._output_hook) if model is not None else None

    def _hook(self, _module, args, kwargs):
        if self.active and self._pending is None:  # the first head call of the step's forward
            z = head_input(args, kwargs)
            if not isinstance(z, torch.Tensor):  # (a list of feature maps: nothing to keep; the separate pass runs)
                self._drop(f"the head is called with a {type(z).__name__}, not one tensor")
                return
            # (a copy: a head whose first op works in place, e.g. `Dropout(inplace=True)`, would change it)
            self._pending = z.detach().clone()

    def _output_hook(self, _module, _args, output):
        if self.active and self._pending_shape is None:
            try:
                self._pending_shape = tuple(extract_logits(output).shape)
            except (TypeError, KeyError, AttributeError, IndexError):
                self._pending_shape = ()  # no logits found: never equal to the head's, so the separate pass runs

    def record(self, labels) -> None:
        z, self._pending = self._pending, None
        shape, self._pending_shape = self._pending_shape, None
        if self.dropped is not None:
            return
        if z is None or not isinstance(labels, torch.Tensor) or labels.shape[:1] != z.shape[:1]:
            self._drop("a training step's head input and labels could not be paired")
            return
        self.nbytes += z.numel() * z.element_size()
        if self.nbytes > self.max_bytes:
            self._drop(f"the head inputs of an epoch exceed {self.max_bytes / 2**20:.0f} MiB")
            return
        self.features.append(z)
        self.labels.append(labels.detach())
        if self.logit_shapes is not None:
            self.logit_shapes.append(shape)
        self.num_samples += z.shape[0]

    def _drop(self, reason: str) -> None:
        self.dropped, self.features, self.labels = reason, [], []
        if self.logit_shapes is not None:
            self.logit_shapes = []

    def close(self) -> None:
        self._handle.remove()
        if self._model_handle is not None:
            self._model_handle.remove()
        self.active, self._pending, self._pending_shape = False, None, None


def default_probe_size(num_train: int) -> int:
    """The drift probe's default size for a training set of `num_train` samples: `min(256, max(64, n // 16))`.

    The drift pass is forward-only over the probe at every epoch end, so its cost per epoch is about
    `probe / (3 n)` of a training epoch (a forward-only sample costs about a third of a training one, less at the
    larger measurement batch): n // 16 keeps it near 1-2% on any set, where the former fixed 256 cost 4.4% per epoch on
    the 900-image toy set. The statistics are means over the probe (`||z_t-z_0||^2`, `z_t.z_0`, `||z_t||^2`, cos);
    at least 64 samples keep their standard error small against the differences the paper reads (tau = 0 vs
    tau > 0), and beyond 256 the mean is already tight: large sets keep the previous 256.
    """
    return min(num_train, 256, max(64, num_train // 16))


def spread_indices(n: int, k: int) -> list[int]:
    """`k` of the indices `0..n-1`, evenly spaced (`i * n // k`): the measurement subsets (drift probe,
    `energy_max_samples`). Not the first `k`: a set read from class folders is sorted by class, and its first `k`
    samples would hold its first classes only; evenly spaced samples hold every class in its share, with no random
    draw (the same subset in every run, seed and tau)."""
    return [i * n // k for i in range(k)] if k < n else list(range(n))


def broadcast_buffers(model: torch.nn.Module, accelerator) -> None:
    """Rank 0's buffers on every rank.

    DDP copies rank 0's buffers only at the start of a training forward; after the last step each rank holds BatchNorm
    statistics updated with its own batch. Measurements, and with stages evaluation and the model after a run, must
    all see rank 0's (the ones saved), or gathered values mix two models.
    """
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


@contextlib.contextmanager
def rank0_buffers(model: torch.nn.Module, accelerator):
    """Rank 0's buffers on every rank inside the block, each rank's own again after it: a measurement pass sees the
    model that is saved, and leaves a plain run's evaluations as `Trainer`'s (each rank with its own statistics)."""
    if not (accelerator.num_processes > 1 and torch.distributed.is_initialized()):
        yield
        return
    with kept_buffers(model):
        broadcast_buffers(model, accelerator)
        yield


def _reads_each_sample_once(trainer) -> bool:
    """Whether an epoch of the trainer's training loader reads every sample exactly once, which the energy from the
    last HP epoch's head inputs needs (the sample count alone would accept a sampler drawing with replacement, e.g. a
    class-balancing `WeightedRandomSampler`): Trainer's own samplers (random, sequential, grouped by length), not a
    subclass's `_get_train_sampler` or `get_train_dataloader`."""
    from .trainer import HeadPrepTrainer

    cls = type(trainer)
    return (
        getattr(trainer.args, "train_sampling_strategy", "random") in ("random", "sequential", "group_by_length")
        and cls._get_train_sampler is Trainer._get_train_sampler
        and cls.get_train_dataloader is HeadPrepTrainer.get_train_dataloader
    )


def final_drift_of(dynamics: dict) -> dict | None:
    """The drift of the model a run returned (`final_drift`), or the last `drift` record in a file written before
    `final_drift` was recorded; None where no drift was measured."""
    if dynamics.get("final_drift"):
        return dynamics["final_drift"]
    drift = dynamics.get("drift") or []
    return drift[-1] if drift else None


class MeasurementCallback(TrainerCallback):
    """Energy, HP train accuracy and p0 at FT start, drift and head gradient norm during FT (`trainer.dynamics`).

    Args:
        trainer: The [`HeadPrepTrainer`] it measures (its model, data, accelerator and public helpers).
    """

    def __init__(self, trainer: HeadPrepTrainer):
        self.trainer = trainer
        self.dynamics: dict[str, Any] = {}
        self.z0: torch.Tensor | None = None
        self.z0_path: str | None = None  # the checkpoint file z_0 was read from (None: measured in this run)
        self.last_drift_step: int | None = None
        self.pending: dict[str, float] = {}
        self._probe_loader = None
        self._probe_size = 0
        # Where the drift's z is read ("kept backbone": before the re-initialised blocks; "head input"), decided with
        # z_0 (`_first_probe`) and saved beside it, so that every z_t is read where z_0 was.
        self.drift_z: str | None = None
        self._grad_sum: torch.Tensor | float = 0.0
        self._grad_count = 0
        self._grad_finite: torch.Tensor | float = 0.0
        self._head_params: list[torch.nn.Parameter] | None = None
        self.head_inputs: HeadInputs | None = None  # cached by HP (a cached sweep hands them to its FT jobs)
        self.hp_epoch_inputs: HPEpochInputs | None = None  # the last uncached HP epoch's head inputs
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ run lifecycle (called by the trainer)
    def start_run(self, plan: str) -> None:
        """A new `train()` call: no z_0 yet; FT runs start new drift and head-gradient records."""
        self.z0, self.z0_path, self.last_drift_step, self.pending = None, None, None, {}
        self.drift_z = None
        self._probe_loader = None  # Trainer.train() frees Accelerate's prepared loaders
        self.drop_hp_epoch_inputs()
        self._grad_sum, self._grad_count, self._grad_finite = 0.0, 0, 0.0
        if plan in ("both", "ft"):
            for key in ("drift", "final_drift", "head_grad_norm"):  # (a call that measures none reports none)
                self.dynamics.pop(key, None)

    def save(self, folder: str) -> None:
        """The measurement state into checkpoint `folder`."""
        # Values not logged yet and the open head-gradient window travel too: the resumed run logs what the
        # uninterrupted one would have.
        state = {
            "dynamics": self.dynamics,
            "last_drift_step": self.last_drift_step,
            "pending": self.pending,
            "grad_window": [float(self._grad_sum), self._grad_count, float(self._grad_finite)],
        }
        write_json(os.path.join(folder, MEASUREMENTS_NAME), state)
        if self.z0 is not None:
            # (the probe's definition travels with it: a resume compares z_t of the same samples only)
            metadata = {**PROBE_METADATA, "z": self.drift_z or "head input"}
            save_file({"z0": self.z0.contiguous()}, os.path.join(folder, FEATURES_NAME), metadata=metadata)

    def load(self, folder: str) -> bool:
        """Restore the state saved in checkpoint `folder`; False when it holds none (e.g. a `Trainer` checkpoint)."""
        path = os.path.join(folder, MEASUREMENTS_NAME)
        if not os.path.isfile(path):
            return False
        state = read_json(path)
        self.dynamics = state["dynamics"]
        self.last_drift_step = state.get("last_drift_step")
        self.pending = state.get("pending", {})
        window = list(state.get("grad_window") or [0.0, 0])
        total, count = window[0], window[1]
        finite = window[2] if len(window) > 2 else float(count)
        self._grad_sum = torch.tensor(total, dtype=torch.float32) if count else 0.0
        self._grad_count, self._grad_finite = count, (torch.tensor(finite, dtype=torch.float32) if count else 0.0)
        features = os.path.join(folder, FEATURES_NAME)
        self.z0 = read_safetensors(features)["z0"] if os.path.isfile(features) else None
        self.z0_path = features if self.z0 is not None else None
        if self.z0 is not None and self.z0.dim() != 2:
            self._drop_z0(f"z_0 has shape {tuple(self.z0.shape)}, not one vector per probe sample")
        elif self.z0 is not None and self._z0_of_first_samples(features):
            self._drop_z0(
                f"z_0 holds the first {self.z0.shape[0]} training samples, the drift probe of an earlier version, "
                "where this version probes samples evenly spaced over the set"
            )
        if self.z0 is not None:
            from safetensors import safe_open

            with safe_open(features, framework="pt") as f:
                self.drift_z = (f.metadata() or {}).get("z")
            split = self.trainer.find_head()
            if self.drift_z is None and split is not None and split.reinit_names:
                # (written where z was the head's input, after the re-initialised blocks: the shapes may agree)
                self._drop_z0(
                    "z_0 was read after the re-initialised blocks (reinit_modules), where this version reads z before "
                    "them, as the paper does"
                )
            self.drift_z = self.drift_z or "head input"
        return True

    def _z0_of_first_samples(self, path: str) -> bool:
        """Whether the z_0 in `path` was written without the probe's definition (an earlier version: its first
        samples) and those are not the samples this version probes (a probe smaller than the training set)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("probe") == PROBE_METADATA["probe"] or self.trainer.drift_dataset is not None:
            return False
        train = self.trainer.train_dataset
        return has_length(train) and self.z0.shape[0] < len(train)

    def _drop_z0(self, problem: str) -> None:
        """A z_0 from a checkpoint that cannot be this run's probe features: warn, record why, measure no drift."""
        message = (
            f"{self.z0_path}: {problem}, so the drift is not measured after this resume (a checkpoint written by an "
            "earlier version). Training goes on."
        )
        self._warn_once("z0_shape", message)
        self.dynamics["drift_not_measured"] = message
        self.z0 = None

    def write(self, output_dir: str) -> None:
        """`output_dir/headprep_dynamics.json` (main process; nothing when nothing was measured)."""
        if self.dynamics and self.trainer.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, DYNAMICS_NAME)
            write_json(path, self.dynamics)
            self.trainer.written_outputs.add(os.path.abspath(path))

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self._head_params = None  # looked up again for this run's model (model_init may have built a new one)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._maybe_drift()

    def on_evaluate(self, args, state, control, **kwargs):
        self._maybe_drift()

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe_drift()
        self._final_drift(args, state)
        self._probe_loader = None  # the probe's (pinned) batches are not held after the run; rebuilt when needed

    # ------------------------------------------------------------------ measurements
    def measure_dataset(
        self,
        dataset,
        with_energy: bool,
        max_features: int,
        loader=None,
        seed=None,
        desc=None,
        lenient=False,
        drift=False,
        **kwargs,
    ):
        """One forward-only pass of the model over `dataset` (see `dynamics.measure`), in a progress bar named `desc`;
        every rank takes part. `lenient`: batch keys the forward does not take are left out (`ModelCaller`). `drift`:
        the features kept are the drift's (`ModelSplit.drift_module`: before re-initialised blocks), not the head's
        input."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        split = trainer.find_head() if max_features > 0 else None
        try:
            with rank0_buffers(model, trainer.accelerator):
                return measure(
                    model,
                    loader if loader is not None else trainer.measurement_loader(dataset),
                    trainer.model_caller.lenient if lenient else trainer.model_caller,
                    (split.drift_module(model) if drift else split.feature_module(model))
                    if split is not None
                    else None,
                    trainer.accelerator,
                    label_name=trainer.label_key,
                    with_energy=with_energy,
                    max_features=max_features,
                    ignore_index=trainer.args.ignore_index,
                    problem_type=trainer.problem_type if with_energy else "single_label_classification",
                    class_last=trainer.class_axis_hint,
                    autocast=trainer.measurement_autocast,
                    seed=seed,
                    progress=(lambda batches: pass_bar(trainer, batches, desc)) if desc else None,
                    **kwargs,
                )
        except FeatureModuleNotCalled as error:
            raise FeatureModuleNotCalled(
                f"The model's forward did not call the head {split.head_names}, so the features it takes could not "
                f"be read: set head_modules=[...] to the module(s) the forward applies to the features last, or "
                f"track_dynamics=False."
            ) from error

    def measure_start(self) -> dict[str, float]:
        """Energy, HP train accuracy and p0 of the training set (or `energy_dataset`) and z_0 of the probe set, at the
        current weights; updates `dynamics` and returns the summary."""
        trainer, args = self.trainer, self.trainer.args
        summary: dict[str, Any] = {}
        result = None
        if self._can_measure_energy():
            source, order = "cached head inputs", "dataset"
            result = self._energy_from_head_inputs()
            if result is None:
                source, order = "last HP epoch's head inputs", "last HP epoch"
                result = self._energy_from_hp_epoch()
                if result is not None and self._in_dataset_order(result):
                    order = "dataset"
            if result is None:
                source, order = "backbone pass", "dataset"
                result = self._energy_pass()
            self.dynamics["energy_source"], self.dynamics["p0_order"] = source, order
        if result is not None:
            summary = self._finite_summary(result)
            p0 = result.p_true
            self.dynamics.update(
                {
                    **summary,
                    "p0": [None if v != v else round(v, 6) for v in p0.tolist()],  # None: no label / regression
                    "p0_histogram": histogram(p0[~torch.isnan(p0)]),
                    "num_energy_samples": int(result.energy.shape[0]),
                    "problem_type": trainer.problem_type,
                }
            )
            self.pending.update({f"headprep/{k}": v for k, v in summary.items() if v is not None})
            if not torch.isnan(p0).all():
                self._histogram("headprep/p0", p0[~torch.isnan(p0)])
        self.drift_z = None  # (decided again with the new z_0)
        self.z0, self.z0_path = self._start_probe(), None
        if self.z0 is not None and not bool(torch.isfinite(self.z0).all()):
            # (every drift from it would be NaN/inf, and it was written into each checkpoint as it was)
            message = "z_0 (the probe's features at the start of FT) holds NaN/inf: the drift is not measured"
            self._note_nonfinite(message)
            self.dynamics["drift_not_measured"] = message
            self.z0 = None
        self.dynamics.update(
            {
                "hp_epochs": args.hp_epochs,
                "hp_label_smoothing": args.hp_label_smoothing or args.label_smoothing_factor,
                "ft_label_smoothing": args.ft_label_smoothing or args.label_smoothing_factor,
            }
        )
        if self.z0 is not None:
            self.dynamics["num_probe_samples"] = self._probe_size
            if self.z0.shape[0] != self._probe_size:  # several head inputs per sample (a multiple-choice model's)
                self.dynamics["num_probe_rows"] = int(self.z0.shape[0])
        self.dynamics.setdefault("ft_start_step", trainer.state.global_step)
        self.drop_hp_epoch_inputs()
        return summary

    def measure_drift(self) -> dict[str, float]:
        """Drift of the probe features at the current weights from z_0, recorded in `dynamics["drift"]`."""
        metrics = self._drift_now(f"drift at step {self.trainer.state.global_step}")
        if metrics is None:
            return {}
        state = self.trainer.state
        self.dynamics.setdefault("drift", []).append({"step": state.global_step, "epoch": state.epoch, **metrics})
        self.pending.update({f"drift/{k}": metrics[k] for k in DRIFT_KEYS})
        return metrics

    def _drift_now(self, what: str) -> dict[str, float | None] | None:
        """The drift metrics of the probe at the current weights (None where a loaded z_0 does not fit them)."""
        if self.z0 is None:
            raise RuntimeError("No z_0 yet: call measure_start() (or run HP / start FT) before measure_drift().")
        zt = self._probe()
        if self.z0_path is not None and self.z0.shape != zt.shape:  # (loaded: this run's own z_0 always fits)
            self._drop_z0(f"z_0 has shape {tuple(self.z0.shape)} where this version measures {tuple(zt.shape)}")
            return None
        metrics = drift_metrics(self.z0, zt)
        if not all(math.isfinite(v) for v in metrics.values()):
            self._note_nonfinite(f"{what}: the probe features are NaN/inf")
            metrics = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        return metrics

    def _final_drift(self, args, state) -> None:
        """`dynamics["final_drift"]`: the drift of the model `train()` returns. That is the last update's (the last
        `drift` record), except where `load_best_model_at_end` loaded the best checkpoint (Trainer does so before
        `on_train_end`): then it is measured again on the loaded weights, so the drift reported beside the
        metrics (`final_results.json`, `sweep.json`, the card) is the evaluated model's, not the last update's."""
        trainer = self.trainer
        drift = self.dynamics.get("drift")
        if not (trainer.track_dynamics and trainer.stage_plan.ft_started and self.z0 is not None and drift):
            return
        best = state.best_model_checkpoint
        if not (args.load_best_model_at_end and best is not None):
            self.dynamics["final_drift"] = {**drift[-1], "model": "last update"}
            return
        step = state.best_global_step
        if step is None:  # (an older TrainerState: the step from the checkpoint's name)
            step = int(re.search(r"(\d+)$", os.path.basename(os.path.normpath(best))).group(1))
        if step == drift[-1]["step"]:  # (the last update's weights: measured already)
            self.dynamics["final_drift"] = {**drift[-1], "model": "best checkpoint"}
            return
        metrics = self._drift_now(f"drift of the best checkpoint (step {step})")
        if metrics is not None:
            self.dynamics["final_drift"] = {"step": step, **metrics, "model": "best checkpoint"}

    def record_head_grad(self) -> None:
        """Add the head's current gradient norm to the window read at the next logging step (no host sync). The head
        is what HP trains: with `reinit_modules`, the re-initialised blocks too (the paper's head v, as for z)."""
        if self._head_params is None:
            split = self.trainer.find_head()
            self._head_params = [p for _, p in split.hp_parameters(self.trainer.model)] if split is not None else []
        norm = grad_norm(self._head_params)
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if norm is not None and scale is not None:
            # fp16: read right after the backward (before clipping, as Trainer's `grad_norm`), the gradients are still
            # multiplied by the GradScaler's scale (its `_scale` tensor, pinned by tests/test_upstream_canaries.py;
            # `get_scale()` would read it on the host: a synchronisation per update). A power of two: exact.
            norm = norm / scale.to(norm.device)
        if norm is not None:
            # Device-side: a non-finite norm (an update the guard's skip policy drops) adds 0 and counts 0.
            finite = torch.isfinite(norm)
            self._grad_sum = self._grad_sum + torch.where(finite, norm.detach(), torch.zeros_like(norm))
            self._grad_finite = self._grad_finite + finite.to(norm.dtype)
            self._grad_count += 1

    def pop_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """The values to merge into a log record: pending measurements, and the head gradient norm of the window on
        a training-loss record."""
        extra, self.pending = self.pending, {}
        if "loss" in logs and self._grad_count > 0 and float(self._grad_finite) > 0:
            value = float(self._grad_sum / self._grad_finite)
            extra["head_grad_norm"] = value
            state = self.trainer.state
            self.dynamics.setdefault("head_grad_norm", []).append(
                {"step": state.global_step, "epoch": state.epoch, "value": value}
            )
            self._grad_sum, self._grad_count, self._grad_finite = 0.0, 0, 0.0
        return extra

    # ------------------------------------------------------------------ the last uncached HP epoch's head inputs
    def hp_epoch_recorder(self) -> HPEpochInputs | None:
        """The recorder of this training step's head input, or None. Called by the trainer before each training
        step: opens the recorder at the first step of the last in-loop HP epoch when the start-of-FT energy can be
        computed exactly from what that epoch passes to the head (see `HeadPrepConfig.energy_from_hp_epoch`)."""
        trainer = self.trainer
        plan, step = trainer.stage_plan, trainer.state.global_step
        per_epoch = trainer.hp_steps_per_epoch
        if not (plan.plan != "ft" and per_epoch and plan.hp_steps - per_epoch <= step < plan.hp_steps):
            return None
        if self.hp_epoch_inputs is None and step == plan.hp_steps - per_epoch and self._hp_epoch_usable():
            split, model = trainer.find_head(), trainer.accelerator.unwrap_model(trainer.model)
            self.hp_epoch_inputs = HPEpochInputs(split.feature_module(model), model=model)
        return self.hp_epoch_inputs

    def drop_hp_epoch_inputs(self) -> None:
        if self.hp_epoch_inputs is not None:
            self.hp_epoch_inputs.close()
            self.hp_epoch_inputs = None

    def _hp_epoch_usable(self) -> bool:
        trainer, args = self.trainer, self.trainer.args
        if not (trainer.track_dynamics and args.energy_from_hp_epoch) or trainer.energy_dataset is not None:
            return False
        if trainer.accelerator.num_processes > 1 or args.torch_compile or args.reinit_modules:
            return False  # (each rank sees a shard; hooks under compile recompile; reinit blocks move z in HP)
        if args.hp_backbone_mode != "eval" or not has_length(trainer.train_dataset):
            return False
        if args.energy_max_samples is not None and args.energy_max_samples < len(trainer.train_dataset):
            return False
        if not _reads_each_sample_once(trainer):
            return False
        split = trainer.find_head()
        return (
            split is not None and len(split.head_names) == 1 and len(trainer.label_names or [trainer.label_key]) == 1
        )

    def _energy_from_hp_epoch(self):
        """The energy pass from the head inputs the last uncached HP epoch kept, when that epoch passed every training
        sample to the head exactly once (none dropped by `dataloader_drop_last`, no resume inside the epoch); None
        otherwise."""
        kept, trainer = self.hp_epoch_inputs, self.trainer
        if kept is None or kept.dropped is not None or kept.num_samples != len(trainer.train_dataset):
            if kept is not None:
                logger.info(
                    "Energy by a separate pass: the last HP epoch's head inputs are not usable (%s).",
                    kept.dropped or f"{kept.num_samples} of {len(trainer.train_dataset)} samples were recorded",
                )
            return None
        try:
            result = self._head_only_pass(kept.features, kept.labels, kept.logit_shapes)
        except (RuntimeError, ValueError, IndexError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            # The head alone on its inputs is a shortcut; where it does not run, the pass over the model decides.
            logger.info("Energy by a separate pass: the head alone did not run on its kept inputs (%s).", error)
            return None
        if result is None:
            logger.info(
                "Energy by a separate pass: the head %s alone does not give the logits the model returns (the model "
                "computes more after it).",
                trainer.find_head().head_names,
            )
        return result

    def _head_only_pass(self, features, labels, logit_shapes=None) -> PassResult | None:
        """Energy, p_true and correctness of the head alone (eval mode) on its inputs, in chunks of
        `measure_batch_size` (`features`/`labels`: one tensor, or the per-step lists). With `logit_shapes` (one per
        step, the shape of the logits the whole model returned), None as soon as the head's logits differ in
        shape."""
        trainer, args = self.trainer, self.trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        split, device = trainer.find_head(), next(model.parameters()).device
        if isinstance(features, torch.Tensor):
            size = trainer.measure_batch_size
            features = [features[i : i + size] for i in range(0, features.shape[0], size)]
            labels = [labels[i : i + size] for i in range(0, labels.shape[0], size)]
        parts: dict[str, list[torch.Tensor]] = {}
        shapes = logit_shapes if logit_shapes is not None else [None] * len(features)
        with preserved_state(model):
            for z, y, shape in zip(features, labels, shapes):
                z, y = z.to(device), y.to(device)
                with trainer.measurement_autocast():
                    logits = split.head_logits(model, z, y)
                if logit_shapes is not None and tuple(logits.shape) != shape:
                    return None
                stats = task_energy(trainer.problem_type, logits, y, args.ignore_index, trainer.class_axis_hint)
                for key, value in stats.items():
                    parts.setdefault(key, []).append(value.detach().cpu())
        return PassResult(**{key: torch.cat(values) for key, values in parts.items()})

    # ------------------------------------------------------------------ helpers
    def before_checkpoint(self) -> None:
        """Called before a checkpoint's measurement state is written. A checkpoint at an epoch's last update (or the
        run's) with `save_strategy="steps"` is written before `on_epoch_end` (or `on_train_end`) measures that step's
        drift, so a run resumed from it would never measure it: measured now instead, on the same weights (the later
        event then skips the step), so the checkpoint holds every drift record of the uninterrupted run."""
        state = self.trainer.state
        if (state.epoch is not None and float(state.epoch).is_integer()) or state.global_step >= state.max_steps:
            self._maybe_drift()

    def _maybe_drift(self) -> None:
        trainer = self.trainer
        if not (trainer.track_dynamics and trainer.stage_plan.ft_started and self.z0 is not None):
            return
        step = trainer.state.global_step
        if not trainer.is_in_train or step in (self.last_drift_step, self.dynamics.get("ft_start_step")):
            return
        self.last_drift_step = step
        self.measure_drift()

    def _last_hp_epoch_indices(self, positions: list[int]) -> tuple[list[int], str]:
        """The dataset indices of `positions` in the order the last HP epoch read the training set (the trainer's
        seeded batch order, rebuilt as the guard does), and what they are; the positions where it cannot be rebuilt."""
        from .feature_cache import global_batches

        trainer = self.trainer
        try:
            loader = trainer.get_train_dataloader()
            order = [i for batch in global_batches(loader, trainer.args.hp_epochs - 1) for i in batch]
            return [order[p] for p in positions], "samples"
        except (TypeError, AttributeError, ValueError, IndexError):
            return positions, "positions in the last HP epoch's order"

    def _in_dataset_order(self, result: PassResult) -> bool:
        """Put the per-sample values of the last HP epoch (in the order it read the samples) in dataset order, in
        place, where that order can be rebuilt (the trainer's seeded batch order); False (left as they are) where it
        cannot. So `p0` is the same list whether the energy came from the kept inputs or a separate pass, and after a
        resume inside the last HP epoch (which measures by a separate pass)."""
        n = int(result.energy.shape[0])
        order, what = self._last_hp_epoch_indices(list(range(n)))
        if what != "samples" or sorted(order) != list(range(n)):
            return False
        where = torch.as_tensor(order, dtype=torch.long)
        for key in ("energy", "p_true", "correct", "count"):
            values = getattr(result, key)
            if values is not None:
                placed = torch.empty_like(values)
                placed[where] = values
                setattr(result, key, placed)
        return True

    def _finite_summary(self, result) -> dict:
        # NaN energy also marks samples without a label (excluded by the summary); a NaN where labels exist means the
        # outputs were not finite: recorded as null with the reason, never as a silent NaN or a silently smaller mean.
        bad = (torch.isnan(result.energy) & (result.count > 0)) | torch.isinf(result.energy)
        if not bool(bad.any()):
            return result.summary()
        indices, what = torch.nonzero(bad).flatten().tolist(), "samples"
        if self.dynamics.get("p0_order") == "last HP epoch":  # positions in that epoch's order, not dataset indices
            indices, what = self._last_hp_epoch_indices(indices)
        self._note_nonfinite(
            f"energy at step {self.trainer.state.global_step}: the outputs on {len(indices)} training sample(s) "
            f"are NaN/inf ({what} {indices[:8]})"
        )
        return {"energy": None, "hp_train_accuracy": None, "p0_mean": None}

    def _note_nonfinite(self, message: str) -> None:
        self.dynamics.setdefault("nonfinite", []).append(message)
        logger.warning("Not finite: %s; recorded as null.", message)

    def _energy_from_head_inputs(self):
        """The energy pass from head inputs cached by HP (`head_inputs`), when they are exactly what the backbone
        pass would give: the same view of the same samples (seed, batch size and loader workers of the pass), the
        frozen backbone in eval mode, the whole training set; None otherwise (the backbone pass runs)."""
        inputs, trainer, args = self.head_inputs, self.trainer, self.trainer.args
        if inputs is None or trainer.energy_dataset is not None or trainer.find_head() is None:
            return None
        n = len(trainer.train_dataset)
        same_view = (inputs.seed, inputs.batch_size, inputs.num_workers) == (
            args.seed,
            trainer.measure_batch_size,
            args.dataloader_num_workers,
        )
        whole = args.energy_max_samples is None or args.energy_max_samples >= n
        if not (same_view and whole and inputs.features.shape[0] == n and args.hp_backbone_mode == "eval"):
            return None
        return self._head_only_pass(inputs.features, inputs.labels)

    def _energy_pass(self):
        trainer, args = self.trainer, self.trainer.args
        energy_set = trainer.energy_dataset if trainer.energy_dataset is not None else trainer.train_dataset
        if args.energy_max_samples is not None and args.energy_max_samples < len(energy_set):
            if isinstance(energy_set, torch.utils.data.IterableDataset):  # (a stream with a length: no random access)
                self._warn_once(
                    "energy_stream",
                    f"energy_max_samples={args.energy_max_samples}: the set is an IterableDataset, whose samples "
                    f"cannot be picked, so the energy is measured on all {len(energy_set)} of them; pass "
                    "energy_dataset=... (a map-style dataset) to measure on a subset.",
                )
            else:
                energy_set = torch.utils.data.Subset(
                    energy_set, spread_indices(len(energy_set), args.energy_max_samples)
                )
        try:
            # Seeded: the same views whenever it runs (so the energy is a function of the weights alone).
            return self.measure_dataset(
                energy_set, with_energy=True, max_features=0, seed=args.seed, desc="energy", lenient=True
            )
        except BatchDoesNotFitForward as error:
            # (batches a compute_loss of the user's own consumes, e.g. (x, y) tuples: in a run without HP they train
            # as with Trainer; with HP, head probing refused them first)
            self._warn_once(
                "energy_batch",
                f"Energy, HP accuracy and p0 were not measured: {error} The measurement passes collate with the "
                "data collator too: one that returns a mapping of the forward's inputs (and 'labels') measures them; "
                "or set track_dynamics=False.",
            )
            return None
        except OutputsDoNotFitLabels as error:
            # Raised as it came where the problem type was declared, and with several processes: a rank that skipped
            # the measurement while another went on would leave the ranks' collective calls out of step. (An error
            # reading the data or in the forward is not caught at all: it is no reason to skip a measurement.)
            if trainer.declares_problem_type or trainer.accelerator.num_processes > 1:
                raise error.__cause__ from None
            # The problem type was read off the labels, and these outputs do not fit it (e.g. a causal LM's shifted
            # token logits): measuring is not worth failing the user's training for.
            self._warn_once(
                "energy",
                f"Energy, HP accuracy and p0 were not measured: the outputs do not fit the problem type "
                f"{trainer.problem_type!r} read off the labels ({error}). If another problem type fits these outputs "
                "and labels, set problem_type to measure them.",
            )
            return None

    def _can_measure_energy(self) -> bool:
        trainer = self.trainer
        if trainer.energy_dataset is None and not has_length(trainer.train_dataset):
            self._warn_once(
                "energy_unsized",
                "Energy, HP accuracy and p0 are not measured: the training set has no length (an IterableDataset), "
                "so there is no pass over it; pass energy_dataset=... (a dataset with a length) to measure them.",
            )
            return False
        names = trainer.label_names or [trainer.label_key]  # (an explicit label_names=[]: read under "labels")
        if len(names) == 1:
            given = trainer.energy_dataset is not None
            keys = keys_without_labels(trainer, trainer.energy_dataset if given else trainer.train_dataset)
            if keys is None:
                return True
            # (a model that computes its own loss from its inputs alone, e.g. a masked-image objective, or from a
            # target named without "label" that Trainer hands it: it trains as with Trainer, nothing to measure with)
            which = "energy_dataset" if given else "train_dataset"
            self._warn_once(
                "labels",
                f"Energy, HP accuracy and p0 are not measured: {which}'s items hold no {names[0]!r} (their keys: "
                f"{keys}). If one of these keys holds the labels, name it in label_names=[...]; otherwise pass "
                "energy_dataset=... with labels to measure them.",
            )
            return False
        self._warn_once("labels", f"Energy, HP accuracy and p0 need one label column; the model has {names}: skipped.")
        return False

    def _head_or_warn(self):
        return self.trainer.find_head(warn=True)

    def _start_probe(self) -> torch.Tensor | None:
        """z_0, or None (with one warning) where drift cannot be measured: no head found, no probe to draw from a
        training set without a length, or a guessed head that the forward does not call in a run without HP (such a
        model trains as with `Trainer`)."""
        trainer = self.trainer
        if self._head_or_warn() is None:
            return None
        train = trainer.train_dataset
        if trainer.drift_dataset is None and not has_length(train):
            self._warn_once(
                "probe_unsized",
                "Drift is not measured: its probe samples are taken from the training set, which has no length "
                "(an IterableDataset); pass drift_dataset=... (a dataset with a length) to measure it.",
            )
            return None
        if trainer.drift_dataset is None and isinstance(train, torch.utils.data.IterableDataset):
            self._warn_once(
                "probe_stream",
                "Drift is not measured: its probe samples are picked from the training set, an IterableDataset "
                "(a stream, even with a length, has no random access); pass drift_dataset=... (a map-style dataset) "
                "to measure it.",
            )
            return None
        try:
            return self._probe()
        except HeadInputNotATensor as error:
            self._warn_once(
                "head_input",
                f"{error}: drift is not measured. Set head_modules=[...] to a module the forward calls with one "
                "tensor of features (e.g. the classifier layer after the pooling), or track_dynamics=False.",
            )
            return None
        except BatchDoesNotFitForward as error:
            self._warn_once(
                "probe_batch",
                f"Drift is not measured: {error} The measurement passes collate with the data collator too: one that "
                "returns a mapping of the forward's inputs measures it; or set track_dynamics=False.",
            )
            return None
        except FeatureModuleNotCalled as error:
            guessed = trainer.args.head_modules is None and trainer._explicit_split is None
            if not guessed or trainer.args.hp_epochs > 0:
                raise
            self._warn_once("head_not_called", f"{error} Drift is not measured.")
            return None

    def _probe(self) -> torch.Tensor:
        # The probe loader is built once per run; the probe samples are read once with the RNGs seeded and kept in
        # memory when they fit (`probe_in_memory`), so z_0 and every z_t see the same (augmented) views. In one
        # process their batches are also collated once and replayed (`ReplayedBatches`): the same batches, without
        # the per-pass collating and pinning.
        trainer = self.trainer
        if self._probe_loader is None:
            source = self._probe_dataset()
            probe_set = probe_in_memory(source, seed=trainer.args.seed)
            self._probe_size = len(probe_set)
            loader = self._probe_loader = trainer.measurement_loader(probe_set)
            if isinstance(probe_set, InMemoryDataset) and trainer.accelerator.num_processes == 1:
                device = trainer.accelerator.device
                self._probe_loader = ReplayedBatches(
                    loader,
                    seed=trainer.args.seed,
                    # (labels a forward requires stay: `ModelCaller` passes them)
                    drop_keys=[n for n in trainer.label_names if n not in trainer.model_caller.required_labels],
                    device=device,
                    pin=trainer.args.dataloader_pin_memory and device.type == "cuda",
                    non_blocking=bool(getattr(trainer.accelerator, "non_blocking", False)),
                )
                if self._probe_loader is not loader and probe_set is not source:
                    probe_set.samples = []  # ours, and replayed: one copy of the probe (Accelerate keeps the loader)
        if self.drift_z is None:
            self.drift_z, z = self._first_probe()
            return z
        return self._probe_pass(kept_backbone=self.drift_z == "kept backbone")

    def _probe_pass(self, kept_backbone: bool) -> torch.Tensor:
        return self.measure_dataset(
            None,
            False,
            sys.maxsize,  # every head input of the probe: a multiple-choice model's head sees one row per choice
            loader=self._probe_loader,
            seed=self.trainer.args.seed,
            desc="drift probe",
            lenient=True,
            drift=kept_backbone,
        ).features

    def _first_probe(self) -> tuple[str, torch.Tensor]:
        """Where the drift's z is read, and z_0: with `reinit_modules`, before the re-initialised blocks (the paper's
        z: they are part of the head), unless the first of them is not called by the forward or its input is not one
        vector per sample (a GCN's block sees node rows): then, with a warning, at the head's input."""
        split = self.trainer.find_head()
        if split is None or not split.reinit_names:
            return "head input", self._probe_pass(kept_backbone=False)
        try:
            z = self._probe_pass(kept_backbone=True)
            why = (
                None
                if z.shape[0] == self._probe_size
                else f"its input has {z.shape[0]} rows for {self._probe_size} probe samples"
            )
        except FeatureModuleNotCalled:
            why = "the forward does not call it"
        if why is None:
            return "kept backbone", z
        self._warn_once(
            "drift_z",
            f"The drift's z is read at the head's input, after the re-initialised blocks, not before the first of "
            f"them ({split.reinit_names}): {why}.",
        )
        return "head input", self._probe_pass(kept_backbone=False)

    def _probe_dataset(self):
        trainer = self.trainer
        if trainer.drift_dataset is not None:
            return trainer.drift_dataset
        wanted, available = trainer.args.drift_probe_samples, len(trainer.train_dataset)
        if wanted is None:
            wanted = default_probe_size(available)
        elif wanted > available:
            self._warn_once(
                "probe",
                f"drift_probe_samples={wanted} is larger than the training set ({available} samples): the drift is "
                f"measured on all {available}.",
            )
        return torch.utils.data.Subset(trainer.train_dataset, spread_indices(available, min(wanted, available)))

    def _histogram(self, tag: str, values: torch.Tensor) -> None:
        from transformers.integrations import TensorBoardCallback

        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if isinstance(callback, TensorBoardCallback) and writer is not None:
                writer.add_histogram(tag, values.numpy(), self.trainer.state.global_step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)
