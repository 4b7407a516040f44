"""The one folder walk: every path that lists the image files of a user's folder goes through here
(``data.load`` on folders, ``data info/check``, ``train FOLDER``, ``predict FOLDER``, label review).

    found = walk_images("photos/daisy")          # Walk(files=[...sorted...], skipped=[(path, kind), ...])
    found.message("photos")                      # None, or one line naming every skipped entry by kind
    listing = walk_classes("photos", ["daisy", "roses"])   # files + class indices, one walk for all classes

Rules, the same everywhere:

* a symbolic link to a folder is followed, but each real folder (device + inode) is read **once**: a
  link back up the tree (``ln -s .. photos/daisy/loop``), or a second link to a folder already read,
  is skipped as ``"repeated folder"`` (within a folder, real sub-folders are read before links); ``walk_classes`` marks the root and every class folder as read
  before it starts, so a link from one class into another never relabels images;
* only **regular files** are listed (a FIFO, socket or device named ``x.jpg`` is skipped, never
  opened); symbolic links to files are followed; a broken link is skipped;
* hidden entries (names starting with ``.``) and files whose names are not images
  (``IMAGE_EXTENSIONS``) are skipped too; every skipped entry is kept, by kind, for one message.
"""
from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter, methodcaller
from pathlib import Path
from typing import Iterable, Iterator, Sequence, overload

from imclass.data.decode import IMAGE_EXTENSIONS

__all__ = ["SKIP_KINDS", "ClassWalk", "PathTable", "Walk", "skip_message", "take_paths", "walk_classes", "walk_images"]

SKIP_KINDS = {  # kind -> how the message describes it, in the order the message lists them
    "repeated folder": "folder already read (a symlink loop or a second link to it)",
    "not a regular file": "not a regular file (FIFO, socket or device)",
    "broken link": "broken symbolic link",
    "unreadable": "cannot be read (permissions)",
    "not an image name": f"not an image file name ({' '.join(IMAGE_EXTENSIONS)})",
    "hidden": "hidden (name starts with '.')",
}
_SHOWN = 3  # entries named per kind before "..."


class PathTable(Sequence[Path]):
    """The paths of a listing kept as their text (``os.fspath``), each ``Path`` made when it is read: a
    folder of 100,000 photos lists without building 100,000 ``Path`` objects first (0.5 s, 0.2 KB each).

    A read-only sequence of ``Path`` (index, slice, iterate, ``==`` a list of paths); ``take`` keeps rows.
    """

    __slots__ = ("texts",)

    def __init__(self, texts: Iterable[str | os.PathLike] = ()) -> None:
        self.texts = [t if type(t) is str else os.fspath(t) for t in texts]

    def __len__(self) -> int:
        return len(self.texts)

    @overload
    def __getitem__(self, i: int) -> Path: ...

    @overload
    def __getitem__(self, i: slice) -> "PathTable": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PathTable(self.texts[i])
        return Path(self.texts[i])

    def __iter__(self) -> Iterator[Path]:
        return map(Path, self.texts)

    def __add__(self, other: Sequence[str | os.PathLike]) -> "PathTable":
        return PathTable([*self.texts, *(other.texts if isinstance(other, PathTable) else other)])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathTable):
            return self.texts == other.texts
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(Path(a) == b for a, b in zip(self.texts, other))
        return NotImplemented

    __hash__ = None  # mutable contents, like a list

    def take(self, indices: Iterable[int]) -> "PathTable":
        """The paths at ``indices``, in that order."""
        texts = self.texts
        return PathTable([texts[int(i)] for i in indices])

    def __repr__(self) -> str:
        shown = ", ".join(repr(t) for t in self.texts[:3])
        return f"PathTable([{shown}{', ...' if len(self) > 3 else ''}], {len(self):,} paths)"


def take_paths(paths: Sequence[Path], indices: Iterable[int]) -> Sequence[Path]:
    """``paths`` at ``indices`` (a ``PathTable`` stays one, without making its ``Path`` objects)."""
    if isinstance(paths, PathTable):
        return paths.take(indices)
    return [paths[int(i)] for i in indices]


@dataclass
class Walk:
    """Image files found (sorted) and every entry skipped, as ``(path, kind)`` with kind in ``SKIP_KINDS``;
    ``stats[i]`` is ``(os.fspath(files[i]), st_size, st_mtime_ns)`` from the walk's one ``stat`` of the
    file (what a cache key needs, so that nothing stats the files again or formats their paths)."""

    files: PathTable = field(default_factory=PathTable)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    stats: list[tuple[str, int, int]] = field(default_factory=list)

    def message(self, root: str | os.PathLike | None = None) -> str | None:
        """One line naming every skipped entry by kind (paths relative to ``root``), or None."""
        return skip_message(self.skipped, root)


@dataclass
class ClassWalk:
    """The image files of a class-per-folder tree: ``paths`` (sorted within each class), ``labels``
    (class index per path) and the ``skipped`` entries of all class folders."""

    paths: PathTable
    labels: list[int]
    skipped: list[tuple[Path, str]]
    stats: list[tuple[str, int, int]] = field(default_factory=list)  # (os.fspath(path), st_size, st_mtime_ns)

    def message(self, root: str | os.PathLike | None = None) -> str | None:
        """One line naming every skipped entry by kind, or None."""
        return skip_message(self.skipped, root)


def relative_name(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` as text (the whole path when it is not under ``root``)."""
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def skip_message(skipped: Sequence[tuple[Path, str]], root: str | os.PathLike | None = None) -> str | None:
    """``"skipped 4 entries under photos: 1 not a regular file (...): daisy/x.jpg; 3 hidden (...): ..."``."""
    if not skipped:
        return None
    root_p = Path(root) if root is not None else None
    counts = Counter(kind for _, kind in skipped)
    parts = []
    for kind, described in SKIP_KINDS.items():
        if kind not in counts:
            continue
        named = [relative_name(p, root_p) for p, k in skipped if k == kind]
        more = f", ... ({len(named) - _SHOWN} more)" if len(named) > _SHOWN else ""
        parts.append(f"{counts[kind]} {described}: {', '.join(named[:_SHOWN])}{more}")
    where = f" under {root_p}" if root_p is not None else ""
    n = len(skipped)
    return f"skipped {n} entr{'y' if n == 1 else 'ies'}{where}: " + "; ".join(parts)


def _dir_id(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


_STAT_AT = os.stat in os.supports_dir_fd and os.scandir in os.supports_fd and hasattr(os, "O_DIRECTORY")
_by_name = attrgetter("name")
_is_link = methodcaller("is_symlink")  # from the directory entry's type: no system call


def walk_images(root: str | os.PathLike, *, seen: set[tuple[int, int]] | None = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Walk:
    """Image files under ``root`` (recursively, following folder links once per real folder, sorted).

    ``seen`` holds the (device, inode) of folders already read; pass one set to several walks to read
    each real folder once across all of them (``root`` itself is added). A ``root`` that is not a
    folder gives an empty walk.
    """
    seen = set() if seen is None else seen
    walk = Walk()
    root = Path(root)
    start = _dir_id(root)
    if start is None:
        return walk
    seen.add(start)
    # an image name (is_image_name: not hidden, skipped above, and one of IMAGE_EXTENSIONS) with one of
    # ``extensions``: extensions are single suffixes, so one endswith of the shared ones says both
    wanted = tuple(e.lower() for e in extensions if e.lower() in IMAGE_EXTENSIONS)
    found: list[tuple[tuple[str, ...], tuple[str, int, int]]] = []  # (parts below root, stats)
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    # Per entry: one stat (it follows links and never opens the file) and nothing else; the path is
    # kept as the entry's text (a PathTable, no Path object) and sorted by its parts below root,
    # which is Path's own order (start-up on an existing cache is this walk plus one hash).
    while stack:
        folder, parts = stack.pop()
        base = os.fspath(folder)
        # os.fspath(folder / name): name itself under ".", base + name under "/", else base + "/" + name
        prefix = "" if base == "." else base if base.endswith(os.sep) else base + os.sep
        dir_fd = None
        try:
            if _STAT_AT:  # stat each name relative to the open folder: no walk of the whole path per file
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            with os.scandir(folder if dir_fd is None else dir_fd) as it:
                entries = sorted(it, key=_by_name)
            entries.sort(key=_is_link)  # stable: real entries first (real folders claim themselves), each part by name
        except OSError:
            if dir_fd is not None:
                os.close(dir_fd)
            walk.skipped.append((folder, "unreadable"))
            continue
        subfolders = []
        try:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    walk.skipped.append((folder / name, "hidden"))
                    continue
                try:
                    # follows links; never opens the file
                    st = os.stat(prefix + name) if dir_fd is None else os.stat(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    walk.skipped.append((folder / name, "broken link"))
                    continue
                except OSError:
                    walk.skipped.append((folder / name, "unreadable"))
                    continue
                mode = st.st_mode
                if stat.S_ISREG(mode):
                    if name.lower().endswith(wanted):
                        found.append(((*parts, name), (prefix + name, st.st_size, st.st_mtime_ns)))
                    else:
                        walk.skipped.append((folder / name, "not an image name"))
                elif stat.S_ISDIR(mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        walk.skipped.append((folder / name, "repeated folder"))
                    else:
                        seen.add(key)
                        subfolders.append((folder / name, (*parts, name)))
                else:
                    walk.skipped.append((folder / name, "not a regular file"))
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        stack.extend(reversed(subfolders))
    found.sort(key=lambda f: f[0])  # the parts below root: the order of sorting the Paths themselves
    walk.stats = [f[1] for f in found]
    walk.files = PathTable([f[1][0] for f in found])
    walk.skipped.sort()
    return walk


def walk_classes(folder: str | os.PathLike, classes: Sequence[str]) -> ClassWalk:
    """Image files under ``folder/<class>/`` for each class (a missing class folder has none).

    The root and every class folder count as read before the walk starts: a link from one class
    into another, or back up to the root, is skipped rather than read again under the wrong label.
    """
    folder = Path(folder)
    seen: set[tuple[int, int]] = set()
    for d in [folder] + [folder / c for c in classes]:
        key = _dir_id(d)
        if key is not None:
            seen.add(key)
    texts: list[str] = []
    labels: list[int] = []
    skipped: list[tuple[Path, str]] = []
    stats: list[tuple[str, int, int]] = []
    done: set[tuple[int, int]] = set()
    for label, name in enumerate(classes):
        class_dir = folder / name
        key = _dir_id(class_dir)
        if key is None:
            continue
        if key in done:  # a class folder that links to another class folder
            skipped.append((class_dir, "repeated folder"))
            continue
        done.add(key)
        seen.discard(key)  # this class's own folder is read now
        found = walk_images(class_dir, seen=seen)
        texts += found.files.texts
        labels += [label] * len(found.files)
        skipped += found.skipped
        stats += found.stats
    return ClassWalk(PathTable(texts), labels, skipped, stats)
