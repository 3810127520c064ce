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


__all__ = ["SHIPPED_METRICS", "accuracy_metrics", "load_metric"]
