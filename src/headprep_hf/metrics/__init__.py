"""Metrics that work offline: `evaluate` modules shipped inside the package, and `compute_metrics` helpers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)
_HERE = Path(__file__).parent
SHIPPED_METRICS = tuple(sorted(p.name for p in _HERE.iterdir() if (p / f"{p.name}.py").is_file()))


def load_metric(name: str, **kwargs):
    """`evaluate.load` of a metric module shipped with headprep_hf (no Hub access needed).

    Args:
        name: One of `SHIPPED_METRICS` (e.g. "accuracy").
    """
    import evaluate

    if name not in SHIPPED_METRICS:
        raise ValueError(f"No shipped metric {name!r}; available offline: {list(SHIPPED_METRICS)}.")
    return evaluate.load(str(_HERE / name), **kwargs)


def accuracy_metrics():
    """A `compute_metrics` for `Trainer` that reports `accuracy` from logits and labels (shipped module); NaN, with a
    warning naming the samples, where some logits are NaN/inf (argmax read a NaN row as class 0: a plausible accuracy,
    by which `load_best_model_at_end` chose a checkpoint)."""
    metric = load_metric("accuracy")

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = np.asarray(logits)
        if np.issubdtype(logits.dtype, np.floating):
            bad = ~np.isfinite(logits.reshape(len(logits), -1)).all(axis=1)
            if bad.any():
                logger.warning(
                    "accuracy: the logits of %d evaluation sample(s) are NaN/inf (samples %s): accuracy is NaN.",
                    int(bad.sum()),
                    np.flatnonzero(bad)[:8].tolist(),
                )
                return {"accuracy": float("nan")}
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=eval_prediction.label_ids)

    return compute_metrics


def argmax_logits(logits, labels):
    """`preprocess_logits_for_metrics` for dense tasks: keep the predicted class per pixel, not the logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=1)


def segmentation_metrics(num_classes: int, ignore_index: int = 255):
    """A `compute_metrics` reporting `mean_iou` (over classes present in labels or predictions), `pixel_accuracy`
    and per-class IoU, from predicted classes (see `argmax_logits`) or logits; `ignore_index` pixels are skipped.

    It takes `Trainer`'s `batch_eval_metrics=True` (the segmentation recipe's default): called one batch at a time,
    it adds up the batch's pixel counts on the batch's device and returns the metrics at the last batch, equal to the
    whole-set call's, so an evaluation never holds every mask of the set (PASCAL VOC val at 513 px: about 3 GB of
    int64 labels and as much for the predictions, on the device). An evaluation that raised part-way leaves its
    counts behind: call `compute_metrics.reset()` before evaluating with the same function again.
    """
    import torch

    counts_so_far: list[torch.Tensor] = []  # (the running counts of a batched evaluation)
    masks_so_far = [0]

    def compute_metrics(eval_prediction, compute_result: bool | None = None) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        labels = eval_prediction.label_ids
        counts = _pixel_counts(predictions, labels, num_classes, ignore_index)
        if compute_result is None:  # the whole set at once
            return _segmentation_scores(counts, num_classes, ignore_index, len(labels))
        counts_so_far[:] = [counts if not counts_so_far else counts_so_far[0] + counts]
        masks_so_far[0] += len(labels)
        if not compute_result:
            return {}
        counts, masks = counts_so_far.pop(), masks_so_far[0]
        reset()
        return _segmentation_scores(counts, num_classes, ignore_index, masks)

    def reset() -> None:
        counts_so_far.clear()
        masks_so_far[0] = 0

    compute_metrics.reset = reset
    return compute_metrics


def _pixel_counts(predictions, labels, num_classes: int, ignore_index: int):
    """Flat int64 counts of `num_classes**2 + 2` bins: `true * C + predicted` over the labelled pixels, then the
    pixels left out (`ignore_index`, or below 0: Trainer's -100 padding where masks of different heights are
    concatenated), then the labels at or above `num_classes`. numpy arrays or torch tensors, which stay on their
    device: every pixel lands in a bin, so no boolean selection (which would wait for the GPU) is needed."""
    import torch

    labels = torch.as_tensor(labels)
    predictions = torch.as_tensor(predictions, device=labels.device)
    if predictions.dim() == labels.dim() + 1:  # logits
        predictions = predictions.argmax(dim=1)
    labels, predictions, c = labels.long(), predictions.long(), num_classes
    left_out = (labels == ignore_index) | (labels < 0)
    index = torch.where(left_out, c * c, torch.where(labels >= c, c * c + 1, labels * c + predictions)).reshape(-1)
    counts = torch.zeros(c * c + 2, dtype=torch.int64, device=labels.device)
    return counts.index_add_(0, index, torch.ones(1, dtype=torch.int64, device=labels.device).expand(len(index)))


def _segmentation_scores(counts, num_classes: int, ignore_index: int, masks: int) -> dict[str, float]:
    counts = counts.cpu().numpy()
    outside = int(counts[-1])
    if outside:
        # (before: `np.bincount` gave more bins than the confusion matrix has, and the reshape failed)
        raise ValueError(
            f"{outside} labelled pixels of the {masks} evaluated masks have a class id at or above num_classes="
            f"{num_classes} and are not ignore_index={ignore_index}: fix the masks or build the head with more "
            "classes."
        )
    confusion = counts[: num_classes**2].reshape(num_classes, num_classes)
    if confusion.sum() == 0:
        # (0/0: reported as 0.0 before, which a sweep ranked as a real, worst score; NaN is left out of tau*)
        logger.warning(
            "No labelled pixel in the %d evaluated masks (every pixel is ignore_index=%d): mean_iou and "
            "pixel_accuracy are NaN.", masks, ignore_index,
        )  # fmt: skip
        return {"mean_iou": float("nan"), "pixel_accuracy": float("nan")}
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    iou = np.where(present, intersection / np.maximum(union, 1), np.nan)
    metrics = {
        "mean_iou": float(np.nanmean(iou)),
        "pixel_accuracy": float(intersection.sum() / confusion.sum()),
    }
    metrics.update({f"iou_{c}": float(v) for c, v in enumerate(iou) if not np.isnan(v)})
    return metrics


__all__ = ["SHIPPED_METRICS", "accuracy_metrics", "argmax_logits", "load_metric", "segmentation_metrics"]


def _logits_and_labels(eval_prediction) -> tuple[np.ndarray, np.ndarray]:
    logits = eval_prediction.predictions
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(eval_prediction.label_ids, dtype=np.float64).reshape(logits.shape)
    return logits, labels


def _per_task_mean(score, y_true: np.ndarray, y_score: np.ndarray, name: str) -> float:
    """OGB `Evaluator` semantics of its binary metrics: `score(labels, scores)` per task over its present (non-NaN)
    labels, averaged over the tasks where both classes are present; `ValueError` naming `name` when none has both."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(y_true.shape)
    scores = []
    for t in range(y_true.shape[1]):
        present = ~np.isnan(y_true[:, t])
        labels = y_true[present, t]
        if (labels == 1).any() and (labels == 0).any():
            scores.append(score(labels, y_score[present, t]))
    if not scores:
        raise ValueError(f"no task has both positive and negative labels; {name} is undefined")
    return float(np.mean(scores))


def multitask_roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """OGB `Evaluator` semantics for `rocauc`: ROC-AUC per task over its present (non-NaN) labels, averaged over the
    tasks where both classes are present. Raises `ValueError` when no task has both classes."""
    from sklearn.metrics import roc_auc_score

    return _per_task_mean(roc_auc_score, y_true, y_score, "ROC-AUC")


def multitask_average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """OGB `Evaluator` semantics for `ap` (ogbg-molpcba, ogbg-molmuv): sklearn's `average_precision_score` per task
    over its present (non-NaN) labels, averaged over the tasks where both classes are present. Raises `ValueError`
    when no task has both classes."""
    from sklearn.metrics import average_precision_score

    return _per_task_mean(average_precision_score, y_true, y_score, "average precision")


def multitask_rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """OGB `rmse`: per task the RMSE over its present labels, averaged over tasks with any label."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(y_true.shape)
    values = [
        np.sqrt(np.mean((y_true[p, t] - y_pred[p, t]) ** 2))
        for t in range(y_true.shape[1])
        if (p := ~np.isnan(y_true[:, t])).any()
    ]
    return float(np.mean(values))


def graph_metrics(problem_type: str = "multi_label_classification"):
    """A `compute_metrics` for multi-task graph property prediction: `roc_auc` and `ap` (average precision; OGB's
    `rocauc` and `ap`, binary tasks; logits are ranked, so no sigmoid is needed) and `accuracy` (at probability 0.5,
    over all present labels of the split), or `rmse` (regression); NaN labels are missing and skipped."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits, labels = _logits_and_labels(eval_prediction)
        names = ("rmse",) if problem_type == "regression" else ("roc_auc", "ap", "accuracy")
        if not np.isfinite(logits).all():
            # (NaN > 0 is False: a diverged model's accuracy came out as the share of negative labels)
            logger.warning(
                "%d of %d model outputs are NaN or inf: %s reported as NaN.",
                int((~np.isfinite(logits)).sum()), logits.size, ", ".join(names),
            )  # fmt: skip
            return dict.fromkeys(names, float("nan"))
        if problem_type == "regression":
            return {"rmse": multitask_rmse(labels, logits)}
        present = ~np.isnan(labels)
        accuracy = float(((logits > 0) == (labels > 0.5))[present].mean())
        metrics = {}
        for key, name, metric in (
            ("roc_auc", "ROC-AUC", multitask_roc_auc),
            ("ap", "AP", multitask_average_precision),
        ):
            try:
                metrics[key] = metric(labels, logits)
            except ValueError:
                # Too few evaluation graphs: report NaN (and say why) rather than abort the training run.
                logger.warning("%s undefined on %d graphs: no task has both classes; use a larger split", name,
                               len(labels))  # fmt: skip
                metrics[key] = float("nan")
        return {**metrics, "accuracy": accuracy}

    return compute_metrics
