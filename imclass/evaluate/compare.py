"""The course in one command: train and test every approach on the same split, each within one
time budget, and rank them (accuracy, training time, inference images/s, parameters).

    board = compare("cifar10", ["knn-l1", "knn-l2", "mlp", "keras_cnn", "resnet20", "fastnet"],
                    budget=600, out="runs/compare", limit=10_000)

Neural approaches train through the one engine (``imclass.workflows.training.train_from_config``, or
``imclass.transfer.fine_tune`` for ``transfer:NAME``) with a :class:`~imclass.train.TimeBudget`
callback that stops training when the budget is spent; a k-NN "trains" by storing the images.
Every approach writes its run folder ``out/runs/<name>/`` (``imclass.load`` it, or pass it to
``imclass challenge``) and, once tested, ``out/entries/<name>.json``. A comparison that is killed
and started again keeps the finished entries (same data, limit, budget and seed) and trains the rest.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from imclass import data as imdata, models
from imclass.data.catalog import scratch_image_size
from imclass.knn import KNN
from imclass.model_file.save import save
from imclass.models.rebuild import load
from imclass.train import TimeBudget
from imclass.transfer import fine_tune, transfer
from imclass.transfer.workflow import load_for
from imclass.visualize.plots import pyplot, save_figure
from imclass.workflows.training import RunConfig, train_from_config

__all__ = ["KNN_METRICS", "compare", "parse_budget", "parse_models"]

KNN_METRICS = ("l1", "l2", "cosine")
NO_AUGMENT = ("mlp",)  # models trained on plain images (a flip/crop of a flattened image only adds noise)
LEADERBOARD_JSON, LEADERBOARD_MD, PLOT = "leaderboard.json", "leaderboard.md", "accuracy_vs_time.png"


def parse_budget(text: str | float | int) -> float:
    """``"10m"`` -> 600.0, ``"90s"`` / ``"90"`` -> 90.0, ``"1h"`` -> 3600.0, ``"1m30s"`` -> 90.0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or parts is None or not any(parts.groups()):
            raise ValueError(f"expected a time budget such as 10m, 90s or 1h, received {text!r}")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if not seconds > 0:
        raise ValueError(f"expected a time budget > 0, received {text!r}")
    return seconds


def parse_models(spec: str | Sequence[str]) -> list[str]:
    """``"knn-l1,mlp,transfer:mobilenetv2_100"`` -> checked names (``knn-<metric>``, a registry
    model, ``fastnet`` = the fast recipe, ``transfer:<backbone>``)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError("expected at least one approach in --models, e.g. knn-l1,mlp,keras_cnn")
    known = set(models.names())
    for n in names:
        if n.startswith("knn-"):
            if n[4:] not in KNN_METRICS:
                raise ValueError(f"unknown k-NN approach {n!r}: expected knn-l1, knn-l2 or knn-cosine")
        elif n.startswith("transfer:"):
            if not n[len("transfer:"):]:
                raise ValueError("expected transfer:<backbone>, e.g. transfer:mobilenetv2_100")
        elif n not in known:
            raise ValueError(f"unknown approach {n!r}: expected knn-l1, knn-l2, fastnet, transfer:<backbone> or a model "
                             "of `imclass models list`")
    if len(set(names)) != len(names):
        raise ValueError(f"expected each approach once, received {names}")
    return names


def _folder_name(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a killed run never leaves half an entry


VAL_FRACTION = 0.1  # a transfer entry picks head or fine-tuned weights on this held-out part of its training images
# (transfer entries read the same files at their backbone's own size and crop)


def _load_split(data: str, root: Any, image_size: int | None, limit: int | None, seed: int = 0,
                mode: str | None = None):
    """The train and test splits every approach uses (as ``train_from_config`` loads them), a folder's in the
    tier ``mode`` (memory or cache: a k-NN entry reads every image; None: chosen and said on stderr)."""
    # --limit: a seeded, stratified sample of each split, as every command takes it (seed 0, as train's default)
    train = imdata.load(data, split="train", root=root, image_size=image_size, limit=limit, seed=seed, mode=mode)
    test = imdata.load(data, split="test", root=root, image_size=image_size, limit=limit, seed=seed, mode=mode)
    return train, test


def _speed(predict: Callable[[torch.Tensor], Any], images: torch.Tensor) -> float:
    """Inference images per second over the test images (after one small warm-up batch)."""
    predict(images[:32])
    start = time.perf_counter()
    predict(images)
    return len(images) / max(time.perf_counter() - start, 1e-9)


def _run_knn(name: str, train, test, folder: Path) -> dict[str, Any]:
    start = time.perf_counter()
    knn = KNN(k=1, metric=name[4:]).fit(train.images, train.labels)
    seconds = time.perf_counter() - start
    accuracy = knn.score(test.images, test.labels)
    model_file = save(knn, folder, classes=train.classes)
    return {"kind": "knn", "accuracy": accuracy, "train_seconds": seconds,
            "images_per_second": _speed(knn.predict, test.images), "parameters": 0,
            "stored_values": int(train.images[0].numel() * len(train)), "epochs": 0, "model_file": str(model_file)}


def _run_engine(name: str, data: str, folder: Path, budget: float, *, root: Any, image_size: int | None,
                limit: int | None, seed: int, max_epochs: int, verbose: bool, device: str,
                mode: str | None = None) -> dict[str, Any]:
    fast = name == "fastnet"
    cfg = RunConfig(model=None if fast else name, recipe="fast" if fast else None, dataset=data, data_root=root,
                    image_size=image_size, limit=limit, epochs=None if fast else max_epochs,
                    batch_size=None if fast else 64, augment="none" if name in NO_AUGMENT else "crop_flip",
                    seed=seed, out=str(folder), device=device, verbose=verbose, budget=budget, data_mode=mode)
    start = time.perf_counter()
    result = train_from_config(cfg)
    wall = time.perf_counter() - start
    clf = load(result["model_file"])
    test_images = _load_split(data, root, image_size, limit, seed, mode)[1].images
    tta = None if result.get("tta") in (None, "none") else result["tta"]
    return {"kind": "fast recipe" if fast else "classifier", "accuracy": result["accuracy"],
            "train_seconds": _train_seconds(folder, result["seconds"]), "wall_seconds": wall,
            "images_per_second": _speed(lambda x: clf.predict(x, tta=tta), test_images),
            "parameters": sum(p.numel() for p in clf.model.parameters()), "epochs": _epochs_done(folder),
            "planned_epochs": result["epochs"], "tta": result.get("tta", "none"), "model_file": result["model_file"]}


def _run_transfer(name: str, train, test, folder: Path, budget: float, *, seed: int, max_epochs: int,
                  verbose: bool, data: str = "", root: Any = None, limit: int | None = None,
                  mode: str | None = None) -> dict[str, Any]:
    backbone = name[len("transfer:"):]
    model = transfer(backbone, num_classes=train.num_classes, weights="imagenet")
    if data and Path(data).expanduser().is_dir():  # photos: the same files, read as the backbone wants them
        pre = model.preprocessing
        train = load_for(data, pre, split="train", root=root, seed=seed, limit=limit, mode=mode)
        test = load_for(data, pre, split="test", root=root, seed=seed, limit=limit, mode=mode)
    # the budget covers everything: features and head first; fine-tuning gets what is left (none: the head
    # stands), and it replaces the head only when it does better on a held-out tenth of the training images
    start = time.perf_counter()
    smallest = min(c for c in torch.bincount(train.labels, minlength=len(train.classes)).tolist() if c)
    held = VAL_FRACTION if round(VAL_FRACTION * smallest) >= 1 else None  # every class must hold one image out
    common = dict(classes=train.classes, seed=seed, verbose=verbose, validation=held)
    head = fine_tune(model, train, epochs=0, freeze_epochs=max_epochs, **common)
    clf, timer_stopped = head.classifier, True
    left = budget - (time.perf_counter() - start)
    if left > 0:
        head_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        timer = TimeBudget(left)
        fine = fine_tune(model, train, epochs=max(1, max_epochs // 4), freeze_epochs=0, callbacks=[timer], **common)
        timer_stopped = timer.stopped
        if held is None or (fine.val_accuracy or 0.0) >= (head.val_accuracy or 0.0):
            clf = fine.classifier
        else:
            model.load_state_dict(head_state)  # fine-tuning cut short by the budget did worse: keep the head
    seconds = time.perf_counter() - start
    accuracy = clf.evaluate(test)["accuracy"]
    model_file = save(clf, folder)
    return {"kind": "transfer", "accuracy": accuracy, "train_seconds": seconds,
            "images_per_second": _speed(clf.predict, test.images),
            "parameters": sum(p.numel() for p in clf.model.parameters()), "epochs": None,
            "wall_seconds": seconds, "budget_stopped": timer_stopped, "model_file": str(model_file)}


def _stopped(figures: dict[str, Any]) -> bool:
    """Whether the budget ended training: fewer epochs than planned (a k-NN never trains)."""
    if "budget_stopped" in figures:
        return bool(figures.pop("budget_stopped"))
    planned = figures.get("planned_epochs")
    return planned is not None and figures["epochs"] < planned


def _train_seconds(folder: Path, fallback: float) -> float:
    """Training time as the engine logged it (the ``seconds`` column of history.csv, summed)."""
    rows = _history(folder)
    return sum(float(r["seconds"]) for r in rows) if rows and "seconds" in rows[0] else fallback


def _epochs_done(folder: Path) -> int:
    return len(_history(folder))


def _history(folder: Path) -> list[dict[str, str]]:
    import csv

    path = folder / "history.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def compare(
    data: str,
    models: str | Sequence[str],
    budget: str | float,
    out: str | os.PathLike,
    *,
    limit: int | None = None,
    root: Any = None,
    image_size: int | None = None,
    seed: int = 0,
    max_epochs: int = 30,
    device: str = "auto",
    verbose: bool = False,
    log: Callable[[str], None] | None = print,
    mode: str | None = None,
) -> dict[str, Any]:
    """Train and test every approach of ``models`` on the same split of ``data``, each within ``budget``
    (seconds or ``"10m"``); returns the leaderboard (also written to ``out`` as JSON, Markdown and a PNG).

    Finished entries already in ``out/entries/`` for the same data, limit, image size, budget and
    seed are kept, not retrained (a killed comparison resumes); ``max_epochs`` caps an approach that
    would finish before the budget. ``mode``: the tier a folder's images are read in by every entry
    (``imclass.data.source``: memory or cache; None: chosen from the headers and said on stderr).
    """
    if mode not in (None, "memory", "cache"):
        raise ValueError(f"compare reads a folder in the memory or cache tier (a k-NN entry holds every image), "
                         f"received --data-mode {mode}")
    names = parse_models(models)
    seconds = parse_budget(budget)
    if limit is not None and limit < 1:
        raise ValueError(f"expected limit >= 1, received limit={limit}")
    out = Path(out)
    (out / "entries").mkdir(parents=True, exist_ok=True)
    image_size = scratch_image_size(data, image_size)  # photos of mixed sizes: pixels at 32 x 32
    setup = {"data": str(data), "limit": limit, "image_size": image_size, "budget_seconds": seconds, "seed": seed}
    say = log or (lambda _msg: None)
    train, test = _load_split(data, root, image_size, limit, seed, mode)
    entries = []
    for name in names:
        entry_file = out / "entries" / f"{_folder_name(name)}.json"
        if entry_file.is_file():
            kept = json.loads(entry_file.read_text())
            if kept.get("setup") == setup:
                say(f"{name}: kept from an earlier run ({entry_file})")
                entries.append(kept)
                continue
            say(f"{name}: {entry_file} was made with other settings; training again")
        say(f"{name}: training (budget {seconds:g} s)")
        folder = out / "runs" / _folder_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        if name.startswith("knn-"):
            figures = _run_knn(name, train, test, folder)
        elif name.startswith("transfer:"):
            figures = _run_transfer(name, train, test, folder, seconds, seed=seed, max_epochs=max_epochs, verbose=verbose,
                                    data=data, root=root, limit=limit, mode=mode)
        else:
            figures = _run_engine(name, data, folder, seconds, root=root, image_size=image_size, limit=limit, seed=seed,
                                  max_epochs=max_epochs, verbose=verbose, device=device, mode=mode)
        entry = {"name": name, **figures, "run": str(folder), "stopped_by_budget": _stopped(figures), "setup": setup}
        _write_json(entry_file, entry)
        say(f"{name}: accuracy {entry['accuracy']:.4f} in {entry['train_seconds']:.1f} s")
        entries.append(entry)
    board = {**setup, "train_images": len(train), "test_images": len(test), "classes": train.classes,
             "entries": sorted(entries, key=lambda e: -e["accuracy"])}
    _write_json(out / LEADERBOARD_JSON, board)
    (out / LEADERBOARD_MD).write_text(leaderboard_table(board) + "\n")
    _plot(board, out / PLOT)
    return board


def leaderboard_table(board: dict[str, Any]) -> str:
    """The leaderboard as a Markdown table (best accuracy first)."""
    lines = ["| rank | approach | accuracy | training s | inference images/s | parameters | epochs | budget spent |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for i, e in enumerate(board["entries"], 1):
        params = f"{e['parameters']:,}" if e["kind"] != "knn" else f"0 (stores {e['stored_values']:,} pixels)"
        epochs = e["epochs"] if e.get("epochs") is not None else "-"
        lines.append(f"| {i} | {e['name']} | {e['accuracy']:.4f} | {e['train_seconds']:.1f} | "
                     f"{e['images_per_second']:,.0f} | {params} | {epochs} | {'yes' if e['stopped_by_budget'] else 'no'} |")
    return "\n".join(lines)


def _plot(board: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for e in board["entries"]:
        t = max(e["train_seconds"], 1e-2)
        ax.scatter([t], [e["accuracy"]], s=40)
        ax.annotate(e["name"], (t, e["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.axvline(board["budget_seconds"], color="tab:red", ls="--", lw=1, label=f"budget {board['budget_seconds']:g} s")
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{Path(board['data']).name}: {board['train_images']:,} train / {board['test_images']:,} test images")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)
