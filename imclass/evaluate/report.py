"""The evaluation report: one self-contained HTML page, its PNGs and a JSON of every number.

``report(model, data, out)`` scores a data set in batches (a progress bar; only the (N, C) scores are
kept), then writes ``out/report.json``, ``out/report.html`` (every picture embedded as base64: it opens
offline) and the PNGs: confusion matrix, per-class precision / recall / F1, reliability diagram before
and after temperature scaling, the most confident mistakes, the least confident correct images, and the
run's training curves when a ``history.csv`` is known, and, for a model ``imclass tune`` retrained (its
folder holds ``best.json``), the tuning section: best parameters, the top trials and the study's plots.
Works for every model kind a model file holds: a ``Classifier`` (any network) and a ``KNN`` (vote shares
as probabilities; no temperature).
"""
from __future__ import annotations

import base64
import csv
import html
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imclass.data.arrays import as_images, as_labels
from imclass.evaluate.metrics import (
    classification_metrics,
    fit_temperature,
    nll,
    reliability_bins,
)
from imclass.data.source import inference_batch_size
from imclass.evaluate.tune_folder import PLOTS, read_tuning, tuning_folder
from imclass.models.rebuild import load
from imclass.visualize.grids import save_captioned_grid
from imclass.visualize.plots import pyplot, save_figure
from imclass.visualize.training import save_confusion_matrix

# Deferred imports (inside functions), for start-up time: tqdm.auto
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["report", "score", "tuning_folder", "HTML_NAME", "JSON_NAME"]

HTML_NAME = "report.html"
JSON_NAME = "report.json"


def score(model: Any, images: torch.Tensor, *, batch_size: int | None = None, tta: str | None = None,
          progress: bool = True, desc: str = "evaluate") -> tuple[torch.Tensor | None, torch.Tensor]:
    """Logits (``None`` for a k-NN) and class probabilities (N, C), float32 on the CPU, of uint8 images,
    ``batch_size`` at a time with a tqdm bar. ``tta``: a name of ``imclass.tta`` or ``None``/"none"."""
    from tqdm.auto import tqdm

    if batch_size is None:
        batch_size = inference_batch_size(images.shape[1:])
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, received {batch_size}")
    tta = None if tta in (None, "none") else tta
    knn = not hasattr(model, "predict_logits")
    if knn and not hasattr(model, "predict_proba"):
        raise TypeError(f"expected a Classifier or a KNN (what imclass.load returns), received {type(model).__name__}")
    if knn and tta is not None:
        raise ValueError("test-time augmentation applies to neural networks; a k-NN model predicts each image as it is")
    logits, probs = [], []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=None if progress else True, leave=False, file=sys.stderr)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        if knn:
            probs.append(_knn_probs(model, chunk))
        else:
            out = model.predict_logits(chunk, batch_size=batch_size, tta=tta).float().cpu()
            logits.append(out)
            probs.append(torch.cat([1 - out.sigmoid(), out.sigmoid()], 1) if out.shape[1] == 1 else out.softmax(1))
        bar.update(len(chunk))
    bar.close()
    if not probs:
        raise ValueError("expected at least one image to evaluate, received none")
    return (None if knn else torch.cat(logits)), torch.cat(probs)


def _knn_probs(knn: Any, images: torch.Tensor) -> torch.Tensor:
    """Vote shares in the columns of every class 0..max label (a KNN's own columns follow ``classes_``)."""
    shares = knn.predict_proba(images).float()
    labels = torch.as_tensor(knn.classes_).long()
    n = max(len(getattr(knn, "class_names", None) or []), int(labels.max()) + 1)
    full = torch.zeros(len(shares), n)
    full[:, labels] = shares
    return full


def _as_pair(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    if hasattr(data, "images") and hasattr(data, "labels"):
        return data.images, data.labels, list(getattr(data, "classes", None) or []) or None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images = as_images(data[0])
        return images, as_labels(data[1], len(images), name=f"{name} labels"), None
    raise TypeError(f"expected {name} as an ImageDataset or (images, labels), received {type(data).__name__}")


def report(
    model: Any,
    data: Any,
    out: str | os.PathLike,
    *,
    val: Any = None,
    classes: Sequence[str] | None = None,
    tta: str | None = None,
    history: str | os.PathLike | None = None,
    batch_size: int | None = None,
    n_bins: int = 15,
    n_examples: int = 24,
    title: str | None = None,
    tuning: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on labelled ``data`` and write the report into the folder ``out``.

    ``model``: a ``Classifier`` or ``KNN`` (``imclass.load(run)``), or a run folder / model file (its
    ``history.csv`` then gives the training curves). ``data``: an ``ImageDataset`` or ``(images, labels)``.
    ``tta``: a name of ``imclass.tta``, "none", or ``None`` for the one the model file records
    (the figure ``imclass evaluate`` prints). ``val``: labelled validation data to fit the temperature on; when absent the temperature is fitted
    on a seeded half of ``data`` and the ECE before/after is measured on the other half (the JSON says
    which). ``tuning``: the out folder of ``imclass tune`` the model came from (``best.json``,
    ``trials.csv``, the plots); found by itself when ``model`` is such a folder or its model file
    (:func:`tuning_folder`). It adds the tuning section: the best parameters, the top 10 trials by
    validation accuracy and the study's plots, copied next to ``report.html`` as ``tune_*.png``.
    Returns the JSON's dict: ``accuracy``, ``top5_accuracy``, ``loss``, ``per_class``
    (precision, recall, f1, support), ``confusion_matrix`` (+ ``_normalised``), ``ece``,
    ``calibration``, ``temperature``, ``examples``, ``tuning`` (``None`` without a tune) and ``files``.
    """
    if isinstance(model, (str, os.PathLike)):
        run = Path(model)
        if history is None and (run / "history.csv").is_file():
            history = run / "history.csv"
        if tuning is None:
            tuning = tuning_folder(run)
        title = title or run.name
        model = load(run)
    images, labels, data_classes = _as_pair(data, "data")
    classes = list(classes or getattr(model, "classes", None) or data_classes or [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    if tta is None:
        tta = getattr(model, "tta", None) or "none"  # what the model file records, as `imclass evaluate`
    logits, probs = score(model, images, batch_size=batch_size, tta=tta, progress=progress)
    n_classes = max(probs.shape[1], int(labels.max()) + 1)
    if probs.shape[1] < n_classes:  # a k-NN that never saw the highest classes
        probs = torch.cat([probs, probs.new_zeros(len(probs), n_classes - probs.shape[1])], 1)
    if not classes:
        classes = [str(i) for i in range(n_classes)]
    if len(classes) != n_classes:
        raise ValueError(f"the model knows {len(classes)} classes but the data has labels up to {n_classes - 1}")

    numbers = classification_metrics(probs, labels, classes)
    pred = probs.argmax(1)
    if logits is not None and logits.shape[1] > 1:
        pred = logits.argmax(1)  # exactly the prediction `imclass evaluate` counts
        numbers["accuracy"] = float((pred == labels).double().mean())
        numbers["loss"] = nll(logits, labels)
    else:
        numbers["loss"] = None
    cal = reliability_bins(probs, labels, n_bins)
    numbers["ece"] = cal["ece"]
    numbers["calibration"] = cal
    numbers["temperature"] = _temperature(model, logits, labels, val, n_bins, batch_size, tta, seed, progress)
    numbers.update({"model": type(model).__name__, "tta": tta or "none", "classes": classes, "title": title or ""})

    files: dict[str, str] = {}
    files["confusion"] = _plot_confusion(numbers, out / "confusion.png")
    files["per_class"] = _plot_per_class(numbers, out / "per_class.png")
    files["reliability"] = _plot_reliability(numbers, probs, logits, labels, n_bins, out / "reliability.png")
    conf = probs.max(1).values
    numbers["examples"] = {}
    paths = getattr(data, "paths", None)  # the image files, when the data came from a folder
    given_loss = -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log()
    for key, picked, caption in _examples(conf, pred, labels, n_examples):
        if picked:
            texts = [f"{_short(paths[i]) if paths else '#' + str(i)}\n{classes[labels[i]]}\u2192{classes[pred[i]]}\n"
                     f"p {conf[i]:.2f}, loss {given_loss[i]:.2f}" for i in picked]
            colors = ["tab:red" if pred[i] != labels[i] else "tab:green" for i in picked]
            files[key] = save_captioned_grid([images[i] for i in picked], texts, out / f"{key}.png", cols=6,
                                             title=caption, caption_colors=colors, tile_inches=1.9).name
        numbers["examples"][key] = [
            {"index": int(i), "path": paths[i] if paths else None, "true": classes[labels[i]],
             "predicted": classes[pred[i]], "confidence": float(conf[i]), "loss": float(given_loss[i])}
            for i in picked
        ]
    if history is not None and Path(history).is_file():
        curves = _plot_history(Path(history), out / "training_curves.png")
        if curves:
            files["training_curves"] = curves
    numbers["tuning"] = None
    if tuning is not None:
        numbers["tuning"], plots = read_tuning(Path(tuning), out)
        files.update(plots)
    files = {k: Path(v).name for k, v in files.items()}
    numbers["files"] = {**files, "html": HTML_NAME, "json": JSON_NAME}
    (out / JSON_NAME).write_text(json.dumps(numbers, indent=1, default=float) + "\n")
    (out / HTML_NAME).write_text(_html(numbers, out))
    return numbers


# ---------------------------------------------------------------------------------------------
# the tuning section (a model `imclass tune` retrained on the best parameters)


# ---------------------------------------------------------------------------------------------
# temperature scaling

def _temperature(model, logits, labels, val, n_bins, batch_size, tta, seed, progress) -> dict[str, Any]:
    if logits is None or logits.shape[1] < 2:
        why = "a k-NN has vote shares, not logits" if logits is None else "one sigmoid output"
        return {"temperature": None, "fitted_on": None, "note": f"temperature scaling does not apply: {why}"}
    if val is not None:
        v_images, v_labels, _ = _as_pair(val, "val")
        v_logits, _ = score(model, v_images, batch_size=batch_size, tta=tta, progress=progress, desc="validation")
        fitted_on, t = f"validation data ({len(v_labels):,} images)", fit_temperature(v_logits, v_labels)
        test_logits, test_labels = logits, labels
    else:
        if len(labels) < 2:
            return {"temperature": None, "fitted_on": None, "note": "too few images to hold half out"}
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        fit_idx, test_idx = order[: len(order) // 2], order[len(order) // 2 :]
        fitted_on = f"a seeded half of the evaluated data ({len(fit_idx):,} images; no validation data given)"
        t = fit_temperature(logits[fit_idx], labels[fit_idx])
        test_logits, test_labels = logits[test_idx], labels[test_idx]
    before = reliability_bins(test_logits.softmax(1), test_labels, n_bins)["ece"]
    after = reliability_bins((test_logits / t).softmax(1), test_labels, n_bins)["ece"]
    return {
        "temperature": t, "fitted_on": fitted_on, "measured_on_images": len(test_labels),
        "ece_before": before, "ece_after": after,
        "nll_before": nll(test_logits, test_labels), "nll_after": nll(test_logits, test_labels, t),
    }


def _short(path: str, width: int = 24) -> str:
    """A file path that fits under a picture: its end (the file name and the folders just above it)."""
    return path if len(path) <= width else "\u2026" + path[-(width - 1):]


def _examples(conf: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, n: int):
    wrong = torch.nonzero(pred != labels).flatten()
    right = torch.nonzero(pred == labels).flatten()
    worst = wrong[conf[wrong].argsort(descending=True, stable=True)][:n].tolist()
    unsure = right[conf[right].argsort(stable=True)][:n].tolist()
    return [("confident_mistakes", worst, "most confident mistakes (file; given \u2192 predicted; p = confidence, "
                                          "loss = -log p(given))"),
            ("unsure_correct", unsure, "least confident correct (file; given \u2192 predicted; p = confidence, "
                                       "loss = -log p(given))")]


# ---------------------------------------------------------------------------------------------
# pictures (matplotlib)

def _save(fig, path: Path) -> str:
    return save_figure(fig, path).name


def _plot_confusion(numbers: dict, path: Path) -> str:
    return save_confusion_matrix(numbers["confusion_matrix"], numbers["classes"], path).name


def _plot_per_class(numbers: dict, path: Path) -> str:
    plt = pyplot()
    classes = numbers["classes"]
    per = numbers["per_class"]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) + 2), 3.6), dpi=100)
    for k, (key, color) in enumerate([("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green")]):
        ax.bar(x + (k - 1) * 0.27, [per[n][key] for n in classes], 0.27, label=key, color=color)
    ax.set_xticks(x, list(classes), rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("per-class precision, recall and F1", pad=22)
    ax.legend(ncol=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above, off the bars
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _plot_reliability(numbers: dict, probs, logits, labels, n_bins: int, path: Path) -> str:
    plt = pyplot()
    panels = [("as predicted", numbers["calibration"])]
    t = numbers["temperature"].get("temperature")
    if t is not None:
        scaled = reliability_bins((logits / t).softmax(1), labels, n_bins)
        numbers["temperature"]["ece_after_all_images"] = scaled["ece"]  # the right panel's figure
        panels.append((f"temperature {t:.3g} (all images)", scaled))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), dpi=100, squeeze=False)
    for ax, (name, cal) in zip(axes.flat, panels):
        edges = np.asarray(cal["edges"])
        acc = np.array([np.nan if v is None else v for v in cal["accuracy"]])
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", edgecolor="black", color="tab:blue",
               label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy in the bin")
        ax.set_title(f"{name}: ECE {cal['ece']:.4f}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _plot_history(path: Path, out: Path) -> str | None:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "epoch" not in rows[0]:
        return None

    def column(name: str) -> list[float] | None:
        try:
            vals = [float(r[name]) for r in rows if r.get(name) not in (None, "")]
        except ValueError:
            return None
        return vals if len(vals) == len(rows) else None

    epochs = column("epoch") or list(range(1, len(rows) + 1))
    losses = {k: column(k) for k in ("loss", "val_loss") if column(k)}
    accs = {k: column(k) for k in ("accuracy", "val_accuracy") if column(k)}
    if not losses and not accs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, series, name in ((axes[0], losses, "loss"), (axes[1], accs, "accuracy")):
        for label, ys in series.items():
            ax.plot(epochs, ys, marker="o" if len(ys) < 40 else None, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(f"training curves ({path.parent.name}/history.csv)", fontsize=10)
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# the HTML page: every number carries data-key, the path of its value in the JSON (keys joined by '/')

def _num(value: Any, key: str, digits: int = 4) -> str:
    text = "n/a" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}")
    return f'<span class="num" data-key="{html.escape(key)}">{text}</span>'


def _img(out: Path, name: str | None, alt: str) -> str:
    if not name:
        return ""
    data = base64.b64encode((out / name).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _param(name: str, value: Any) -> str:
    """A parameter's value in a cell: ``data-param`` names it, ``data-value`` holds its exact JSON."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return (f'<td data-param="{html.escape(name)}" data-value="{html.escape(json.dumps(value))}">'
            f"{html.escape(text)}</td>")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _tuning_html(t: dict | None, files: dict, out: Path) -> str:
    if not t:
        return ""
    e = html.escape
    best = t.get("best_params") or {}
    best_rows = "".join(f"<tr><th>{e(k)}</th>{_param(k, v)}</tr>" for k, v in best.items())
    names = sorted({k for trial in t["top_trials"] for k in trial["params"]})
    head = "".join(f"<th>{e(k)}</th>" for k in ("trial", "state", "validation accuracy", "seconds", *names))
    body = "".join(
        f"<tr><td>{trial['number']}</td><td>{e(trial['state'])}</td>"
        f"<td>{_num(trial['val_accuracy'], f'tuning/top_trials/{i}/val_accuracy')}</td>"
        f"<td>{_seconds(trial['seconds'])}</td>"
        + "".join(_param(k, trial["params"][k]) if k in trial["params"] else "<td></td>" for k in names) + "</tr>"
        for i, trial in enumerate(t["top_trials"])
    )
    counts = ", ".join(f"{v} {k}" for k, v in (t.get("trials") or {}).items())
    test = (f", test accuracy {_num(t['test_accuracy'], 'tuning/test_accuracy')} after retraining on the whole "
            "training split" if t.get("test_accuracy") is not None else "")
    plots = "".join(_img(out, files.get(f"tune_{k}"), caption) for k, caption in PLOTS.items())
    return f"""<section id="tuning"><h2>Tuning</h2>
<p>This model is the best of an <code>imclass tune</code> study ({e(str(t.get('model')))} on {e(str(t.get('dataset')))};
trials: {e(counts or 'none')}; selection on {e(str(t.get('selection')))}): best trial {e(str(t.get('best_trial')))},
validation accuracy {_num(t.get('val_accuracy'), 'tuning/val_accuracy')}{test}. Study folder: <code>{e(t['folder'])}</code>.</p>
<h3>Best parameters</h3><table id="tuning-best">{best_rows}</table>
<h3>Top {len(t['top_trials'])} of {t['trials_listed']} trials by validation accuracy</h3>
<table id="tuning-trials"><tr>{head}</tr>{body}</table>
{plots}
</section>"""


def _html(n: dict, out: Path) -> str:
    e = html.escape
    files = n["files"]
    classes = n["classes"]
    k = n["top_k"]
    t = n["temperature"]
    summary = [
        ("accuracy", "accuracy", n["accuracy"]),
        *([(f"top-{k} accuracy", f"top{k}_accuracy", n[f"top{k}_accuracy"])] if k < len(classes) else []),  # 5 of 5: 100 %
        ("macro F1", "macro_f1", n["macro_f1"]), ("loss (NLL)", "loss", n["loss"]), ("ECE", "ece", n["ece"]),
        ("images", "images", n["images"]),
    ]
    rows = "".join(f"<tr><th>{e(label)}</th><td>{_num(v, key)}</td></tr>" for label, key, v in summary)
    if t.get("temperature") is not None:
        temp = (f"<p>Temperature {_num(t['temperature'], 'temperature/temperature')} fitted on {e(t['fitted_on'])} "
                f"(NLL, L-BFGS). On {t['measured_on_images']:,} held-out images: ECE "
                f"{_num(t['ece_before'], 'temperature/ece_before')} before, {_num(t['ece_after'], 'temperature/ece_after')} after; "
                f"NLL {_num(t['nll_before'], 'temperature/nll_before')} before, {_num(t['nll_after'], 'temperature/nll_after')} after.</p>")
    else:
        temp = f"<p>{e(t.get('note', ''))}</p>"
    per = "".join(
        f"<tr><th>{e(c)}</th>" + "".join(f"<td>{_num(n['per_class'][c][m], f'per_class/{c}/{m}')}</td>"
                                          for m in ("precision", "recall", "f1", "support")) + "</tr>"
        for i, c in enumerate(classes)
    )
    cm = ""
    if len(classes) <= 30:
        head = "".join(f"<th>{e(c[:8])}</th>" for c in classes)
        body = "".join(
            f"<tr><th>{e(c)}</th>" + "".join(f"<td>{_num(v, f'confusion_matrix/{i}/{j}')}</td>" for j, v in enumerate(r)) + "</tr>"
            for i, (c, r) in enumerate(zip(classes, n["confusion_matrix"]))
        )
        cm = f'<h2>Confusion matrix (rows: true class, columns: predicted)</h2><table class="cm"><tr><th></th>{head}</tr>{body}</table>'
    title = n.get("title") or "model"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imclass evaluation report: {e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; }} th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
th {{ background: #f4f4f4; }} table.cm td {{ font-size: 80%; }} img {{ max-width: 100%; }}
figure {{ margin: .5em 0 1.5em; }} figcaption {{ color: #666; font-size: 85%; }}
</style></head><body>
<h1>Evaluation report: {e(title)}</h1>
<p>{e(n['model'])} on {n['images']:,} images, {len(classes)} classes, test-time augmentation: {e(n['tta'])}.
Numbers from torchmetrics and scikit-learn; every number is in <code>{JSON_NAME}</code>.</p>
<h2>Summary</h2><table id="summary">{rows}</table>
<h2>Per class</h2><table id="per-class"><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per}</table>
{_img(out, files.get('per_class'), 'per-class precision, recall and F1')}
{cm}
{_img(out, files.get('confusion'), 'confusion matrix')}
<h2>Calibration</h2>
<p>Expected calibration error over {n['calibration']['n_bins']} confidence bins: {_num(n['ece'], 'calibration/ece')}.</p>
{temp}
{_img(out, files.get('reliability'), 'reliability diagram (before and after temperature scaling)')}
<h2>Examples</h2>
{_img(out, files.get('confident_mistakes'), 'most confident mistakes') or '<p>No mistakes.</p>'}
{_img(out, files.get('unsure_correct'), 'least confident correct images') or '<p>No correct images.</p>'}
{('<h2>Training</h2>' + _img(out, files.get('training_curves'), 'training curves')) if files.get('training_curves') else ''}
{_tuning_html(n.get('tuning'), files, out)}
</body></html>
"""
