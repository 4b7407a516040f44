"""``imclass features`` (export embeddings) and ``imclass similar`` (image retrieval with the k-NN engine)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from imclass.cli._common import USER_ERRORS, DataRoot, data_mode_option, fail, limit_option, plain_warnings, print_json

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.

_MODEL = typer.Argument(..., help="A run folder or model file (imclass train --out), or a backbone name "
                                  "(mobilenetv2_100, timm:resnet18, torchvision:squeezenet1_1).")
_WEIGHTS = typer.Option("imagenet", "--weights", help="Backbone weights: imagenet (from the weights root), a file, or none.")
_WEIGHTS_DIR = typer.Option(None, "--weights-dir", help="Weights root (default: $IMCLASS_WEIGHTS).")
_IMAGE_SIZE = typer.Option(None, "--image-size", help="Crop size fed to the network (default: what its weights need).")
_BATCH = typer.Option(64, "--batch-size", "-b", help="Images per forward pass.")
_CACHE = typer.Option(None, "--cache", help="Feature cache folder (default: $IMCLASS_CACHE/features); 'none' to skip.")
_AMP = typer.Option("auto", "--amp", help="auto: bf16 autocast where the CPU (or a GPU) has native bf16, about 2x faster, "
                                          "features to ~3 digits; none: float32.")


def register(app: typer.Typer) -> None:
    """Add the top-level commands ``features`` and ``similar`` to ``app``."""
    app.command("features")(features)
    app.command("similar")(similar)


def _embedder(spec: str, weights: str | None, weights_dir: str | None, image_size: int | None):
    from imclass.transfer.retrieval import load_embedder

    return load_embedder(spec, weights=None if str(weights).lower() == "none" else weights, weights_dir=weights_dir,
                         image_size=image_size)


def _cache(cache: str | None):
    from imclass.data.download import cache_dir
    from imclass.transfer.features import FeatureCache

    if cache is not None and cache.lower() == "none":
        return None
    return FeatureCache(Path(cache) if cache else cache_dir() / "features")


def _amp(amp: str) -> str | None:
    if amp not in ("auto", "none", "bf16"):
        fail(f"expected --amp auto, bf16 or none, received {amp!r}")
    return None if amp == "none" else amp


def _meta(emb, **extra) -> dict:
    return {"model": emb.name, "weights": emb.weights, "preprocessing": emb.preprocessing.to_dict(), **extra}


def features(
    model: str = _MODEL,
    data: str = typer.Argument(..., help="A folder of images (class folders, train/ + val/, or flat), or cifar10, "
                                         "mnist, fashion-mnist."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file: .npz (numpy) or .parquet (needs pyarrow)."),
    weights: str = _WEIGHTS,
    weights_dir: Optional[str] = _WEIGHTS_DIR,
    image_size: Optional[int] = _IMAGE_SIZE,
    batch_size: int = _BATCH,
    split: str = typer.Option("train", "--split", help="Split of a named data set (train or test)."),
    limit: Optional[int] = limit_option(),
    data_root: Optional[str] = DataRoot,
    cache: Optional[str] = _CACHE,
    amp: str = _AMP,
    data_mode: Optional[str] = data_mode_option(),
) -> None:
    """Export the embeddings of a data set or folder: features (N, D) float32, labels, classes, paths, splits."""
    import numpy as np

    from imclass.train import distributed
    from imclass.transfer.features import extract_features_shared

    suffix = out.suffix.lower()
    if suffix not in (".npz", ".parquet"):
        fail(f"expected --out ending in .npz or .parquet, received {out.name!r}")
    try:
        with plain_warnings(), distributed.session("cpu"):  # under torchrun each rank extracts its share
            emb = _embedder(model, weights, weights_dir, image_size)
            if Path(data).expanduser().is_dir():
                from imclass.transfer.retrieval import image_set

                images = image_set(data)
                source = images.paths
                labels, classes, splits = images.labels, images.classes, images.splits
                paths = [images.relative(i) for i in range(len(images.paths))]
            else:
                from imclass.data import load

                ds = load(data, split=split, root=data_root, limit=limit, mode=data_mode)
                source, labels, classes = ds.images, ds.labels, list(ds.classes)
                splits, paths = [split] * len(ds), [f"{ds.name}/{split}/{i}" for i in range(len(ds))]
            feats = extract_features_shared(emb.model, source, emb.preprocessing, batch_size, cache=_cache(cache),
                                            amp=_amp(amp), mode=data_mode)
            main = distributed.is_main()
    except USER_ERRORS as err:
        fail(str(err))
    if not main:  # rank 0 writes the file
        return
    meta = _meta(emb, data=str(data), classes=classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        np.savez(out, features=feats.numpy().astype(np.float32), labels=labels.numpy(), paths=np.array(paths),
                 splits=np.array(splits), classes=np.array(classes), meta=np.array(json.dumps(meta)))
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            fail("writing .parquet needs pyarrow: pip install pyarrow (or use --out FILE.npz)")
        table = pa.table({
            "path": paths, "split": splits, "label": labels.numpy(),
            "class": [classes[v] if 0 <= v < len(classes) else None for v in labels.tolist()],
            "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.numpy().reshape(-1)), feats.shape[1]),
        }).replace_schema_metadata({"imclass": json.dumps(meta)})
        pq.write_table(table, out)
    typer.echo(f"wrote {out}: {feats.shape[0]:,} embeddings of {feats.shape[1]} values from {emb.name}")


def similar(
    query: List[Path] = typer.Argument(..., help="Query image file(s)."),
    folder: Path = typer.Option(..., "--in", help="The folder to search (class folders, train/ + val/, or flat)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Backbone name or run folder (default: a backbone whose weights are in the weights root)."),
    weights: str = _WEIGHTS,
    weights_dir: Optional[str] = _WEIGHTS_DIR,
    k: int = typer.Option(5, "-k", help="Nearest images to return."),
    image_size: Optional[int] = _IMAGE_SIZE,
    batch_size: int = _BATCH,
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the k-NN report (features vs pixels) as JSON."),
    compare: bool = typer.Option(True, "--compare/--no-compare",
                                 help="k-NN accuracy on deep features beside raw pixels, on the folder's split."),
    pixel_size: int = typer.Option(32, "--pixel-size", help="Side of the raw-pixel images of the comparison."),
    cache: Optional[str] = _CACHE,
    amp: str = _AMP,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    data_mode: Optional[str] = data_mode_option(),
) -> None:
    """The images of FOLDER nearest to each QUERY in feature space (k-NN, cosine), and how k-NN on those
    features compares with k-NN on raw pixels (the course's point: pixel distance says little)."""
    from imclass.knn import KNN
    from imclass.transfer.features import extract_features
    from imclass.transfer.retrieval import image_set, knn_report, pixels_of, retrieval_split

    if k < 1:
        fail(f"expected -k >= 1, received {k}")
    try:
        with plain_warnings():
            if backbone is None:
                from imclass.transfer.workflow import no_weights_advice, pick_backbone

                backbone = pick_backbone(weights_dir)
                if backbone is None:
                    fail(f"no pretrained backbone found: {no_weights_advice(weights_dir)}; or pass --backbone RUN_FOLDER")
            emb = _embedder(backbone, weights, weights_dir, image_size)
            images = image_set(folder)
            store = _cache(cache)
            feats = extract_features(emb.model, images.paths, emb.preprocessing, batch_size, cache=store, amp=_amp(amp),
                                     mode=data_mode)
            queries = extract_features(emb.model, [Path(q) for q in query], emb.preprocessing, batch_size, amp=_amp(amp))
            k_eff = min(k, len(images.paths))
            dist, idx = KNN(k=k_eff, metric="cosine").fit(feats, images.labels.clamp(min=0)).kneighbors(queries)
            result = {**_meta(emb), "folder": str(folder), "k": k_eff, "queries": []}
            for q, d_row, i_row in zip(query, dist.tolist(), idx.tolist()):
                result["queries"].append({"query": str(q), "neighbours": [
                    {"path": images.relative(i), "class": images.classes[images.labels[i]] if images.classes else None,
                     "distance": d} for d, i in zip(d_row, i_row)]})
            summary = None
            if compare and images.layout != "flat" and len(images.classes) > 1:
                train_idx, test_idx = retrieval_split(images)
                if len(train_idx) and len(test_idx):
                    pixels = pixels_of(images.paths, pixel_size)
                    summary = knn_report(feats, pixels, images.labels, train_idx, test_idx, ks=(1, min(5, len(train_idx))),
                                         split="the folder's own val/test" if images.layout == "split"
                                         else "seeded stratified 80/20 (seed 0)", pixel_size=pixel_size,
                                         model=emb.name)
            result["report"] = summary
    except USER_ERRORS as err:
        fail(str(err))
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print_json(result)
        return
    for q in result["queries"]:
        typer.echo(f"{q['query']}: the {result['k']} nearest of {len(images.paths):,} images in {folder} "
                   f"({emb.name} features, cosine distance)")
        for rank, n in enumerate(q["neighbours"], 1):
            cls = f"  [{n['class']}]" if n["class"] is not None else ""
            typer.echo(f"  {rank:>2}. {n['distance']:.4f}  {n['path']}{cls}")
    if summary is not None:
        typer.echo("")
        typer.echo(f"k-NN on {summary['train']:,} training / {summary['test']:,} held-out images "
                   f"({summary['split']}; chance = largest class {summary['chance']:.1%}):")
        typer.echo(f"  {'representation':<16}{'metric':<8}{'dims':>8}{'k':>4}{'accuracy':>10}")
        for row in summary["rows"]:
            typer.echo(f"  {row['representation']:<16}{row['metric']:<8}{row['dims']:>8,}{row['k']:>4}"
                       f"{row['accuracy']:>10.1%}")
    if report is not None:
        typer.echo(f"wrote {report}")
