"""Transfer learning: a pretrained backbone, a new head, frozen features, two-stage fine-tuning.

    model = imclass.transfer.transfer("mobilenetv2_100", num_classes=5, weights="imagenet", head="course")
    feats = imclass.transfer.extract_features(model.backbone, paths, model.preprocessing)

See docs/transfer.md.
"""
from __future__ import annotations

from imclass.models.transfer_net import TransferNet
from imclass.models.weights import LoadReport, Preprocessing, WeightsError, apply_weights, preprocessing_for
from imclass.transfer.features import FeatureCache, extract_features, feature_key, prepare_batch, read_for
from imclass.transfer.finetune import (
    FineTuneResult, backbone_groups, fine_tune, fit_head, freeze, resize_for, transfer, unfreeze,
)

__all__ = [
    "FeatureCache", "FineTuneResult", "LoadReport", "Preprocessing", "TransferNet", "WeightsError", "apply_weights",
    "backbone_groups", "extract_features", "feature_key", "fine_tune", "fit_head", "freeze", "prepare_batch",
    "preprocessing_for", "read_for", "resize_for", "transfer", "unfreeze",
]
