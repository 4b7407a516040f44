"""The challenge report: accuracy of one or more saved models against the severity of each of the
course's recognition challenges, as curves, a summary table, example grids, a JSON and one HTML page.

    report = challenge_report(["runs/knn", "runs/cnn"], "cifar10", "reports/challenge", limit=2000)
    report["challenges"]["occlusion"]["accuracy"]["cnn"]      # [clean, severity 1, ..., severity 5]

The transforms are :mod:`imclass.data.challenge_transforms` (seeded ``torchvision.transforms.v2``); every
model sees the same perturbed images, and severity 0 is the clean test set, so its accuracy is
exactly the one ``imclass evaluate`` reports. A second test set of the same classes (a folder,
a data set or ``(images, labels)``) adds the ``shift`` entry: intra-class variation /
distribution shift, clean test set and second set side by side.
"""
from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from imclass import data as imdata
from imclass.data.challenge_transforms import CHALLENGES, MAX_SEVERITY, apply_challenge, describe
from imclass.data.dataset import ImageDataset
from imclass.data.loader import derive_seed
from imclass.model_file.format import read_metadata
from imclass.models.rebuild import load
from imclass.tta import choose_tta
from imclass.visualize import save_image_grid, save_line_plot
from imclass.visualize.plots import pyplot, save_figure
from imclass.data import as_images, as_labels
from imclass.data.folder import split_folders

# Deferred imports (inside functions), for start-up time: tqdm
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["JSON_NAME", "HTML_NAME", "ModelUnderTest", "challenge_report", "load_models"]

JSON_NAME = "challenges.json"
HTML_NAME = "challenges.html"
CHUNK = 1024  # images transformed (and predicted) at a time: bounded memory on any test set


@dataclass
class ModelUnderTest:
    """A loaded model with what the report needs: a name, its classes, input size and test-time augmentation."""

    name: str
    predictor: Any  # a Classifier (predict(x, tta=)) or a KNN (predict(x))
    classes: list[str] | None = None
    input_size: list[int] | None = None
    tta: str | None = None
    path: str = ""

    @property
    def kind(self) -> str:
        return "knn" if not hasattr(self.predictor, "predict_logits") else "classifier"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class indices (N,) int64 on the CPU."""
        if self.kind == "classifier":
            tta = None if self.tta in (None, "none") else self.tta
            return self.predictor.predict(images, tta=tta).cpu()
        return torch.as_tensor(self.predictor.predict(images)).cpu()


def load_models(paths: Sequence[str | os.PathLike], *, tta: bool | None = None) -> list[ModelUnderTest]:
    """Load run folders / model files (``imclass.load``) with their metadata; names are the folder
    names (made unique). ``tta``: ``None`` = what each file records, ``False`` = none, ``True`` = flip_translate."""
    models, seen = [], {}
    for p in paths:
        header = read_metadata(p)
        pre = header.get("preprocessing") or {}
        path = Path(p)
        name = path.parent.name if path.suffix == ".safetensors" else path.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        m = ModelUnderTest(name, load(p), header.get("classes"), pre.get("input_size"), pre.get("tta"), str(p))
        try:
            used = choose_tta(m.tta, tta, knn=m.kind == "knn")
        except ValueError as err:
            raise ValueError(f"{p}: {err}") from None
        m.tta = None if used == "none" else used
        models.append(m)
    return models


def _as_models(models: Sequence[Any]) -> list[ModelUnderTest]:
    out: list[ModelUnderTest] = []
    paths = [m for m in models if isinstance(m, (str, os.PathLike))]
    loaded = iter(load_models(paths)) if paths else iter(())
    for i, m in enumerate(models):
        if isinstance(m, (str, os.PathLike)):
            out.append(next(loaded))
        elif isinstance(m, ModelUnderTest):
            out.append(m)
        elif hasattr(m, "predict"):
            size = getattr(m, "input_size", None)
            out.append(ModelUnderTest(f"model{i}", m, getattr(m, "classes", None),
                                      list(size) if size else None, getattr(m, "tta", None)))
        else:
            raise TypeError(f"expected a run folder, a model file or a model with predict(), received {type(m).__name__}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"expected one name per model, received {names}")
    return out


def _load_data(data: Any, split: str, size: list[int] | None, root: Any, limit: int | None,
               seed: int = 0, mode: str | None = None) -> Any:
    """The test images as the model takes them: an image source (``ImageDataset`` in the memory or cache
    tier, a stream source in the stream tier; ``mode``: ``--data-mode``, None chosen), ``limit`` files
    picked before decoding."""
    if isinstance(data, ImageDataset):
        ds = data
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        ds = imdata.from_arrays(data[0], data[1])
    else:
        ds = imdata.load(data, split=split, root=root, image_size=tuple(size[1:]) if size else None, limit=limit,
                         seed=seed, mode=mode)
        if not isinstance(ds, ImageDataset):  # the stream tier: already at the model's size, already limited
            return ds
    if size and tuple(ds.image_shape[1:]) != tuple(size[1:]):
        ds = ImageDataset(imdata.resize_images(ds.images, tuple(size[1:])), ds.labels, ds.classes, ds.name, ds.split)
    if size and ds.image_shape[0] != size[0]:
        raise ValueError(f"the model takes {size[0]}-channel images, the data set has {ds.image_shape[0]} channels")
    return imdata.limit_dataset(ds, limit, seed=seed)


def _load_shift(shift: Any, size: list[int] | None, root: Any, mode: str | None = None) -> Any:
    if isinstance(shift, (str, os.PathLike)) and Path(shift).is_dir():
        split = "test" if split_folders(Path(shift)) else "all"  # a plain folder is the second test set whole
        return _load_data(shift, split, size, root, None, mode=mode)
    return _load_data(shift, "test", size, root, None)


def _chunk(ds: Any, start: int) -> torch.Tensor:
    """Images ``start`` .. ``start + CHUNK`` of an image source (any tier) as one uint8 tensor."""
    return ds.read(torch.arange(start, min(start + CHUNK, len(ds))))


def _remap(shift: Any, classes: list[str], where: str) -> torch.Tensor:
    """The shift set's labels in the order of the test set's ``classes`` (its classes must be among them)."""
    unknown = [c for c in shift.classes if c not in classes]
    if unknown:
        raise ValueError(f"{where}: classes {unknown} are not classes of the test set ({classes})")
    table = torch.tensor([classes.index(c) for c in shift.classes], dtype=torch.long)
    return table[shift.labels]


def _accuracy(model: ModelUnderTest, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    pred = model.predict(images)
    return int((pred == labels).sum()), pred


def challenge_report(
    models: Sequence[Any],
    data: Any,
    out: str | os.PathLike,
    *,
    challenges: Sequence[str] = CHALLENGES,
    severities: Sequence[int] = tuple(range(MAX_SEVERITY + 1)),
    shift: Any = None,
    split: str = "test",
    root: Any = None,
    limit: int | None = None,
    seed: int = 0,
    examples: int = 6,
    progress: bool = True,
    mode: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` (run folders, model files or loaded models) on ``data`` under every challenge.

    Writes into ``out``: ``challenges.json`` (the returned dict), ``challenges.html`` (one
    self-contained page, images embedded), a curve per challenge (``curve_<name>.png``, one line per
    model) and a grid of example images per challenge (``examples_<name>.png``: rows = images,
    columns = severities). ``limit`` keeps a seeded, stratified sample of N test images (the rule of every ``--limit``). Severity 0 is always included.
    ``mode``: the tier a folder's images are read in (``imclass.data.source``: memory, cache, stream; None: chosen).
    """
    from tqdm import tqdm

    models = _as_models(models)
    if not models:
        raise ValueError("expected at least one model to test")
    for c in challenges:
        if c not in CHALLENGES:
            raise ValueError(f"expected a challenge in {list(CHALLENGES)}, received {c!r}")
    severities = sorted({0, *(int(s) for s in severities)})
    if severities[-1] > MAX_SEVERITY or severities[0] < 0:
        raise ValueError(f"expected severities in 0..{MAX_SEVERITY}, received {severities}")
    if limit is not None and limit < 1:
        raise ValueError(f"expected limit >= 1, received limit={limit}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # one copy of the test set per input size, so each model sees it as `imclass evaluate` does
    sizes = {tuple(m.input_size) if m.input_size else None for m in models}
    sets = {s: _load_data(data, split, list(s) if s else None, root, limit, seed, mode) for s in sizes}
    first = next(iter(sets.values()))
    for m in models:
        ds = sets[tuple(m.input_size) if m.input_size else None]
        if m.classes is not None and len(m.classes) != ds.num_classes:
            raise ValueError(f"{m.path or m.name}: the model knows {len(m.classes)} classes but the data has {ds.num_classes}")
    shift_sets = {}
    if shift is not None:
        for s, ds in sets.items():
            if isinstance(shift, (tuple, list)):  # arrays: labels are indices into the test set's classes
                images = as_images(shift[0], name="shift images")
                sh = ImageDataset(images, as_labels(shift[1], len(images), name="shift labels"), ds.classes, "shift")
                sh = _load_data(sh, split, list(s) if s else None, root, None)
                shift_sets[s] = (sh, sh.labels)
            else:
                sh = _load_shift(shift, list(s) if s else None, root, mode)
                shift_sets[s] = (sh, _remap(sh, ds.classes, str(shift)))

    steps = len(challenges) * (len(severities) - 1) + 1 + bool(shift_sets)
    bar = tqdm(total=steps * len(models), desc="challenge", unit="model-eval", disable=not progress, leave=False)
    clean: dict[str, float] = {}
    for m in models:
        ds = sets[tuple(m.input_size) if m.input_size else None]
        correct = sum(_accuracy(m, _chunk(ds, i), ds.labels[i:i + CHUNK])[0] for i in range(0, len(ds), CHUNK))
        clean[m.name] = correct / len(ds)
        bar.update()
    result: dict[str, Any] = {}
    grids: dict[str, list[list[torch.Tensor]]] = {}
    picks = _spread(min(CHUNK, len(first)), examples)  # example images from the first chunk, spread over it
    for c in challenges:
        acc = {m.name: [clean[m.name]] for m in models}
        grids[c] = [[image] for image in first.read(torch.tensor(picks, dtype=torch.long))]
        for s in severities[1:]:
            for size, ds in sets.items():
                correct = {m.name: 0 for m in models if (tuple(m.input_size) if m.input_size else None) == size}
                for k, i in enumerate(range(0, len(ds), CHUNK)):
                    g = torch.Generator().manual_seed(derive_seed(seed, CHALLENGES.index(c), k))
                    x = apply_challenge(_chunk(ds, i), c, s, generator=g)
                    if ds is first and k == 0:
                        for j, row in zip(picks, grids[c]):
                            row.append(x[j])
                    for m in models:
                        if m.name in correct:
                            correct[m.name] += _accuracy(m, x, ds.labels[i:i + CHUNK])[0]
                for name, n in correct.items():
                    acc[name].append(n / len(ds))
                    bar.update()
        result[c] = {
            "severities": severities,
            "parameters": [describe(c, s) for s in severities],
            "accuracy": acc,
            "mean_accuracy": {n: sum(a[1:]) / len(a[1:]) for n, a in acc.items()},
            "curve": f"curve_{c}.png",
            "examples": f"examples_{c}.png",
        }
    if shift_sets:
        acc = {}
        for m in models:
            size = tuple(m.input_size) if m.input_size else None
            sh, sh_labels = shift_sets[size]
            correct = sum(_accuracy(m, _chunk(sh, i), sh_labels[i:i + CHUNK])[0] for i in range(0, len(sh), CHUNK))
            acc[m.name] = [clean[m.name], correct / len(sh)]
            bar.update()
        sh = shift_sets[next(iter(sets))][0]
        result["shift"] = {
            "severities": [0, 1],
            "parameters": [f"{first.name or 'test set'} ({len(first)} images)", f"{sh.name or 'shift'} ({len(sh)} images)"],
            "images": [len(first), len(sh)],
            "accuracy": acc,
            "mean_accuracy": {n: a[1] for n, a in acc.items()},
            "curve": "curve_shift.png",
            "examples": "examples_shift.png",
        }
        grids["shift"] = [list(first.read(torch.tensor(picks, dtype=torch.long))),
                          list(sh.read(torch.tensor(_spread(len(sh), examples), dtype=torch.long)))]
    bar.close()

    report = {
        "dataset": first.name or (str(data) if isinstance(data, (str, os.PathLike)) else "data"),
        "split": split,
        "images": len(first),
        "seed": seed,
        "models": [{"name": m.name, "path": m.path, "kind": m.kind, "tta": m.tta or "none",
                    "input_size": m.input_size} for m in models],
        "clean_accuracy": clean,
        "challenges": result,
        "summary": {m.name: {"clean": clean[m.name], **{c: result[c]["mean_accuracy"][m.name] for c in result}}
                    for m in models},
    }
    _write_pictures(report, grids, first, out, picks)
    (out / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / HTML_NAME).write_text(_html(report, out))
    return report


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread over ``range(n)`` (a folder's images are sorted by class: show several classes)."""
    k = min(k, n)
    return [round(i * (n - 1) / max(k - 1, 1)) for i in range(k)]


def _write_pictures(report: dict, grids: dict, first: ImageDataset, out: Path, picks: list[int]) -> None:
    names = [m["name"] for m in report["models"]]
    scale = max(1, 96 // max(first.image_shape[1:]))
    for c, entry in report["challenges"].items():
        if c == "shift":
            _bar_plot(entry, names, out / entry["curve"])
            rows, labels = grids[c], ["test set", "shifted"]
        else:
            save_line_plot(entry["severities"], {n: [100 * a for a in entry["accuracy"][n]] for n in names},
                           out / entry["curve"], xlabel="severity (0 = clean)", ylabel="accuracy (%)", title=c)
            rows = grids[c]
            labels = [first.classes[int(first.labels[j])] for j in picks]
        save_image_grid(rows, out / entry["examples"], row_labels=labels, scale=scale)


def _bar_plot(entry: dict, names: list[str], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    width = 0.8 / 2
    xs = range(len(names))
    for k, label in enumerate(("test set", "shifted set")):
        ax.bar([x + (k - 0.5) * width for x in xs], [100 * entry["accuracy"][n][k] for n in names], width, label=label)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("accuracy (%)")  # percent, as the page's tables
    ax.set_title("shift: a second test set of the same classes")
    ax.set_ylim(0, 118)  # headroom above 100 %: the legend sits there, never over a bar
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def pct(value: float) -> str:
    """How the page shows an accuracy: percent with one decimal (tests compare it with the JSON)."""
    return f"{100 * value:.1f}"


def _html(report: dict, out: Path) -> str:
    names = [m["name"] for m in report["models"]]
    e = html.escape
    chal = list(report["challenges"])
    head = "".join(f"<th>{e(c)}</th>" for c in chal)
    rows = []
    for n in names:
        cells = "".join(
            f'<td class="num" data-model="{e(n)}" data-challenge="{e(c)}">{pct(report["summary"][n][c])}</td>' for c in chal
        )
        rows.append(f'<tr><th>{e(n)}</th><td class="num" data-model="{e(n)}" data-challenge="clean">'
                    f'{pct(report["summary"][n]["clean"])}</td>{cells}</tr>')
    models = "".join(f"<li><b>{e(m['name'])}</b>: {e(m['kind'])}, {e(m['path'] or 'in memory')}, "
                     f"test-time augmentation {e(m['tta'])}</li>" for m in report["models"])
    sections = []
    for c, entry in report["challenges"].items():
        sev_head = "".join(f"<th>{s}</th>" for s in entry["severities"])
        params = "".join(f"<td>{e(p)}</td>" for p in entry["parameters"])
        acc_rows = "".join(
            f"<tr><th>{e(n)}</th>" + "".join(
                f'<td class="num" data-model="{e(n)}" data-challenge="{e(c)}" data-severity="{s}">{pct(a)}</td>'
                for s, a in zip(entry["severities"], entry["accuracy"][n])) + "</tr>"
            for n in names)
        caption = ("rows: the clean test set, the second set" if c == "shift" else
                   f"rows: test images; columns: severity {', '.join(map(str, entry['severities']))}")
        sections.append(
            f'<section id="{e(c)}"><h2>{e(c)}</h2>'
            f'<table class="sev"><tr><th>severity</th>{sev_head}</tr><tr><th>parameters</th>{params}</tr>{acc_rows}</table>'
            f'<div class="pics"><figure>{_img(out / entry["curve"], c + " curve")}<figcaption>accuracy against severity'
            f'</figcaption></figure><figure>{_img(out / entry["examples"], c + " examples")}<figcaption>{e(caption)}'
            f"</figcaption></figure></div></section>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imclass challenge report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; font-size: 0.9em; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
table.sev td {{ max-width: 14em; }}
.pics {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.85em; color: #555; }}
</style></head><body>
<h1>Challenge report</h1>
<p>{e(str(report["dataset"]))} {e(report["split"])}: {report["images"]} images, seed {report["seed"]}.
Accuracy in percent; severity 0 is the clean test set.</p>
<ul>{models}</ul>
<h2>Summary</h2>
<p>Clean accuracy and the mean accuracy over severities 1&ndash;{MAX_SEVERITY} of each challenge
(shift: the accuracy on the second test set).</p>
<table id="summary"><tr><th>model</th><th>clean</th>{head}</tr>{''.join(rows)}</table>
{''.join(sections)}
</body></html>
"""
