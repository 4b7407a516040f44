"""The public surface stays put while the code behind it moves: every public name imports from its
public path (the names each path exported before the floors of issue 21), the faces hand out the
very objects the code defines, every name the README and docs/*.md write as ``imclass.x.y``
resolves, and every CLI command still has its flags and answers ``--help``."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]

# public path -> the names it exported (its __all__ at the commit before issue 21); more may be added
PUBLIC = {
    "imclass.layers": ["Activation", "Add", "AveragePooling2D", "BatchNormalization", "Concatenate", "Conv2D", "Dense", "Dropout", "Flatten", "GlobalAveragePooling2D", "Input", "KerasModel", "Layer", "LeakyReLU", "MaxPooling2D", "Maxout", "ModelLayer", "Sequential", "conv_output_size", "to_channels_first"],
    "imclass.models": ["Input", "Model", "Sequential", "create", "load_model", "names", "register_model", "register_prefix"],
    "imclass.optimizers": ["Adadelta", "Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop", "SGD", "get", "schedules"],
    "imclass.losses": ["BinaryCrossentropy", "CategoricalCrossentropy", "Loss", "SparseCategoricalCrossentropy", "binary_crossentropy", "categorical_crossentropy", "get", "names", "sparse_categorical_crossentropy"],
    "imclass.callbacks": ["CSVLogger", "Callback", "EarlyStopping", "EpochLogger", "History", "LearningRateScheduler", "ModelCheckpoint", "ProgressBar", "ReduceLROnPlateau", "TensorBoard", "TrainingCurves"],
    "imclass.applications": ["APPLICATIONS", "Application", "DenseNet121", "EfficientNetB0", "InceptionV3", "MobileNetV2", "NASNetLarge", "NASNetMobile", "ResNet101", "ResNet152", "ResNet50", "VGG16", "Xception"],
    "imclass.utils": ["to_categorical"],
    "imclass.io": ["FORMAT_VERSION", "ModelFileError", "load", "load_weights", "read_metadata", "save"],
    "imclass.train": ["CSVLogger", "Callback", "Classifier", "EarlyStopping", "History", "LRFindResult", "LRFinder", "ModelCheckpoint", "ProgressBar", "Schedule", "TensorBoard", "TimeBudget", "TrainConfig", "TrainState", "TrainingCurves", "TrainingDiverged", "channel_stats", "cpu_has_native_bf16", "load_checkpoint", "make_optimizer", "make_schedule", "resolve_device", "save_checkpoint"],
    "imclass.data": ["CLASSES", "DownloadError", "ImageDataset", "TensorLoader", "UnreadableImageError", "as_images", "as_labels", "canonical_name", "clear_cache", "cutout", "fetch", "from_arrays", "load", "load_folder", "names", "random_crop", "random_flip", "read_image", "resize_images", "resolve_root", "split_indices", "train_val_split"],
    "imclass.knn": ["KNN", "KSelection", "METRICS", "NearestNeighbor", "choose_k", "neighbour_grid"],
    "imclass.evaluate": ["accuracy", "classification_metrics", "confusion_matrix", "expected_calibration_error", "fit_temperature", "nll", "per_class_accuracy", "reliability_bins", "report", "score", "top_k_accuracy"],
    "imclass.explain": ["Explanation", "METHODS", "activations", "filter_images", "gradcam", "neighbours", "occlusion", "saliency", "same_l2", "save_activations", "save_filters", "tsne_map"],
    "imclass.serve": ["DEFAULT_MAX_PIXELS", "ImageError", "Predictor", "decode_image", "find_images"],
    "imclass.transfer": ["FeatureCache", "FineTuneResult", "LoadReport", "Preprocessing", "TransferNet", "WeightsError", "apply_weights", "backbone_groups", "extract_features", "feature_key", "fine_tune", "fit_head", "freeze", "prepare_batch", "preprocessing_for", "read_for", "resize_for", "transfer", "unfreeze"],
    "imclass.visualize": ["save_image_grid", "save_line_plot"],
    "imclass.summarize": ["LayerRow", "summary", "summary_rows"],
    "imclass.tta": ["TTA_LEVELS", "TTA_NAMES", "choose_tta", "mirror", "translate", "tta_logits", "tta_name", "tta_views"],
    "imclass.activations": ["Maxout", "activation_names", "create_activation", "resolve_activation", "width_factor"],
    "imclass.tuning": ["PruningCallback", "TuneConfig", "load_space", "parse_space", "tune"],
}

# `import imclass` and its top-level names (lazy)
TOP_LEVEL = ["KNN", "NearestNeighbor", "choose_k", "Sequential", "summary", "Classifier", "save", "load",
             "data", "models", "layers", "train", "evaluate", "visualize", "knn", "io", "cli", "summarize",
             "losses", "optimizers", "callbacks", "applications", "utils"]

# every CLI command (as typed after `imclass`) and the flags it had; more may be added
CLI = {
    "challenge": ["--challenges", "--data", "--json", "--limit", "--report", "--seed", "--shift", "--split", "--tta"],
    "compare": ["--budget", "--data", "--device", "--image-size", "--json", "--limit", "--max-epochs", "--models", "--out", "--seed"],
    "data check": ["--json", "--near-distance", "--show", "--tiny"],
    "data download": ["--data"],
    "data info": ["--data", "--image-size", "--json", "--split"],
    "data list": [],
    "data show": ["--data", "--image-size", "--out", "--per-class", "--seed", "--split"],
    "evaluate": ["--confusion", "--data", "--json", "--limit", "--report", "--split", "--tta"],
    "explain": ["--data", "--dataset", "--in", "--json", "--k", "--layer", "--limit", "--method", "--out", "--target", "--window"],
    "export": ["--check", "--format", "--json", "--out", "--tta"],
    "features": ["--amp", "--batch-size", "--cache", "--data", "--image-size", "--limit", "--out", "--split", "--weights", "--weights-dir"],
    "knn": ["--backend", "--batch-size", "--cv", "--data", "--dataset", "--folds", "--json", "--k", "--ks", "--limit", "--metric", "--neighbours-png", "--plot", "--seed", "--test-limit", "--train-limit", "--val-fraction", "--weights"],
    "models list": ["--json", "--pattern"],
    "models summary": ["--arithmetic", "--input-shape", "--option"],
    "predict": ["--backbone", "--batch-size", "--format", "--json", "--top", "--tta", "--weights", "--weights-dir"],
    "serve": ["--allowed-hosts", "--api-key", "--batching", "--body-timeout", "--header-timeout", "--host", "--max-batch", "--max-files", "--max-pixels", "--max-queue", "--max-upload-mb", "--max-wait-ms", "--port", "--threads", "--tta"],
    "similar": ["--amp", "--backbone", "--batch-size", "--cache", "--compare", "--image-size", "--in", "--json", "--pixel-size", "--report", "--weights", "--weights-dir"],
    "train": ["--augment", "--backbone", "--batch-norm", "--batch-size", "--class-weight", "--config", "--data", "--dataset", "--device", "--epochs", "--feature-augment", "--feature-cache", "--freeze-epochs", "--head", "--image-size", "--json", "--label-smoothing", "--limit", "--lr", "--model", "--model-option", "--momentum", "--nesterov", "--optimizer", "--out", "--pool-stages", "--recipe", "--resume", "--sampler", "--schedule", "--seed", "--target", "--unfreeze", "--val-fraction", "--warmup-epochs", "--weight-decay", "--weights", "--weights-dir"],
    "tune": ["--cv", "--data", "--dataset", "--device", "--epochs", "--final", "--heartbeat", "--json", "--limit", "--model", "--model-option", "--out", "--pruner", "--report", "--sampler", "--seed", "--space", "--storage", "--study", "--trials", "--val-fraction", "--workers"],
    "weights": ["--json", "--weights-dir"],
}


@pytest.mark.parametrize("path", sorted(PUBLIC))
def test_public_names_import(path):
    module = importlib.import_module(path)
    missing = [name for name in PUBLIC[path] if not hasattr(module, name)]
    assert missing == [], f"{path} lost {missing}"
    exec(f"from {path} import {', '.join(PUBLIC[path])}", {})  # the `from ... import` form too


def test_top_level_names():
    import imclass

    missing = [name for name in TOP_LEVEL if getattr(imclass, name, None) is None]
    assert missing == []
    assert set(TOP_LEVEL) <= set(dir(imclass))


def test_faces_hand_out_the_defining_objects():
    import imclass
    from imclass import applications, io, layers, models
    from imclass.model_file import format as model_file_format
    from imclass.model_file import save as model_file_save
    from imclass.models import applications as app_bodies
    from imclass.models import rebuild, sequential
    from imclass.nn import conv, core, symbolic
    from imclass.train.classifier import Classifier

    assert layers.Sequential is models.Sequential is imclass.Sequential is sequential.Sequential
    assert layers.Input is models.Input is symbolic.Input
    assert layers.Dense is core.Dense and layers.Conv2D is conv.Conv2D
    assert imclass.save is io.save is model_file_save.save
    assert imclass.load is io.load is rebuild.load
    assert io.ModelFileError is model_file_format.ModelFileError
    assert models.load_model is rebuild.load_model
    assert applications.ResNet50 is app_bodies.ResNet50
    assert imclass.Classifier is Classifier
    assert layers.KerasModel is models.Model.__mro__[1]  # the Keras methods both model classes share


def _documented_paths() -> list[str]:
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return sorted(set(re.findall(r"\bimclass(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)))


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_documented_dotted_names_resolve():
    paths = _documented_paths()
    assert "imclass.layers" in paths and "imclass.data.load" in paths  # the docs were read
    broken = []
    for dotted in paths:
        try:
            _resolve(dotted)
        except (ImportError, AttributeError) as err:
            broken.append(f"{dotted}: {err}")
    assert broken == []


def _commands() -> dict[str, object]:
    from imclass.cli import app

    found = {}

    def walk(command, prefix):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, [*prefix, name])
        else:
            found[" ".join(prefix)] = command

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_keeps_its_flags():
    commands = _commands()
    missing = sorted(set(CLI) - set(commands))
    assert missing == [], f"CLI commands gone: {missing}"
    lost = {}
    for name, flags in CLI.items():
        have = {opt for param in commands[name].params for opt in param.opts}
        if set(flags) - have:
            lost[name] = sorted(set(flags) - have)
    assert lost == {}


def test_every_command_answers_help():
    from imclass.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "train" in top.output
    for name in sorted(_commands()):
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0, f"imclass {name} --help: {result.output[-500:]}"
        assert "Usage:" in result.output


# one spelling for the data set (issue 23): the positional DATA; --dataset (and -d) stays as a hidden alias
DATA_POSITIONAL = ["compare", "evaluate", "knn", "train", "tune"]
DATASET_ALIAS = ["challenge", "compare", "evaluate", "explain", "knn", "train", "tune"]


def test_data_is_positional_and_dataset_a_hidden_alias():
    from imclass.cli import app

    commands = _commands()
    for name in DATA_POSITIONAL:
        metavars = [p.metavar for p in commands[name].params if p.param_type_name == "argument"]
        assert "DATA" in metavars, f"imclass {name}: no positional DATA"
    for name in DATASET_ALIAS:
        alias = [p for p in commands[name].params if "--dataset" in p.opts]
        assert len(alias) == 1 and alias[0].hidden, f"imclass {name}: --dataset is not a hidden alias"
        help_text = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=200).output
        assert "--dataset" not in help_text


def test_data_alias_and_positional_mean_the_same_and_conflict_loudly(tmp_path):
    from imclass.cli import app

    runner = CliRunner()
    twice = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "cifar10", "--dataset", "mnist"])
    assert twice.exit_code == 2 and "given twice" in twice.output
    missing = runner.invoke(app, ["compare", "--models", "knn-l1"])
    assert missing.exit_code == 2 and "expected DATA" in missing.output
    # the alias reaches the same code as the positional: both name the same missing model file
    by_alias = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--dataset", "cifar10"])
    positional = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "cifar10"])
    assert by_alias.exit_code == positional.exit_code != 0
    assert by_alias.output == positional.output and "run" in positional.output
