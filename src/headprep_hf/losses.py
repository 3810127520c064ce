"""Losses with per-stage label smoothing, and the per-sample energy `||dL/dq||_2` of the paper, per problem type.

* `single_label_classification`: logits `(N, C)` or `(N, C, *spatial)`, labels `(N,)` or `(N, *spatial)`; positions
  whose label equals `ignore_index` are excluded from the loss and the energy. Energy `||e_y - softmax(q)||_2`.
* `multi_label_classification`: logits and labels `(N, T)` (T binary tasks, labels 0/1, NaN = not measured); missing
  labels are excluded from the loss, the energy and the metrics. Smoothed targets `y (1 - eps) + eps / 2`. Energy
  `||sigmoid(q) - y||_2` over the sample's present labels (the gradient of the summed BCE).
* `regression`: logits and labels `(N, T)` (NaN = missing). MSE; energy `||q - y||_2` over the present labels.

`task_loss` and `task_energy` dispatch on the problem type; the trainer never branches on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy against `(1 - smoothing) * e_y + smoothing / C`, ignoring `ignore_index` labels."""
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, label_smoothing=float(smoothing))


def _flatten(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, C) logits, (positions,) labels and the sample index of each position."""
    n, c = logits.shape[:2]
    if logits.dim() > 2:
        per_sample = logits[0, 0].numel()
        flat_logits = logits.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)
        sample = torch.arange(n, device=logits.device).repeat_interleave(per_sample)
    else:
        flat_logits = logits
        sample = torch.arange(n, device=logits.device)
    return flat_logits, labels.reshape(-1).long(), sample


@torch.no_grad()
def cross_entropy_energy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """Per-sample energy `||e_y - softmax(q)||_2`, true-class probability p0 and correctness, with hard labels.

    For dense outputs each value is the mean over the sample's valid positions. Samples without a valid position
    get NaN energy (callers exclude them).

    Returns:
        dict with float tensors `energy`, `p_true`, `correct` (per-sample means over valid positions) and `count`
        (the number of valid positions), each of shape `(N,)`.
    """
    n = logits.shape[0]
    flat, y, sample = _flatten(logits.float(), labels)
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
    """`problem_type` if set, else what the model declares (`model.config.problem_type` or `model.problem_type`),
    else None (nothing declared)."""
    if problem_type is None and model is not None:
        config = getattr(model, "config", None)
        problem_type = getattr(config, "problem_type", None) or getattr(model, "problem_type", None)
        if not isinstance(problem_type, str):
            problem_type = None
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
    problem_type: str, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """The training loss of `problem_type` (label smoothing applies to the classification types)."""
    _check_problem_type(problem_type)
    if problem_type == "multi_label_classification":
        return masked_bce_with_logits(logits, labels, smoothing)
    if problem_type == "regression":
        return masked_mse(logits, labels)
    return smoothed_cross_entropy(logits, labels, smoothing, ignore_index)


def task_energy(
    problem_type: str, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """Per-sample `energy`, `p_true`, `correct` and `count` of `problem_type` (see the module docstring)."""
    _check_problem_type(problem_type)
    if problem_type == "multi_label_classification":
        return multilabel_energy(logits, labels)
    if problem_type == "regression":
        return regression_energy(logits, labels)
    return cross_entropy_energy(logits, labels, ignore_index=ignore_index)
