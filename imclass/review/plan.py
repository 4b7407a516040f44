"""Fixing a folder's labels safely: a plan of decisions, ``apply`` (move files), ``undo`` (move them back).

* the plan, ``relabel.csv``: one row per decision a person made on the review page: ``root`` (the
  folder), ``path`` (relative to it), ``given``, ``suggested``, ``destination`` (relative: the same
  file name under the suggested class folder), ``sha256`` of the file when it was reviewed, and
  ``decision`` (``accept`` or ``reject``). Only accepted rows are applied.
* :func:`apply_plan` moves each accepted file into its new class folder (never over another file: a
  taken name gets a ``-1``, ``-2``... suffix) and appends every move to an undo log (JSON lines). A
  file that is missing or whose bytes changed since the review is skipped with a message.
* :func:`undo_log` moves every logged file back, newest first, when its bytes are still the ones
  moved; renames keep the bytes, so the folder is restored byte for byte.

Nothing is ever deleted or overwritten.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from imclass.review.find import sha256_of

__all__ = ["PLAN_COLUMNS", "Outcome", "apply_plan", "destination_for", "read_plan", "undo_log", "write_plan"]

PLAN_COLUMNS = ("root", "path", "given", "suggested", "destination", "sha256", "decision")
DECISIONS = ("accept", "reject")


@dataclass
class Outcome:
    """What ``apply_plan`` or ``undo_log`` did: files moved, ``skipped`` messages, the log written."""

    moved: list[tuple[str, str]] = field(default_factory=list)  # (from, to), relative to the root
    skipped: list[str] = field(default_factory=list)
    log: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"moved": [{"from": a, "to": b} for a, b in self.moved], "skipped": self.skipped,
                "log": str(self.log) if self.log else None}


def destination_for(path: str, given: str, suggested: str) -> str:
    """The relative path of ``path`` (``[split/]given/.../name``) moved under the ``suggested`` class folder."""
    parts = list(PurePosixPath(path).parts)
    for k in (0, 1):
        if len(parts) > k + 1 and parts[k] == given:
            return str(PurePosixPath(*parts[:k], suggested, *parts[k + 1:]))
    raise ValueError(f"{path}: expected it under a {given!r} class folder")


def write_plan(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Write the plan (atomically) with :data:`PLAN_COLUMNS`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PLAN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, path)
    return path


def read_plan(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a plan; a ValueError names what is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such plan: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PLAN_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: expected the columns {', '.join(PLAN_COLUMNS)}; missing {', '.join(missing)}")
        rows = list(reader)
    for n, row in enumerate(rows, 2):
        if row["decision"] not in DECISIONS:
            raise ValueError(f"{path}, line {n}: expected decision accept or reject, received {row['decision']!r}")
        for key in ("path", "destination"):
            p = PurePosixPath(row[key])
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"{path}, line {n}: expected a {key} inside the folder, received {row[key]!r}")
    return rows


def _sha256(path: Path) -> str:
    return sha256_of(path)


def _free_name(target: Path) -> Path:
    """``target``, or ``name-1.ext``, ``name-2.ext``... when taken."""
    n = 0
    candidate = target
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
    return candidate


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` without ever replacing a file (hard link + unlink where the file system allows)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)  # fails if dst exists: nothing is overwritten; a link stays a link
    except FileExistsError:
        raise
    except OSError:
        if dst.exists():
            raise FileExistsError(dst)
        os.rename(src, dst)
        return
    os.unlink(src)


def apply_plan(plan: str | os.PathLike, log: str | os.PathLike | None = None) -> Outcome:
    """Move the accepted files of ``plan`` into their new class folders; the undo log (JSON lines) goes to
    ``log`` (default: ``undo-<time>.jsonl`` beside the plan). Returns what was moved and skipped."""
    plan = Path(plan)
    rows = [r for r in read_plan(plan) if r["decision"] == "accept"]
    log = Path(log) if log else plan.with_name(f"undo-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    out = Outcome(log=log)
    with open(log, "a") as journal:
        for row in rows:
            root = Path(row["root"])
            src, dst = root / row["path"], root / row["destination"]
            if not src.is_file():
                out.skipped.append(f"{row['path']}: not there any more; skipped")
                continue
            if _sha256(src) != row["sha256"]:
                out.skipped.append(f"{row['path']}: changed since the review (its bytes differ); skipped")
                continue
            final = _free_name(dst)
            _move(src, final)
            rel = str(PurePosixPath(final.relative_to(root)))
            journal.write(json.dumps({"root": str(root), "from": row["path"], "to": rel, "sha256": row["sha256"],
                                      "time": time.time()}) + "\n")
            journal.flush()
            out.moved.append((row["path"], rel))
    return out


def undo_log(log: str | os.PathLike) -> Outcome:
    """Move every file of an undo log back where it was (newest move first). A file that is gone, changed,
    or whose old place is taken is skipped with a message; nothing is overwritten."""
    log = Path(log)
    if not log.is_file():
        raise FileNotFoundError(f"no such undo log: {log}")
    entries = []
    for n, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries.append((entry["root"], entry["from"], entry["to"], entry["sha256"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{log}, line {n}: not an undo entry ({err})") from None
    out = Outcome(log=log)
    for root, old, new, digest in reversed(entries):
        root = Path(root)
        src, dst = root / new, root / old
        if not src.is_file():
            out.skipped.append(f"{new}: not there any more; skipped")
            continue
        if _sha256(src) != digest:
            out.skipped.append(f"{new}: changed since it was moved; skipped")
            continue
        if dst.exists():
            out.skipped.append(f"{old}: a file is there again; {new} left where it is")
            continue
        _move(src, dst)
        out.moved.append((new, old))
    return out
