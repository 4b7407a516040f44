"""Transfer learning: a pretrained backbone, a new head, frozen features, two-stage fine-tuning.

    model = imclass.transfer.transfer("mobilenetv2_100", num_classes=5, weights="imagenet", head="course")
    feats = imclass.transfer.extract_features(model.backbone, paths, model.preprocessing)

See docs/transfer.md.
"""
from __future__ import annotations

from imclass.transfer.features import FeatureCache, extract_features, feature_key, prepare_batch, read_for

__all__ = ["FeatureCache", "extract_features", "feature_key", "prepare_batch", "read_for"]
