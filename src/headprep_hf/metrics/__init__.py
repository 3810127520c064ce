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
    """A `compute_metrics` for `Trainer` that reports `accuracy` from logits and labels (shipped module)."""
    metric = load_metric("accuracy")

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=eval_prediction.label_ids)

    return compute_metrics


def argmax_logits(logits, labels):
    """`preprocess_logits_for_metrics` for dense tasks: keep the predicted class per pixel, not the logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=1)


def segmentation_metrics(num_classes: int, ignore_index: int = 255):
    """A `compute_metrics` reporting `mean_iou` (over classes present in labels or predictions), `pixel_accuracy`
    and per-class IoU, from predicted classes (see `argmax_logits`) or logits; `ignore_index` pixels are skipped."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        predictions = np.asarray(predictions)
        labels = np.asarray(eval_prediction.label_ids)
        if predictions.ndim == labels.ndim + 1:
            predictions = predictions.argmax(axis=1)
        # (negative labels: Trainer's -100 padding where masks of different heights are concatenated across batches)
        valid = (labels != ignore_index) & (labels >= 0)
        pred, true = predictions[valid].astype(np.int64), labels[valid].astype(np.int64)
        confusion = np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
        intersection = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - intersection
        present = union > 0
        iou = np.where(present, intersection / np.maximum(union, 1), np.nan)
        if confusion.sum() == 0:
            # (0/0: reported as 0.0 before, which a sweep ranked as a real, worst score; NaN is left out of tau*)
            logger.warning(
                "No labelled pixel in the %d evaluated masks (every pixel is ignore_index=%d): mean_iou and "
                "pixel_accuracy are NaN.", len(labels), ignore_index,
            )  # fmt: skip
            return {"mean_iou": float("nan"), "pixel_accuracy": float("nan")}
        metrics = {
            "mean_iou": float(np.nanmean(iou)),
            "pixel_accuracy": float(intersection.sum() / confusion.sum()),
        }
        metrics.update({f"iou_{c}": float(v) for c, v in enumerate(iou) if not np.isnan(v)})
        return metrics

    return compute_metrics


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
