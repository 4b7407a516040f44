"""``imclass explain RUN IMAGE --method ...``: see inside a saved model (imclass.explain) as one PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from imclass.cli._common import (
    USER_ERRORS,
    DataRoot,
    data_mode_option,
    dataset_alias,
    fail,
    load_saved,
    pick_data,
    plain_warnings,
    print_json,
)

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.

METHODS = ("gradcam", "saliency", "occlusion", "filters", "activations", "neighbours", "tsne", "same-l2")


def register(app: typer.Typer) -> None:
    """Add the top-level command ``explain`` to ``app``."""
    app.command("explain")(explain)


def explain(
    run: Path = typer.Argument(..., help="Run folder or .safetensors model file."),
    image: Optional[str] = typer.Argument(
        None, help="An image file, or DATA:INDEX (a test image of cifar10, mnist, ... or a folder); "
        "for tsne a data set (DATA). Not needed for filters."),
    method: str = typer.Option(..., "--method", help="gradcam, saliency, occlusion, filters, activations, "
                               "neighbours, tsne or same-l2."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer name (model.named_modules()); default: "
                                        "the last Conv2d (gradcam), the first (filters, activations)."),
    target: Optional[str] = typer.Option(None, "--target", help="Class name or index to explain (default: the predicted one)."),
    search_in: Optional[str] = typer.Option(None, "--in", help="The data set whose training images neighbours and "
                                            "same-l2 search (default: DATA of an IMAGE given as DATA:INDEX)."),
    dataset: Optional[str] = dataset_alias(),
    data_root: Optional[str] = DataRoot,
    limit: Optional[int] = typer.Option(None, "--limit", help="A seeded, stratified sample of N images: training images "
                                        "for neighbours and same-l2 (default 10000), test images for tsne (default 1000)."),
    window: Optional[int] = typer.Option(None, "--window", help="Occlusion patch size in pixels (default: a sixth of the side)."),
    k: int = typer.Option(8, "--k", help="Neighbours shown (neighbours)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of the figures."),
    data_mode: Optional[str] = data_mode_option(),
) -> None:
    """Grad-CAM, saliency or occlusion maps, first-layer filters, activation maps, nearest training
    images (features vs pixels), a t-SNE map of features, or the same-L2-distance picture, as one PNG.

    Attributions come from Captum; a k-NN model (no layers) takes occlusion, neighbours, tsne and same-l2.
    """
    from imclass import explain as ex

    try:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
        if limit is not None and limit < 1:
            raise ValueError(f"expected --limit >= 1, received {limit}")
        if k < 1:
            raise ValueError(f"expected --k >= 1, received {k}")
        if out.suffix.lower() != ".png":
            raise ValueError(f"expected --out to name a .png file, received {out}")
        saved = load_saved(run)
        model = saved.predictor
        if not hasattr(model, "predict_logits") and saved.classes:  # a k-NN: its names live in the model file
            model.class_names = list(saved.classes)
        if method == "filters":
            result = ex.save_filters(model, out, layer)
        elif method == "tsne":
            if image is None:
                raise ValueError("tsne needs a data set as IMAGE (cifar10, mnist, ... or a folder)")
            with plain_warnings():
                test = _load(saved, image.rsplit(":", 1)[0] if _indexed(image) else image, "test", data_root,
                             limit=limit or 1000, mode=data_mode)
            result = ex.tsne_map(model, _pixels(test), test.labels, classes=saved.classes or test.classes, out=out)
            result.pop("coordinates")
            result.pop("labels")
        else:
            if image is None:
                raise ValueError(f"{method} needs an IMAGE (a file, or DATA:INDEX such as cifar10:7)")
            with plain_warnings():
                x, label, source = _image(saved, image, data_root, data_mode)
            if method in ("gradcam", "saliency", "occlusion"):
                fn = {"gradcam": ex.gradcam, "saliency": ex.saliency, "occlusion": ex.occlusion}[method]
                options: dict[str, Any] = {"layer": layer} if method == "gradcam" else {}
                if method == "occlusion" and window is not None:
                    options["window"] = window
                e = fn(model, x, target=target, **options)
                e.save(out)
                result = {**e.summary(), "out": str(out)}
            elif method == "activations":
                result = ex.save_activations(model, x, out, layer)
            else:
                train_name = pick_data(search_in, dataset) or source
                if train_name is None:
                    raise ValueError(f"{method} needs training images: give --in DATA (cifar10, ... or a folder)")
                with plain_warnings():
                    train = _load(saved, train_name, "train", data_root, limit=limit or 10000, mode=data_mode)
                classes = saved.classes or train.classes
                pixels = _pixels(train)
                if method == "neighbours":
                    true_class = None if label is None else (classes[label] if label < len(classes) else str(label))
                    result = ex.neighbours(model, x, pixels, train.labels, k=k, classes=classes, out=out,
                                           true_class=true_class)
                else:
                    network = model if hasattr(model, "predict_logits") else None
                    result = ex.same_l2(x, pixels, train.labels, network, classes=classes, out=out)
            if label is not None:
                result["true_class"] = (saved.classes or [])[label] if saved.classes and label < len(saved.classes) else label
    except USER_ERRORS as err:
        fail(str(err))
    if as_json:
        print_json(result)
        return
    what = result.get("target_name") or result.get("layer") or result.get("predicted") or ""
    typer.echo(f"{method}{' (' + str(what) + ')' if what else ''}: wrote {out}")


def _indexed(image: str) -> bool:
    name, _, index = image.rpartition(":")
    return bool(name) and index.isdigit() and not Path(image).is_file()


def _load(saved: Any, dataset: str, split: str, root: Optional[str], *, limit: Optional[int] = None,
          mode: Optional[str] = None):
    """A data set split prepared as the model expects (as `imclass evaluate` loads it), in the tier
    ``mode`` (``--data-mode``; None: chosen); ``limit``: the seeded, stratified sample of every ``--limit``,
    picked before anything is decoded."""
    from imclass import data as imdata

    pre = getattr(saved.predictor, "preprocessing", None)  # a pretrained backbone's resize + centre crop
    if pre is not None:
        from imclass.transfer.workflow import load_for

        return load_for(dataset, pre, split=split, root=root, limit=limit, mode=mode)
    size = saved.input_size
    return imdata.load(dataset, split=split, root=root, image_size=tuple(size[1:]) if size else None, limit=limit,
                       mode=mode, reserve=saved.memory_reserve())


def _pixels(source: Any) -> Any:
    """All images of a (``--limit``-sized) source as one uint8 tensor (N, C, H, W), whatever its tier: the
    source's own tensor when it holds one (the memory tier's, or the cache tier's memory map: no copy, which
    was 0.44 GB more for the flowers at 224 px), else read (the stream tier)."""
    import torch

    images = getattr(source, "images", None)
    if isinstance(images, torch.Tensor):
        return images
    return source.read(torch.arange(len(source)))


def _image(saved: Any, image: str, root: Optional[str], mode: Optional[str] = None):
    """(uint8 (C, H, W), true label or None, the data set it came from or None) for a file or DATA:INDEX."""
    if _indexed(image):
        import torch

        name, _, index = image.rpartition(":")
        test = _load(saved, name, "test", root, mode=mode)
        i = int(index)
        if i >= len(test):
            raise ValueError(f"{name} test split has {len(test):,} images; index {i} is out of range")
        return test.read(torch.tensor([i]))[0], int(test.labels[i]), name
    from imclass.data.decode import decode_image

    pre = getattr(saved.predictor, "preprocessing", None)
    size = saved.input_size
    channels = size[0] if size else 3
    x = decode_image(image, size=tuple(size[1:]) if size else None, channels=channels,
                     resize=getattr(pre, "resize", None), crop=getattr(pre, "crop", None))
    return x, None, None
