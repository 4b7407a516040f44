"""Label review: find the images whose label is wrong, show them, fix the folder safely.

``review(ReviewConfig(data=...))`` ranks suspicious images (confident learning on out-of-sample
probabilities, feature-space outliers, duplicates with two labels); ``write_review`` writes
``review.json`` and an offline page; ``apply_plan`` / ``undo_log`` move files and back.
"""
from imclass.confident import find_label_issues, label_quality
from imclass.review.find import ReviewConfig, ReviewResult, review
from imclass.review.page import write_review
from imclass.review.plan import apply_plan, undo_log

__all__ = ["ReviewConfig", "ReviewResult", "apply_plan", "find_label_issues", "label_quality", "review",
           "undo_log", "write_review"]
