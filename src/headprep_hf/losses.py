"""Losses with per-stage label smoothing, and the per-sample energy `||dL/dq||_2` of the paper, per problem type.

* `single_label_classification`: logits `(N, C)` or `(N, C, *spatial)`, labels `(N,)` or `(N, *spatial)`; or per-token
  logits `(N, T, C)` with labels `(N, T)` (transformers' token classification: class axis last; read so whenever the
  labels have the logits' first two sizes, also when `T == C`); positions whose label equals `ignore_index` are
  excluded from the loss and the energy. Energy `||e_y - softmax(q)||_2`, per sample the mean over its valid positions.
* `multi_label_classification`: logits and labels `(N, T)` (T binary tasks, labels 0/1, NaN = not measured); missing
  labels are excluded from the loss, the energy and the metrics. Smoothed targets `y (1 - eps) + eps / 2`. Energy
  `||sigmoid(q) - y||_2` over the sample's present labels (the gradient of the summed BCE).
* `regression`: logits and labels `(N, T)` (NaN = missing). MSE; energy `||q - y||_2` over the present labels.

`task_loss` and `task_energy` dispatch on the problem type; the trainer never branches on it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .split import extract_logits

logger = logging.getLogger(__name__)


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    class_last: bool | None = None,
) -> torch.Tensor:
    """Mean cross-entropy against `(1 - smoothing) * e_y + smoothing / C`, ignoring `ignore_index` labels; 0 (with
    zero gradients) when every label is ignored, as the masked BCE and MSE give. `class_last`: see
    `class_axis_last`."""
    labels = labels.long()
    if class_axis_last(logits, labels, class_last):  # as transformers' token classification models compute their loss
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=float(smoothing))
    # torch's mean over no labels is 0/0 = NaN, which the non-finite guard would take for divergence (e.g. a crop that
    # is all 255, an unlabelled sample in a batch of one). Decided on the device: no host synchronisation.
    return torch.where((labels != ignore_index).any(), loss, logits.sum() * 0.0)


def class_axis_last(logits: torch.Tensor, labels: torch.Tensor, hint: bool | None = None) -> bool:
    """Whether `logits` are per-token `(N, T, C)` for `labels` `(N, T)` (class axis last, as transformers' token
    classification models return them) rather than dense `(N, C, L)` for labels `(N, L)` (a `Conv1d` head).

    The shapes tell them apart unless the length equals the number of classes (`(N, 3, 3)` for labels `(N, 3)`);
    then `hint` decides (the trainer's `class_axis_hint`: False for a head ending in a convolution, True for one ending
    in a linear layer), and without a hint the class axis is taken to be last."""
    if not (logits.dim() == 3 and labels.dim() == 2 and tuple(labels.shape) == tuple(logits.shape[:2])):
        return False
    if hint is not None and logits.shape[1] == logits.shape[2]:
        return hint
    return True


def _flatten(
    logits: torch.Tensor, labels: torch.Tensor, class_last: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, C) logits, (positions,) labels and the sample index of each position."""
    n, c = logits.shape[:2]
    if class_axis_last(logits, labels, class_last):
        c = logits.shape[-1]
        flat_logits = logits.reshape(-1, c)
        sample = torch.arange(n, device=logits.device).repeat_interleave(logits.shape[1])
    elif logits.dim() > 2:
        per_sample = logits[0, 0].numel()
        flat_logits = logits.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)
        sample = torch.arange(n, device=logits.device).repeat_interleave(per_sample)
    else:
        flat_logits = logits
        sample = torch.arange(n, device=logits.device)
    return flat_logits, labels.reshape(-1).long(), sample


@torch.no_grad()
def cross_entropy_energy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, class_last: bool | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample energy `||e_y - softmax(q)||_2`, true-class probability p0 and correctness, with hard labels.

    For dense outputs each value is the mean over the sample's valid positions. Samples without a valid position
    get NaN energy (callers exclude them).

    Returns:
        dict with float tensors `energy`, `p_true`, `correct` (per-sample means over valid positions) and `count`
        (the number of valid positions), each of shape `(N,)`.
    """
    n = logits.shape[0]
    flat, y, sample = _flatten(logits.float(), labels, class_last)
    valid = y != ignore_index
    probs = flat.softmax(dim=-1)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    one_hot = F.one_hot(y_safe, num_classes=flat.shape[-1]).to(probs.dtype)
    energy = (one_hot - probs).norm(dim=-1)
    p_true = probs.gather(1, y_safe[:, None]).squeeze(1)
    correct = (probs.argmax(dim=-1) == y_safe).to(probs.dtype)
    count = torch.zeros(n, device=logits.device).index_add_(0, sample, valid.to(probs.dtype))
    out = {"count": count}
    for key, value in (("energy", energy), ("p_true", p_true), ("correct", correct)):
        total = torch.zeros(n, device=logits.device).index_add_(0, sample, torch.where(valid, value, 0.0))
        out[key] = total / count
    return out


PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def _present(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = labels.to(logits.dtype).reshape(logits.shape)
    return labels, ~torch.isnan(labels)


def masked_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean binary cross-entropy over the present (non-NaN) labels, against `y (1 - smoothing) + smoothing / 2`.

    A batch without any present label gives a zero loss that still depends on the logits (so every rank of a DDP
    job runs the same backward)."""
    labels, present = _present(logits, labels)
    targets = torch.where(present, labels, torch.zeros_like(labels)) * (1.0 - smoothing) + smoothing / 2.0
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return torch.where(present, losses, torch.zeros_like(losses)).sum() / present.sum().clamp(min=1)


def masked_mse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the present (non-NaN) labels."""
    labels, present = _present(logits, labels)
    errors = (logits - torch.where(present, labels, logits.detach())).pow(2)
    return torch.where(present, errors, torch.zeros_like(errors)).sum() / present.sum().clamp(min=1)


@torch.no_grad()
def multilabel_energy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample energy `||sigmoid(q) - y||_2` over the present labels, mean probability of the true label (p0),
    mean label accuracy at threshold 0.5, and `count` = 1 for a sample with at least one present label, else 0
    (its energy is NaN and excluded: the energy is a mean over samples)."""
    logits = logits.float().reshape(logits.shape[0], -1)
    labels, present = _present(logits, labels)
    y = torch.where(present, labels, torch.zeros_like(labels))
    probs = logits.sigmoid()
    n_present = present.sum(dim=1).to(logits.dtype)
    energy = torch.where(present, probs - y, torch.zeros_like(probs)).pow(2).sum(dim=1).sqrt()
    p_true = torch.where(y > 0.5, probs, 1.0 - probs)
    correct = ((probs > 0.5) == (y > 0.5)).to(logits.dtype)

    def mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(present, values, torch.zeros_like(values)).sum(dim=1) / n_present

    has_label = n_present > 0
    return {
        "energy": torch.where(has_label, energy, torch.full_like(energy, float("nan"))),
        "p_true": mean(p_true),
        "correct": mean(correct),
        "count": has_label.to(logits.dtype),
    }


@torch.no_grad()
def regression_energy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample energy `||q - y||_2` over the present labels; p0 and correctness are undefined (NaN)."""
    logits = logits.float().reshape(logits.shape[0], -1)
    labels, present = _present(logits, labels)
    diff = torch.where(present, logits - torch.where(present, labels, logits), torch.zeros_like(logits))
    has_label = present.any(dim=1)
    nan = torch.full((logits.shape[0],), float("nan"), device=logits.device)
    return {
        "energy": torch.where(has_label, diff.pow(2).sum(dim=1).sqrt(), nan),
        "p_true": nan,
        "correct": nan.clone(),
        "count": has_label.to(logits.dtype),
    }


def _check_problem_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")


def declared_problem_type(problem_type: str | None, model=None) -> str | None:
    """`problem_type` if set (checked), else what the model declares (`model.config.problem_type` or
    `model.problem_type`) where it is one of `PROBLEM_TYPES`, else None (nothing declared). A model's attribute of
    another vocabulary (`"multiclass"`) is its own business: `Trainer` ignores it, and so does the trainer."""
    if problem_type is None and model is not None:
        config = getattr(model, "config", None)
        for declared in (getattr(config, "problem_type", None), getattr(model, "problem_type", None)):
            if isinstance(declared, str) and declared in PROBLEM_TYPES:
                return declared
        return None
    if problem_type is not None:
        _check_problem_type(problem_type)
    return problem_type


def count_items(problem_type: str, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """How many label entries a mean `task_loss` averages over: labels other than `ignore_index` (single-label) or
    present (non-NaN) entries (multi-label, regression). A 0-dim int64 tensor."""
    if problem_type == "single_label_classification":
        return (labels != ignore_index).sum()
    return (~torch.isnan(labels.float())).sum()


def task_loss(
    problem_type: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    class_last: bool | None = None,
) -> torch.Tensor:
    """The training loss of `problem_type` (label smoothing applies to the classification types; `class_last`: see
    `class_axis_last`)."""
    _check_problem_type(problem_type)
    if problem_type == "multi_label_classification":
        return masked_bce_with_logits(logits, labels, smoothing)
    if problem_type == "regression":
        return masked_mse(logits, labels)
    return smoothed_cross_entropy(logits, labels, smoothing, ignore_index, class_last)


def task_energy(
    problem_type: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    class_last: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample `energy`, `p_true`, `correct` and `count` of `problem_type` (see the module docstring)."""
    _check_problem_type(problem_type)
    if problem_type == "multi_label_classification":
        return multilabel_energy(logits, labels)
    if problem_type == "regression":
        return regression_energy(logits, labels)
    return cross_entropy_energy(logits, labels, ignore_index=ignore_index, class_last=class_last)


def _checked_compute_loss(compute_loss):
    """Wrap a subclass's `compute_loss` so that two mistakes Trainer only reports far away are named where they
    happen (the call and its result are otherwise untouched):

    * outputs returned as a bare tensor: `Trainer.prediction_step` reads a tensor or tuple as `(loss, *outputs)`, so
      it would drop the first row of the logits of every batch and fail later with a prediction-count mismatch;
    * a model called by keyword (`model(pixel_values=x)`) when its forward takes one positional tensor (timm): the
      `TypeError` is raised again with `self.model_caller` named as the fix.
    """

    @functools.wraps(compute_loss)
    def checked(self, *args, **kwargs):
        try:
            result = compute_loss(self, *args, **kwargs)
        except TypeError as error:
            caller = getattr(self, "model_caller", None)
            if "unexpected keyword argument" in str(error) and caller is not None and caller.positional:
                raise TypeError(
                    f"{error}. In {type(self).__name__}.compute_loss: this model's forward takes one positional "
                    "tensor (as timm models do); call it with `self.model_caller(model, inputs)`, which passes the "
                    "batch's input positionally or by name as the forward takes it (never the labels)."
                ) from error
            raise
        # (model, inputs, return_outputs, num_items_in_batch), as Trainer passes them
        return_outputs = kwargs.get("return_outputs", args[2] if len(args) > 2 else False)
        if return_outputs:
            name = f"{type(self).__name__}.compute_loss(return_outputs=True)"
            fix = 'Return `(loss, {"logits": logits})` (or the model\'s ModelOutput) instead.'
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise TypeError(f"{name} must return a pair (loss, outputs), got {type(result).__name__}. {fix}")
            if isinstance(result[1], torch.Tensor):
                raise TypeError(
                    f"{name} returned its outputs as a bare tensor; Trainer.prediction_step reads a tensor as "
                    "(loss, *predictions) and would drop the first row of every batch's logits (a prediction-count "
                    f"mismatch later, in compute_metrics). {fix}"
                )
        return result

    checked._headprep_checked = True
    return checked


class TrainerLossMixin:
    """The loss of a [`HeadPrepTrainer`] (mixed into it): which loss a step uses (`uses_trainer_loss`), the trainer's
    own loss with stage label smoothing (`loss_from_logits`), and the exact average over the valid items of an
    optimizer step (all micro-batches and ranks). Uses the trainer's public `model_takes_labels`, `current_stage`,
    `current_label_smoothing`, `in_training_step`, `problem_type`, `model_caller` and `stage_plan`.

    A subclass that overrides `compute_loss` gets it wrapped by `_checked_compute_loss` (clear errors for outputs
    returned as a bare tensor and for a timm model called by keyword); the returned values are not changed.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Checked where the result is made, so the error names the method whatever path asked for the outputs
        # (prediction_step, or a user's own evaluation loop).
        own = cls.__dict__.get("compute_loss")
        if own is not None and callable(own) and not getattr(own, "_headprep_checked", False):
            cls.compute_loss = _checked_compute_loss(own)

    def uses_trainer_loss(self, training: bool = True, stage: str | None = None) -> bool:
        """Whether the trainer's own loss (`loss_from_logits`) computes the loss, else `Trainer.compute_loss`.

        Precedence: `compute_loss_func` (the user's) > the trainer's loss when the model takes no labels, when
        `args.problem_type` is set, when a subclass overrides `loss_from_logits` (it asks for its loss), or when the
        training stage smooths labels (`hp_label_smoothing` / `ft_label_smoothing`) > the model's own loss.
        """
        if self.compute_loss_func is not None:
            return False
        return not self.model_takes_labels or self._trainer_loss_asked(training, stage)

    def _trainer_loss_asked(self, training: bool, stage: str | None = None) -> bool:
        """Whether the run asks for the trainer's loss whatever the model computes: `args.problem_type` set, an
        overridden `loss_from_logits`, or a training stage that smooths labels."""
        overridden = type(self).loss_from_logits is not TrainerLossMixin.loss_from_logits
        if self.args.problem_type is not None or overridden:
            return True
        stage = stage or self.current_stage
        return training and (self.args.hp_label_smoothing if stage == "hp" else self.args.ft_label_smoothing) > 0

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None
    ):
        if not self.uses_trainer_loss(self.in_training_step):
            if getattr(self, "labels_through_kwargs", False) and self.compute_loss_func is None:
                return self._loss_of_kwargs_model(model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        outputs = self.model_caller(model, inputs)
        own = self._own_loss_of_labelless_model(outputs)
        if own is not None:
            return (own, outputs) if return_outputs else own
        if isinstance(inputs, Mapping) and self.label_key not in inputs:
            # (a model that takes no labels may train on data without them: `HeadPrepTrainer._may_take_own_loss`)
            from .labels import keys_without_labels, missing_labels_message  # (labels -> dynamics -> losses)

            # (the dataset's own keys where its first item shows them: the batch has lost the unused columns)
            keys = keys_without_labels(self, self.train_dataset) if self.in_training_step else None
            where = "train_dataset[0]" if keys is not None else "The batch"
            raise ValueError(
                missing_labels_message(self.label_key, keys if keys is not None else inputs.keys(), where)
                + f" ({type(self.accelerator.unwrap_model(model)).__name__} returned no loss of its own.)"
            )
        labels = inputs[self.label_key]
        smoothing = self.current_label_smoothing if self.in_training_step else 0.0
        loss = self.loss_from_logits(extract_logits(outputs), labels, smoothing)
        if self.in_training_step:
            if num_items_in_batch is not None:
                # The mean over this micro-batch's items, re-weighted so that the update is the mean over every item
                # of the optimizer step (all micro-batches, all ranks; DDP averages over ranks, hence world size).
                local = count_items(self.problem_type, labels, self.args.ignore_index)
                loss = loss * (local * self.accelerator.num_processes / num_items_in_batch.clamp(min=1))
            # Said here, where the loss is made; the value it replaces (the class's, or one a subclass set on the
            # instance, as Trainer documents) is put back at the next step's count (`_get_num_items_in_batch`), so a
            # subclass's compute_loss that does not call this one keeps its own.
            if not hasattr(self, "_loss_scaling_replaced"):
                self._loss_scaling_replaced = self.loss_is_scaled_for_ga
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if not return_outputs:
            return loss
        if isinstance(outputs, torch.Tensor):
            outputs = {"logits": outputs}
        elif isinstance(outputs, (tuple, list)):
            outputs = (loss, *outputs)  # Trainer's convention: the loss first, every model output after it
        return loss, outputs

    def _own_loss_of_labelless_model(self, outputs):
        """The loss a model whose forward takes no labels returned itself (a self-supervised objective, e.g.
        transformers' `ViTMAEForPreTraining`), where nothing asks for the trainer's loss (`_trainer_loss_asked`):
        `Trainer` trains such a model with that loss, and so does this trainer. None otherwise (a timm model returns
        logits only: the trainer's loss applies)."""
        if self.model_takes_labels or not isinstance(outputs, Mapping) or outputs.get("loss") is None:
            return None
        return None if self._trainer_loss_asked(self.in_training_step) else outputs["loss"]

    def _loss_of_kwargs_model(self, model, inputs, return_outputs, num_items_in_batch):
        """`Trainer.compute_loss` for a `forward(..., **kwargs)` that gets the labels because `label_names` is declared
        (as `Trainer` hands them over): a model that returns no loss is named with the fix, where `Trainer` fails with
        "did not return a loss" or takes the first row of bare logits for the loss."""
        fix = (
            f"{type(self.accelerator.unwrap_model(model)).__name__}.forward takes **kwargs and label_names="
            f"{self.args.label_names} is set, so it gets the labels and its own loss is used, as transformers.Trainer "
            "does; it returns no loss. Drop label_names (the trainer's loss then reads the labels under 'labels') or "
            "set problem_type (e.g. 'single_label_classification') to train with the trainer's loss."
        )
        try:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        except ValueError as error:
            if "did not return a loss" in str(error):  # (Trainer's message; tests/test_trainer_contract.py)
                raise ValueError(fix) from error
            raise
        if isinstance(outputs, torch.Tensor) and self.label_smoother is None:
            raise ValueError(fix)  # bare logits: Trainer took their first row for the loss
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """With the trainer's loss: items (labels other than `ignore_index`, not NaN) in an optimizer step's
        micro-batches, summed over ranks, so masked losses average over the step's items exactly as one process with
        the whole batch would. Otherwise `Trainer`'s own count.

        `loss_is_scaled_for_ga` goes back here to the value the trainer's own `compute_loss` replaced for the loss it
        made (the class's, None: Trainer's rule; or one a subclass computing its own loss set, on the class or the
        instance, as Trainer documents).
        """
        if hasattr(self, "_loss_scaling_replaced"):
            self.loss_is_scaled_for_ga = self.__dict__.pop("_loss_scaling_replaced")
        if not self.uses_trainer_loss(True, self.stage_plan.stage_at(self.state.global_step)):
            return super()._get_num_items_in_batch(batch_samples, device)
        name = self.label_key
        # (Mapping: tokenizer collators return a BatchEncoding, a UserDict)
        if not batch_samples or not all(isinstance(b, Mapping) and name in b for b in batch_samples):
            return None  # the trainer's loss is then a per-micro-batch mean: the Trainer divides by the steps
        count = sum(count_items(self.problem_type, b[name], self.args.ignore_index) for b in batch_samples)
        count = torch.as_tensor(count, device=device).reshape(1)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count)
        return count.sum()

    def warn_if_cached_hp_bypasses_the_loss(self) -> None:
        """Cached HP (`hp_cache_features`) trains the head on cached features with `loss_from_logits`: log that a
        `compute_loss` override or a `compute_loss_func` is not used in HP (FT uses it)."""
        custom = [
            f"{type(self).__name__}.compute_loss"
            if type(self).compute_loss is not TrainerLossMixin.compute_loss
            else "",
            "compute_loss_func" if self.compute_loss_func is not None else "",
        ]
        custom = [c for c in custom if c]
        if custom:
            logger.warning(
                "hp_cache_features=True: head probing trains the head on cached features with loss_from_logits; %s "
                "is not called in HP (it is in FT). Override loss_from_logits to change the HP loss, or set "
                "hp_cache_features=False.",
                " and ".join(custom),
            )

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """The trainer's loss for `problem_type` (cross-entropy with `ignore_index`, masked BCE or masked MSE;
        `label_smoothing` for the classification types).

        Override this (rather than `compute_loss`) to change the loss for every path, cached HP included.
        """
        return task_loss(
            self.problem_type, logits, labels, label_smoothing, self.args.ignore_index, self.class_axis_hint
        )
