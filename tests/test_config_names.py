"""One name per training-config concept: ``CompileConfig`` / ``clf.compile_config``; the former names
are deprecated aliases that still give the same values (docs/training.md, "Names of the configs")."""
import dataclasses

import pytest
import torch

import imclass.train
from imclass.train import Classifier, CompileConfig


def test_compile_config_is_canonical_and_the_old_names_are_warned_aliases():
    clf = Classifier(torch.nn.Linear(4, 2), classes=["a", "b"], mean=[0.0], std=[1.0], device="cpu")
    assert clf.compile_config is None
    clf.compile(optimizer="sgd", lr=0.05)
    assert isinstance(clf.compile_config, CompileConfig) and clf.compile_config.lr == 0.05
    assert imclass.train.TrainConfig is CompileConfig
    with pytest.warns(DeprecationWarning, match="use Classifier.compile_config"):
        assert clf.config is clf.compile_config
    with pytest.warns(DeprecationWarning, match=r"dataclasses.asdict\(clf.compile_config\)"):
        assert clf.training_config() == dataclasses.asdict(clf.compile_config)
    assert clf.train_config is None  # the recorded run config: only a loaded model file fills it
