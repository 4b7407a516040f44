"""imclass tune: search spaces, a tiny Optuna study on real CIFAR-10 images, resume after a killed process,
the test split read only after the search, k-NN's k and metric."""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FixedTrial, TrialState
from PIL import Image
from typer.testing import CliRunner

import imclass
from imclass.cli import app
from imclass.tuning import search as tune_mod
from imclass.tuning.search import Param, TuneConfig, load_space, parse_space, suggest, tune

ROOT = Path(__file__).resolve().parent.parent
SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "momentum": {"type": "float", "low": 0.5, "high": 0.95, "when": {"optimizer": "sgd"}},
    "width": {"type": "int", "low": 8, "high": 32},
    "depth": 1,
}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_small):
    """A user's folder of real CIFAR-10 photos: 4 classes x 60 PNGs (the loader splits them 192 train / 48 test)."""
    x, y, _, _ = cifar_small
    root = tmp_path_factory.mktemp("photos") / "photos"
    for c, name in enumerate(["airplane", "automobile", "bird", "cat"]):
        (root / name).mkdir(parents=True)
        for i in torch.nonzero(y == c).flatten()[:60].tolist():
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(root / name / f"{i}.png")
    return root


def _states(study) -> dict[str, int]:
    return {s.name: sum(t.state == s for t in study.trials) for s in TrialState if any(t.state == s for t in study.trials)}


def test_search_space_from_dict_yaml_and_toml(tmp_path):
    space = parse_space(SPACE)
    assert space["lr"] == Param("lr", "float", 1e-3, 3e-2, log=True)
    assert space["depth"].type == "fixed" and space["depth"].value == 1
    (tmp_path / "s.yaml").write_text(
        "lr: {type: float, low: 0.001, high: 0.03, log: true}\n"
        "optimizer: {type: categorical, choices: [adam, sgd]}\n"
        "momentum: {type: float, low: 0.5, high: 0.95, when: {optimizer: sgd}}\n"
        "width: {type: int, low: 8, high: 32}\ndepth: 1\n")
    (tmp_path / "s.toml").write_text(
        'depth = 1\n[lr]\ntype = "float"\nlow = 0.001\nhigh = 0.03\nlog = true\n'
        '[optimizer]\ntype = "categorical"\nchoices = ["adam", "sgd"]\n'
        '[momentum]\ntype = "float"\nlow = 0.5\nhigh = 0.95\nwhen = {optimizer = "sgd"}\n'
        '[width]\ntype = "int"\nlow = 8\nhigh = 32\n')
    assert load_space(tmp_path / "s.yaml") == space
    assert {k: v for k, v in load_space(tmp_path / "s.toml").items()} == {k: space[k] for k in load_space(tmp_path / "s.toml")}
    # conditional: momentum only when sgd was drawn
    assert suggest(space, FixedTrial({"lr": 0.01, "optimizer": "adam", "width": 9})) == \
        {"lr": 0.01, "optimizer": "adam", "width": 9, "depth": 1}
    assert suggest(space, FixedTrial({"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "width": 9}))["momentum"] == 0.9
    # width/depth build the MLP's hidden layers; other names are model options, the rest training options
    model, options, train = tune_mod._split_params({"width": 16, "depth": 2, "dropout": 0.1, "lr": 0.1}, TuneConfig())
    assert (model, options, train) == ("mlp", {"dropout": 0.1, "hidden": [16, 16]}, {"lr": 0.1})


@pytest.mark.parametrize("spec, message", [
    ({"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "a log scale needs low > 0"),
    ({"lr": {"type": "float", "low": 1.0, "high": 0.1}}, "expected low <= high"),
    ({"lr": {"type": "float", "lo": 1e-3, "high": 0.1}}, r"unknown key\(s\) \['lo'\]"),
    ({"opt": {"type": "categorical", "choices": []}}, "non-empty list of choices"),
    ({"m": {"type": "float", "low": 0, "high": 1, "when": {"opt": "sgd"}}, "opt": "sgd"}, "listed before it"),
    ({"lr": {"type": "normal"}}, "expected type float, int or categorical"),
])
def test_bad_search_spaces_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_space(spec)


def test_tiny_search_writes_study_table_plots_and_never_reads_test_during_search(tmp_path, folder, monkeypatch,
                                                                               capsys):
    loads = []
    real_load = imclass.data.load
    out = tmp_path / "study"

    def counting_load(name, split="train", *args, **kwargs):
        finished = None
        if (out / "study.db").is_file():
            study = optuna.load_study(study_name="imclass-tune", storage=f"sqlite:///{out / 'study.db'}")
            finished = sum(t.state.is_finished() for t in study.trials)
        loads.append((split, finished))
        return real_load(name, split, *args, **kwargs)

    monkeypatch.setattr(imclass.data, "load", counting_load)
    cfg = TuneConfig(model="mlp", dataset=str(folder), epochs=2, trials=4, space=SPACE, out=str(out), device="cpu")
    result = tune(cfg)
    # the test split: read once, after all 4 trials had finished; the search only ever read the train split
    assert [s for s, _ in loads].count("test") == 1
    assert loads[-1] == ("test", 4) and all(s == "train" for s, _ in loads[:-1])

    study = optuna.load_study(study_name="imclass-tune", storage=f"sqlite:///{out / 'study.db'}")
    states = _states(study)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 4 and set(states) <= {"COMPLETE", "PRUNED"}
    best = study.best_trial
    assert result["best_trial"] == best.number and result["val_accuracy"] == pytest.approx(best.value)
    assert result["best_params"] == best.params
    assert 1e-3 <= best.params["lr"] <= 3e-2 and 8 <= best.params["width"] <= 32
    # the objective is the last epoch's accuracy on the images held out of the train split (stratified 0.2)
    from imclass.data.split import split_indices

    train = real_load(str(folder), "train")
    n_val = len(split_indices(train.labels, 0.2, seed=0)[1])
    assert n_val == 40 and best.value * n_val == pytest.approx(round(best.value * n_val))
    assert best.intermediate_values[2] == pytest.approx(best.value)

    saved = json.loads((out / "best.json").read_text())
    assert saved["best_params"] == best.params and saved["trials"] == {k.lower(): v for k, v in states.items()}
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["number", "state", "val_accuracy", "seconds"] and len(rows) == 5
    for name in ("history", "params"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 300
    # the best parameters retrained on all 192 training images, tested once on the 48 test images
    clf = imclass.load(out / "model.safetensors")
    test = real_load(str(folder), "test")
    assert result["test_images"] == 48
    assert clf.evaluate(test)["accuracy"] == pytest.approx(result["test_accuracy"])
    assert clf.model.imclass_spec["options"]["hidden"] == [best.params["width"]]
    # no silent phase: each trial has a progress line (start and end off a terminal) and a result line
    err = capsys.readouterr().err
    for trial in study.trials:
        assert f"trial {trial.number}: 2 epochs ..." in err
        outcome = (f"trial {trial.number}: validation accuracy {trial.value:.2%}" if trial.state == TrialState.COMPLETE
                   else f"trial {trial.number}: pruned")
        assert outcome in err
    assert "final retraining on the whole training split: 2 epochs in " in err


def test_pruning_callback_stops_training_and_raises_trial_pruned():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    cb = tune_mod.PruningCallback(trial, last_step=5)

    class State:
        epoch, logs, stop_training = 0, {"val_accuracy": 0.25}, False

    state = State()
    cb.on_epoch_end(state)
    assert state.stop_training and cb.pruned_at == 1
    with pytest.raises(optuna.TrialPruned, match="pruned at step 1 with val_accuracy 0.2500"):
        cb.raise_if_pruned()
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.25}
    state.logs = {"loss": 1.0}
    with pytest.raises(KeyError, match="val_accuracy"):
        cb.on_epoch_end(state)


def _tune_args(out: Path, folder: Path) -> list[str]:
    return ["tune", "--model", "mlp", "--dataset", str(folder), "--epochs", "2", "--trials", "6", "--pruner", "none", "--heartbeat", "1", "--device", "cpu",
            "--model-option", "hidden=[8]", "--no-final", "--out", str(out), "--json"]


def _complete_trials(db: Path) -> dict[int, float]:
    """Complete trials' numbers and values, read-only with sqlite3 (opening the study with Optuna while
    the tune process creates it would race it to create the tables)."""
    if not db.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            rows = con.execute("SELECT t.number, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id "
                               "WHERE t.state = 'COMPLETE'").fetchall()
    except sqlite3.Error:  # the tables are not there yet
        return {}
    return dict(rows)


def test_a_killed_study_resumes_with_the_same_command(tmp_path, folder):
    out = tmp_path / "study"
    args = _tune_args(out, folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "imclass", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    storage = f"sqlite:///{out / 'study.db'}"
    complete_before: dict[int, float] = {}
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            complete_before = _complete_trials(out / "study.db")
            if len(complete_before) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    assert 2 <= len(complete_before) < 6
    time.sleep(3.5)  # the killed trial's heartbeat (1 s) goes stale after 3 s

    result = CliRunner().invoke(app, args)  # the same command, again
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    study = optuna.load_study(study_name="imclass-tune", storage=storage)
    assert summary["trials"]["complete"] == 6 and sum(t.state == TrialState.COMPLETE for t in study.trials) == 6
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
    for number, value in complete_before.items():  # the finished trials were kept, not rerun
        assert study.trials[number].state == TrialState.COMPLETE and study.trials[number].value == value
    dump = "\n".join(str((r.number, r.state.name, r.params, r.system_attrs)) for r in study.trials)
    stale = [t for t in study.trials if t.state == TrialState.FAIL and "fail_reason" not in t.system_attrs]
    for t in stale:  # the trial the kill interrupted is failed once its heartbeat is stale, and retried
        retries = [r for r in study.trials if r.system_attrs.get("failed_trial") == t.number]
        # a kill mid-suggest leaves some of the parameters drawn: the retry keeps those and draws the rest
        assert retries and (t.params.items() <= retries[0].params.items() or retries[0].state == TrialState.WAITING), dump


def test_knn_k_and_metric_searched_with_cross_validation_and_two_workers(tmp_path, folder):
    out = tmp_path / "knn"
    cfg = TuneConfig(model="knn", dataset=str(folder), trials=4, cv=3,
                     space={"k": {"type": "int", "low": 1, "high": 9}, "metric": {"type": "categorical",
                                                                                 "choices": ["l1", "l2"]}},
                     out=str(out), workers=2, pruner="none")
    result = tune(cfg)
    study = optuna.load_study(study_name="imclass-tune", storage=cfg.storage_url)
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert 4 <= len(finished) <= 5  # the two workers stop once 4 are finished (one may be mid-trial then)
    assert result["selection"] == "3-fold cross-validation" and "worker_errors" not in result
    assert result["best_params"] == study.best_trial.params
    assert 1 <= result["best_params"]["k"] <= 9 and result["best_params"]["metric"] in ("l1", "l2")
    # the value is the mean accuracy over the 3 folds, recomputed here with the same folds and sklearn's
    from sklearn.model_selection import StratifiedKFold

    train = imclass.data.load(str(folder), split="train")
    y = train.labels.numpy()
    scores = []
    for tr, va in StratifiedKFold(3, shuffle=True, random_state=0).split(y, y):
        knn = imclass.KNN(**result["best_params"]).fit(train.images[tr], train.labels[tr])
        scores.append(knn.score(train.images[va], train.labels[va]))
    assert result["val_accuracy"] == pytest.approx(sum(scores) / 3)
    knn = imclass.load(out / "model.safetensors")
    assert (knn.k, knn.metric) == (result["best_params"]["k"], result["best_params"]["metric"])
    test = imclass.data.load(str(folder), split="test")
    assert knn.score(test.images, test.labels) == pytest.approx(result["test_accuracy"])


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["tune", "--pruner", "bogus", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error: expected pruner in ['median', 'hyperband', 'none'], received 'bogus'" \
        in result.output
    result = runner.invoke(app, ["tune", "--space", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and f"error: search space file {tmp_path / 'missing.yaml'} not found" in result.output
    (tmp_path / "bad.yaml").write_text("lr: {type: float, low: 0.1}\n")
    result = runner.invoke(app, ["tune", "--space", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "expected low and high for type float" in result.output
    assert "Traceback" not in result.output


def test_a_trial_left_running_without_a_heartbeat_is_failed_and_retried(tmp_path):
    """A process killed between creating a trial and its first heartbeat leaves a RUNNING trial that Optuna's
    stale check never sees; fail_orphaned_trials fails it once it is older than the grace period and retries it."""
    import warnings

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from imclass.tuning.search import fail_orphaned_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=2,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    assert fail_orphaned_trials(study, grace=60) == []  # younger than the grace period: left alone
    assert study.trials[orphan.number].state == TrialState.RUNNING
    assert fail_orphaned_trials(study, grace=0) == [orphan.number]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # failed, and its parameters queued again
    assert study.trials[1].params == study.trials[0].params


def test_parameter_plot_ticks_are_readable_and_few_trial_importances_say_so():
    """The slice plot: at most 4 labelled x ticks per parameter, all inside a narrow log range, whole numbers
    for integer parameters and for the trial colour bar; importances from 3 trials carry a caveat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 3e-4, 6e-4, log=True) * 100 + t.suggest_int("width", 91, 103) / 1e3,
                   n_trials=3)
    axes = ovm.plot_slice(study).ravel().tolist()
    fig = axes[0].figure
    tune_mod._readable_slices(fig, axes, study)
    fig.canvas.draw()
    for ax in axes:
        lo, hi = ax.get_xlim()
        labels = [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels()
                  if t.get_text() and lo <= t.get_position()[0] <= hi]  # the ones drawn
        assert 2 <= len(labels) <= 4, (ax.get_xlabel(), labels)
        assert not any(t.get_text() for t in ax.get_xminorticklabels())
        if ax.get_xlabel() == "width":
            assert all(text.isdigit() for _, text in labels)
    bar = [ax for ax in fig.axes if ax not in axes][0]
    assert all(float(t).is_integer() for t in bar.get_yticks())
    assert "3 trials" in fig._suptitle.get_text()
    plt.close(fig)
    ax = ovm.plot_param_importances(study)
    tune_mod._importance_caveat(ax, study)
    assert "3 complete trials" in ax.get_title(loc="left") and "rough guess" in ax.get_title(loc="left")
    plt.close(ax.figure)
