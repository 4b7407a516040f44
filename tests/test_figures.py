"""README's and bench/RESULTS.md's figure tables are what the result files say (bench/figures.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import figures  # noqa: E402

PROVENANCE = ("date_utc", "commit", "dirty", "cpu", "versions", "threads", "blas")


def test_the_published_tables_match_the_result_files():
    assert figures.check() == []


def test_every_published_figure_has_its_file_and_every_pending_one_its_command():
    for fig in figures.FIGURES:
        assert fig.file, fig.what
        if fig.pending is None:
            assert (ROOT / fig.file).is_file(), fig.file
        else:
            assert fig.command and fig.file in fig.command and fig.minutes, fig.what
    rendered = figures.rows()
    assert len(rendered) == len(figures.FIGURES)
    published = [r for r in rendered if not r[1].startswith("pending")]
    assert published and all(r[3].strip("`") in {f.file for f in figures.FIGURES} for r in published)


def test_result_files_written_through_bench_host_are_self_describing():
    files = [p for p in (ROOT / "bench").rglob("*.json") if "host" in json.loads(p.read_text())]
    for path in files:
        record = json.loads(path.read_text())["host"]
        missing = [k for k in PROVENANCE if k not in record]
        assert not missing, (path, missing)
        assert record["cpu"]["model"] and len(record["commit"] or "") == 40, path
