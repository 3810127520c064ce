"""Metrics that work offline: `evaluate` modules shipped inside the package, and `compute_metrics` helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
        valid = labels != ignore_index
        pred, true = predictions[valid].astype(np.int64), labels[valid].astype(np.int64)
        confusion = np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
        intersection = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - intersection
        present = union > 0
        iou = np.where(present, intersection / np.maximum(union, 1), np.nan)
        metrics = {
            "mean_iou": float(np.nanmean(iou)) if present.any() else 0.0,
            "pixel_accuracy": float(intersection.sum() / max(confusion.sum(), 1)),
        }
        metrics.update({f"iou_{c}": float(v) for c, v in enumerate(iou) if not np.isnan(v)})
        return metrics

    return compute_metrics


__all__ = ["SHIPPED_METRICS", "accuracy_metrics", "argmax_logits", "load_metric", "segmentation_metrics"]
