"""``imclass data``: look at a data set (sizes, classes, counts), draw example images, download it."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from imclass.cli._common import DataRoot, fail, plain_warnings, print_json

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.

data_app = typer.Typer(help="Inspect, show and download data sets (cifar10, mnist, fashion-mnist, image folders).",
                       no_args_is_help=True)

_NAME = typer.Argument(..., help="cifar10, mnist, fashion-mnist, or a folder of images (one sub-folder per class).")
_IMAGE_SIZE = typer.Option(None, "--image-size", help="Resize every image: 32 or 32x48 (height x width).")
SHOW_FOLDER_SIZE = 64  # `data show` of a folder of photos (mixed sizes): each image resized to 64 x 64
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError)


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the ``imclass`` app."""
    app.add_typer(data_app, name="data")


def parse_size(text: str | None) -> int | tuple[int, int] | None:
    """``"32"`` -> 32, ``"32x48"`` or ``"32,48"`` -> (32, 48); None stays None."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        fail(f"expected --image-size like 32 or 32x48 (height x width), received {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _splits_of(name: str, split: str | None) -> list[str]:
    from imclass.data.catalog import canonical_name
    from imclass.data.folder import split_folders

    if split:
        return [s.strip() for s in split.split(",") if s.strip()]
    if canonical_name(name) is None and Path(name).expanduser().is_dir():
        found = split_folders(Path(name).expanduser())
        if found:
            return list(found)
    return ["train", "test"]


def _load(name: str, split: str, root: str | None, image_size: str | None, limit: int | None = None, seed: int = 0):
    """Load with warnings turned into ``warning:`` lines on stderr (the notes say the rest)."""
    from imclass.data import load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = load(name, split=split, root=root, image_size=parse_size(image_size), limit=limit, seed=seed)
        except _USER_ERRORS as err:
            fail(str(err))
    for w in caught:
        if str(w.message) not in ds.notes:
            typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    return ds


@data_app.command("info")
def info(
    name: str = _NAME,
    data: Optional[str] = DataRoot,
    split: Optional[str] = typer.Option(None, "--split", help="Split(s) to describe, e.g. train or train,test (default: all)."),
    image_size: Optional[str] = _IMAGE_SIZE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Print sizes, image shape, class names and per-class counts of each split.

    A folder of images is described from its file headers (nothing decoded): its layout, formats,
    colour modes and size distribution too, so folders of mixed sizes and formats work."""
    from imclass.data.catalog import canonical_name

    if canonical_name(name) is None and Path(name).expanduser().is_dir():
        _folder_info(Path(name).expanduser(), split, parse_size(image_size), as_json)
        return
    sets = {s: _load(name, s, data, image_size) for s in _splits_of(name, split)}
    first = next(iter(sets.values()))
    if as_json:
        print_json({"name": first.name, "splits": {s: ds.describe() for s, ds in sets.items()}})
        return
    typer.echo(f"{first.name}  ({first.source})")
    for s, ds in sets.items():
        c, h, w = ds.image_shape
        typer.echo(f"  {s:<6} {len(ds):>8,} images  {c}x{h}x{w} {ds.describe()['dtype']}  {ds.num_classes} classes")
    width = max(len("class"), *(len(c) for c in first.classes)) + 2
    typer.echo("")
    typer.echo("  " + "class".ljust(width) + "".join(f"{s:>9}" for s in sets))
    counts = {s: ds.class_counts() for s, ds in sets.items()}
    for i, cls in enumerate(first.classes):
        typer.echo("  " + cls.ljust(width) + "".join(f"{counts[s][i]:>9,}" for s in sets))
    notes = [n for ds in sets.values() for n in ds.notes]
    for note in dict.fromkeys(notes):
        typer.echo(f"note: {note}")


def _folder_info(folder: Path, split: str | None, image_size, as_json: bool) -> None:
    """``data info`` of an image folder: :func:`imclass.data.inspect.inspect_folder` as a table or JSON."""
    from imclass.data.decode import GREY_MODES
    from imclass.data.folder import parse_image_size
    from imclass.data.inspect import inspect_folder
    from imclass.data.source import choose_mode

    try:
        info = inspect_folder(folder)
        size = parse_image_size(image_size)
    except _USER_ERRORS as err:
        fail(str(err))
    if split:
        wanted = [s.strip() for s in split.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in info["splits"]]
        if unknown:
            fail(f"{folder} has splits {', '.join(info['splits'])}, received --split {split}")
        info["splits"] = {s: info["splits"][s] for s in wanted}
    for part in info["splits"].values():
        part["name"], part["source"] = info["name"], info["source"]
        if size is not None:  # what loading with --image-size gives
            channels = 1 if info["modes"] and all(m in GREY_MODES for m in info["modes"]) else 3
            part["image_shape"] = [channels, *size]
        if part["image_shape"]:  # the tier every command would read this split in (imclass.data.source)
            choice = choose_mode(part["size"], part["image_shape"])
            part["tier"] = {"mode": choice.mode, "stored_bytes": choice.stored_bytes, "line": choice.line()}
    if as_json:
        print_json(info)
        return
    sizes = info["sizes"]
    typer.echo(f"{info['name']}  ({info['source']})  {info['layout']} tree, {info['size']:,} images, "
               f"{len(info['classes'])} classes, {info['bytes'] / 1e6:.1f} MB")
    typer.echo("  formats  " + ", ".join(f"{k} {v:,}" for k, v in info["formats"].items())
               + "   modes  " + ", ".join(f"{k} {v:,}" for k, v in info["modes"].items()))
    if sizes["distinct"]:
        h, w = sizes["height"], sizes["width"]
        common = ", ".join(f"{c['height']}x{c['width']} ({c['count']:,})" for c in sizes["most_common"][:3])
        typer.echo(f"  sizes    {sizes['distinct']} distinct; height {h['min']}-{h['max']} (median {h['median']:g}), "
                   f"width {w['min']}-{w['max']} (median {w['median']:g}); most common {common}")
    for s, part in info["splits"].items():
        shape = "x".join(map(str, part["image_shape"])) if part["image_shape"] else "mixed sizes"
        typer.echo(f"  {s:<6} {part['size']:>8,} images  {shape}")
        if "tier" in part:
            typer.echo(f"         {part['tier']['line'].removeprefix('data: ')}")
    width = max(len("class"), *(len(c) for c in info["classes"])) + 2
    typer.echo("")
    typer.echo("  " + "class".ljust(width) + "".join(f"{s:>9}" for s in info["splits"]) + f"{'all':>9}")
    for i, cls in enumerate(info["classes"]):
        typer.echo("  " + cls.ljust(width) + "".join(f"{p['class_counts'][i]:>9,}" for p in info["splits"].values())
                   + f"{info['class_counts'][i]:>9,}")
    for bad in info["unreadable"]:
        typer.secho(f"warning: unreadable: {bad['path']} ({bad['error']})", fg=typer.colors.YELLOW, err=True)
    for note in info["notes"]:
        typer.echo(f"note: {note}")


@data_app.command("check")
def check(
    folder: Path = typer.Argument(..., help="A folder of images: one sub-folder per class, or train/ + val/ (test/)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as one JSON object."),
    near_distance: int = typer.Option(6, "--near-distance", help="Near duplicates: perceptual hashes within N of 64 bits."),
    tiny: int = typer.Option(32, "--tiny", help="Report images with a side shorter than N pixels."),
    shown: int = typer.Option(5, "--show", help="Files listed per finding in the table."),
) -> None:
    """Find unreadable files, exact and near duplicates (within a class, across classes, across
    splits), rare formats, odd sizes, tiny images and class imbalance. Nothing is changed or deleted."""
    from imclass.data.check import CheckOptions, check_folder, format_report

    try:
        report = check_folder(folder, CheckOptions(near_distance=near_distance, tiny=tiny))
    except _USER_ERRORS as err:
        fail(str(err))
    if as_json:
        print_json(report)
    else:
        typer.echo(format_report(report, shown=shown))


@data_app.command("shard")
def shard(
    folder: Path = typer.Argument(..., help="A folder of images: one sub-folder per class, or train/ + val/ (test/)."),
    out: Path = typer.Option(..., "--out", help="New folder for the shards (must not exist; written atomically)."),
    image_size: Optional[str] = typer.Option(None, "--image-size",
                                             help="Re-encode every image at this size (32 or 32x48); default: the files' own bytes."),
    shard_size: str = typer.Option("256MB", "--shard-size", help="Per shard: images (1000) or bytes (256MB, 1GB)."),
    quality: int = typer.Option(90, "--quality", help="JPEG quality when re-encoding (--image-size)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled sample order."),
    as_json: bool = typer.Option(False, "--json", help="Print the index as one JSON object."),
) -> None:
    """Write WebDataset-format tar shards (key.jpg + key.cls, an index.json), one set per split, for the
    stream tier and for many machines (docs/data.md)."""
    from imclass.data.shards import write_shards

    with plain_warnings():
        try:
            index = write_shards(folder, out, image_size=parse_size(image_size), shard_size=shard_size,
                                 quality=quality, seed=seed, verbose=not as_json)
        except (*_USER_ERRORS, FileExistsError) as err:
            fail(str(err))
    if as_json:
        print_json(index)
    else:
        total = sum(s["count"] for s in index["splits"].values())
        typer.echo(f"{out}: {total:,} images of {len(index['classes'])} classes in "
                   + ", ".join(f"{len(s['shards'])} {name} shard(s)" for name, s in index["splits"].items())
                   + f" ({index['seconds']:.1f} s)")

@data_app.command("cache")
def cache(
    folder: Optional[Path] = typer.Argument(None, help="A folder of images (one sub-folder per class, or train/ + test/)."),
    image_size: Optional[str] = _IMAGE_SIZE,
    split: Optional[str] = typer.Option(None, "--split", help="Splits to cache, e.g. train,test (default: all that "
                                        "`imclass train` reads) or all."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder (default: $IMCLASS_CACHE/images, "
                                             "else ~/.cache/imclass/images)."),
    clear: bool = typer.Option(False, "--clear", help="Delete every image cache in the cache folder instead."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Decode a folder once into memory-mapped caches of its resized images (one per split), which
    every later command reading it at that size uses (start-up in well under a second). A cache is
    keyed by the files' paths, sizes and times, the preprocessing and the size: any change makes a
    new one. `--clear` deletes them all."""
    from imclass.data.source import cache_folder, clear_image_cache, find_cache, open_images
    from imclass.data.folder import folder_decoder, folder_images, parse_image_size

    where = cache_folder(cache_dir)
    if clear:
        freed = clear_image_cache(cache_dir)
        if as_json:
            print_json({"cleared": str(where), "bytes": freed})
        else:
            typer.echo(f"cleared {where} ({freed / 1e6:,.1f} MB)")
        return
    if folder is None or image_size is None:
        fail("expected a FOLDER and --image-size SIZE (or --clear)")
    size = parse_image_size(parse_size(image_size))
    rows = []
    for name in _splits_of(str(folder), split):
        try:
            images = folder_images(folder, name)
            decoder = folder_decoder(size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unreadable files are listed in the manifest
                ds = open_images(images, decoder, "cache", cache_dir=cache_dir, verbose=not as_json)
            manifest = find_cache(images, decoder, cache_dir)
        except _USER_ERRORS as err:
            fail(str(err))
        rows.append({"split": name, "images": len(ds), "files": len(images), "shape": list(ds.image_shape),
                     "bytes": ds.nbytes, "file": str(manifest.with_suffix(".npy"))})
    if as_json:
        print_json({"folder": str(folder), "cache_dir": str(where), "splits": rows})
        return
    for r in rows:
        typer.echo(f"{r['split']:<6} {r['images']:>9,} images {'x'.join(map(str, r['shape']))}  "
                   f"{r['bytes'] / 1e6:>10,.1f} MB  {r['file']}")


@data_app.command("show")
def show(
    name: str = _NAME,
    out: Path = typer.Option(Path("grid.png"), "--out", "-o", help="PNG file to write."),
    data: Optional[str] = DataRoot,
    split: str = typer.Option("train", "--split", help="Split to draw from."),
    per_class: int = typer.Option(10, "--per-class", help="Images per class (one row per class)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random choice of images."),
    image_size: Optional[str] = typer.Option(
        None, "--image-size", help=f"Resize every image: 32 or 32x48 (height x width); default for a folder: "
        f"{SHOW_FOLDER_SIZE}, a named data set keeps its size."),
) -> None:
    """Write a PNG grid of example images: one row per class, labelled with the class name.

    A folder is read in part: a seeded, stratified sample of a few times the images shown."""
    import torch

    from imclass.data.catalog import canonical_name
    from imclass.visualize import save_image_grid

    if per_class < 1:
        fail(f"expected --per-class >= 1, received {per_class}")
    limit = None
    if canonical_name(name) is None and Path(name).expanduser().is_dir():
        from imclass.data.inspect import inspect_folder

        image_size = image_size or str(SHOW_FOLDER_SIZE)
        try:
            limit = 3 * per_class * len(inspect_folder(Path(name).expanduser())["classes"])
        except _USER_ERRORS as err:
            fail(str(err))
    ds = _load(name, split, data, image_size, limit=limit, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for c, cls in enumerate(ds.classes):
        idx = torch.nonzero(ds.labels == c).reshape(-1)
        if len(idx):
            pick = idx[torch.randperm(len(idx), generator=gen)[:per_class]]
            rows.append([ds.images[i] for i in pick])
            labels.append(cls)
    _, h, w = ds.image_shape
    path = save_image_grid(rows, out, row_labels=labels, scale=max(1, round(64 / max(h, w))))
    typer.echo(f"wrote {path} ({len(rows)} classes x up to {per_class} images from {ds.name}/{split})")


@data_app.command("download")
def download(
    name: str = typer.Argument(..., help="cifar10, mnist or fashion-mnist."),
    data: Optional[str] = DataRoot,
) -> None:
    """Download a data set's official files into <data root>/<name>/, checking their MD5 sums."""
    from imclass.data import canonical_name, fetch, names

    key = canonical_name(name)
    if key is None:
        fail(f"unknown data set {name!r}: expected one of {', '.join(names())}")
    try:
        folder = fetch(key, data)
    except _USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"{key} is in {folder}")


@data_app.command("list")
def list_() -> None:
    """List the data sets known by name."""
    from imclass.data import CLASSES

    for key, classes in CLASSES.items():
        typer.echo(f"{key:<14} {len(classes)} classes: {', '.join(classes)}")
