"""Evaluation: classification metrics, calibration and the HTML evaluation report.

``imclass.evaluate.accuracy``, ``confusion_matrix``, ``per_class_accuracy`` and ``top_k_accuracy``
keep their old home; ``report`` writes the evaluation report of a model on a data set.
"""
from __future__ import annotations

from imclass.evaluate.metrics import accuracy, confusion_matrix, per_class_accuracy, top_k_accuracy

__all__ = ["accuracy", "confusion_matrix", "per_class_accuracy", "top_k_accuracy"]
