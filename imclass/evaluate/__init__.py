"""Evaluation: classification metrics, calibration and the HTML evaluation report.

``imclass.evaluate.accuracy``, ``confusion_matrix``, ``per_class_accuracy`` and ``top_k_accuracy``
keep their old home; ``report`` writes the evaluation report of a model on a data set.
"""
from __future__ import annotations

from imclass.evaluate.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    nll,
    per_class_accuracy,
    reliability_bins,
    top_k_accuracy,
)
from imclass.evaluate.report import report, score

__all__ = ["accuracy", "confusion_matrix", "per_class_accuracy", "top_k_accuracy", "classification_metrics",
           "reliability_bins", "expected_calibration_error", "fit_temperature", "nll", "report", "score"]
