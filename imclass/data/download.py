"""Where data lives and how it gets there: the data root, official URLs, checksums, extraction.

A file is downloaded to a temporary name in its final folder, its MD5 checked while it streams,
and only then renamed into place, so a partial or corrupt download never masquerades as data.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Deferred imports (inside functions), for start-up time: tqdm.auto
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

DEFAULT_ROOT = "~/.cache/imclass"
ENV_VAR = "IMCLASS_DATA"
CACHE_ENV_VAR = "IMCLASS_CACHE"  # where small state is remembered (checksums verified once); default DEFAULT_ROOT
DIGESTS_FILE = "digests.json"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A data file could not be fetched, or its checksum did not match."""


@dataclass(frozen=True)
class Resource:
    """One official distribution file: its name, where to fetch it, its MD5 sum."""

    filename: str
    url: str
    md5: str
    extracts_to: str = ""  # for an archive: the folder it unpacks to (its presence means "already there")


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # the mirror torchvision uses
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

RESOURCES: dict[str, tuple[Resource, ...]] = {
    "cifar10": (
        Resource(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            extracts_to="cifar-10-batches-py",
        ),
    ),
    "mnist": tuple(
        Resource(f, _MNIST_URL + f, md5)
        for f, md5 in (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        )
    ),
    "fashion-mnist": tuple(
        Resource(f, _FASHION_URL + f, md5)
        for f, md5 in (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        )
    ),
}


# Other official layouts of the same data, fetched with fetch(name, fmt=...): the default is RESOURCES[name].
FORMATS: dict[str, dict[str, tuple[Resource, ...]]] = {
    "cifar10": {
        "python": RESOURCES["cifar10"],
        # 3,073-byte records (label byte, R, G, B planes); its files' SHA-1 are checked when read
        "binary": (
            Resource(
                "cifar-10-binary.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
                extracts_to="cifar-10-batches-bin",
            ),
        ),
    },
}


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` when given, else ``$IMCLASS_DATA``, else ``~/.cache/imclass``."""
    if root is None or str(root) == "":
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser()


def cache_dir() -> Path:
    """The folder for small remembered state: ``$IMCLASS_CACHE``, else ``~/.cache/imclass``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_ROOT).expanduser()


def recall(file: str, key: str):
    """The value remembered under ``key`` in ``cache_dir()/file`` (a small JSON object), or None."""
    try:
        known = json.loads((cache_dir() / file).read_text())
    except (OSError, ValueError):
        return None
    return known.get(key) if isinstance(known, dict) else None


def remember(file: str, key: str, value) -> None:
    """Store ``value`` (JSON-ready) under ``key`` in ``cache_dir()/file``; silently skipped when it cannot be written.

    The file is replaced atomically: concurrent readers see the old or the new record, never half of one.
    """
    record = cache_dir() / file
    try:
        known = json.loads(record.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    known[key] = value
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{record.name}.", dir=record.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=0, sort_keys=True)
        os.replace(tmp, record)
    except OSError:
        pass


def cached_digest(path: str | os.PathLike, kind: str, compute) -> str:
    """The digest ``kind`` (e.g. ``"sha1"``, ``"sha256:x_train"``) of file ``path``, computed by ``compute()``
    once per file state and remembered in ``cache_dir()/digests.json``, keyed by path, size and mtime.

    The data folder may be read-only, so the record lives in the cache folder; when that cannot be
    written either, the digest is simply computed again next time.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{kind}"
    state = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = recall(DIGESTS_FILE, key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in state.items()) and "digest" in entry:
        return str(entry["digest"])
    digest = compute()
    remember(DIGESTS_FILE, key, state | {"digest": digest})
    return digest


def md5sum(path: str | os.PathLike) -> str:
    """The hex MD5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fix_hint(dest: Path) -> str:
    return (
        f"put the file at {dest} yourself (from the URL above or a copy), "
        f"or point root= / --data / ${ENV_VAR} at a folder that already holds it"
    )


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None, *, sha256: str | None = None,
                  timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, checking ``md5`` and/or ``sha256`` while it streams; nothing appears at
    ``dest`` unless it all succeeds.

    Raises DownloadError naming the file, the URL, what was expected and how to fix it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h, h256 = hashlib.md5(), hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with _progress(total, dest.name) as bar:
                        for chunk in iter(lambda: response.read(_CHUNK), b""):
                            out.write(chunk)
                            h.update(chunk)
                            h256.update(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", err)
                raise DownloadError(
                    f"could not download {dest.name} from {url} ({reason}). "
                    f"If this machine is offline, {_fix_hint(dest)}"
                ) from err
        if md5 is not None and h.hexdigest() != md5:
            raise DownloadError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected MD5 {md5}, "
                f"received {h.hexdigest()} (the partial or corrupt file was deleted). "
                f"Try again later, or {_fix_hint(dest)}"
            )
        if sha256 is not None and h256.hexdigest() != sha256.lower():
            raise DownloadError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected SHA-256 {sha256.lower()}, "
                f"received {h256.hexdigest()} (the partial or corrupt file was deleted). "
                f"Try again later, or {_fix_hint(dest)}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _progress(total: int | None, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and tests
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def check_file(path: Path, md5: str) -> None:
    """Raise DownloadError when the file at ``path`` does not have the expected MD5."""
    got = md5sum(path)
    if got != md5:
        raise DownloadError(
            f"checksum mismatch for {path}: expected MD5 {md5}, received {got}; "
            f"delete the file to download it again, or replace it with the official one"
        )


def extract_tar(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract a .tar.gz into ``dest_dir`` through a temporary folder, so a half extraction never shows."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                if hasattr(tarfile, "data_filter"):  # no absolute paths, links out of the folder or devices
                    tar.extractall(tmp, filter="data")
                else:  # Python < 3.10.12 / 3.11.4
                    tar.extractall(tmp)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DownloadError(f"could not extract {archive} ({err}); delete it to download it again") from err
        for entry in tmp.iterdir():
            target = dest_dir / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def fetch(name: str, root: str | os.PathLike | None = None, *, force: bool = False, fmt: str | None = None) -> Path:
    """Download (and for CIFAR-10 extract) the official files of data set ``name`` into ``<root>/<name>/``.

    Files already present are kept unless ``force``. ``fmt`` picks another official layout where there
    is one (CIFAR-10: ``"python"``, the default, or ``"binary"``). Returns the data set's folder.
    """
    if name not in RESOURCES:
        raise ValueError(f"unknown data set {name!r} to download: expected one of {', '.join(RESOURCES)}")
    resources = RESOURCES[name]
    if fmt is not None:
        formats = FORMATS.get(name, {})
        if fmt not in formats:
            raise ValueError(f"unknown format {fmt!r} for {name}: expected one of {', '.join(formats) or '(none)'}")
        resources = formats[fmt]
    folder = resolve_root(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for res in resources:
        dest = folder / res.filename
        if res.extracts_to and (folder / res.extracts_to).is_dir() and not force:
            continue
        if force or not dest.exists():
            try:
                download_file(res.url, dest, res.md5)
            except DownloadError as err:
                if len(resources) == 1:
                    raise
                needed = ", ".join(r.filename for r in resources)
                raise DownloadError(f"{err} ({name} needs all of {needed} in {folder})") from err.__cause__
        else:
            check_file(dest, res.md5)
        if res.extracts_to:
            extract_tar(dest, folder)
            dest.unlink()  # the extracted files are the data; the archive is not needed any more
    return folder
