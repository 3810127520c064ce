"""Accuracy as an `evaluate` module that ships inside headprep_hf, so metrics work offline.

Load it with `headprep_hf.metrics.load_metric("accuracy")` (or `evaluate.load(<this folder>)`).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to the references (optionally weighted, or the raw count)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    normalize (`bool`, defaults to `True`): return the fraction; `False` returns the number of correct samples.
    sample_weight (`list` of `float`, optional): per-sample weights.
Returns:
    accuracy (`float`): the (weighted) fraction, or count, of correct predictions.
Examples:
    >>> metric = load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape.")
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
