import numpy as np
import pytest
from transformers import EvalPrediction

from headprep_hf.metrics import SHIPPED_METRICS, accuracy_metrics, load_metric


def test_shipped_accuracy_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "accuracy" in SHIPPED_METRICS
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1], references=[0, 0], normalize=False) == {"accuracy": 1.0}
    assert metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3, 1]) == {"accuracy": 0.75}


def test_compute_metrics_from_logits():
    logits = np.array([[2.0, 0.1], [0.0, 1.0], [3.0, -1.0]])
    compute = accuracy_metrics()
    assert compute(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1]))) == {
        "accuracy": pytest.approx(2 / 3)
    }


def test_unknown_metric():
    with pytest.raises(ValueError, match="available offline: \\['accuracy'\\]"):
        load_metric("bleu")


def test_segmentation_metrics_skip_trainers_padding_of_masks_of_other_heights():
    """Masks of different heights are concatenated by Trainer with -100 padding: np.bincount failed on it."""
    from headprep_hf.metrics import segmentation_metrics

    labels = np.array([[[0, 1], [1, 255]], [[1, 0], [-100, -100]]])
    predictions = np.array([[[0, 1], [0, 1]], [[1, 1], [-100, -100]]])
    out = segmentation_metrics(2, ignore_index=255)(EvalPrediction(predictions=predictions, label_ids=labels))
    # 5 labelled pixels: 0->0, 1->1, 1->0, 1->1, 0->1: IoU(0) = 1/3, IoU(1) = 2/4
    assert out["pixel_accuracy"] == pytest.approx(3 / 5) and out["mean_iou"] == pytest.approx((1 / 3 + 2 / 4) / 2)
