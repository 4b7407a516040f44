"""The review page served, with decisions: a person accepts or rejects each suggestion; every
decision rewrites the plan ``relabel.csv`` in the review folder (atomically).

    app = create_review_app("review_out")               # a folder written by `imclass review ... --out`
    uvicorn.run(app, host="127.0.0.1", port=8765)       # what `imclass review ... --serve` does

Endpoints: ``GET /`` (the page with Accept / Reject buttons), ``GET /api/decisions``,
``POST /api/decision`` (JSON ``{"id": n, "decision": "accept" | "reject" | "undecided"}``).
The server binds to 127.0.0.1 by default: it can move files once the plan is applied.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from imclass.review.page import PAGE_FILE, REVIEW_FILE
from imclass.review.plan import destination_for, write_plan
from imclass.review.plan import read_plan

__all__ = ["PLAN_FILE", "create_review_app"]

PLAN_FILE = "relabel.csv"


class Decision(BaseModel):
    """One person's decision on one finding (``id`` from review.json)."""

    id: int
    decision: str


def create_review_app(folder: str | Path) -> FastAPI:
    """A FastAPI app serving the review in ``folder`` (``review.json`` + ``index.html``) and recording decisions."""
    folder = Path(folder)
    review_path, page_path = folder / REVIEW_FILE, folder / PAGE_FILE
    if not review_path.is_file() or not page_path.is_file():
        raise FileNotFoundError(f"{folder} holds no review ({REVIEW_FILE}, {PAGE_FILE}): run imclass review DATA --out {folder}")
    review = json.loads(review_path.read_text())
    if not review.get("root"):
        raise ValueError(f"{folder}: a review of {review.get('source')} has no files to relabel (only folders can be fixed)")
    issues = {int(i["id"]): i for i in review["issues"]}
    page = page_path.read_text().replace('<body data-state="loading">', '<body data-state="loading" data-api="1">', 1)
    decisions: dict[int, str] = {}
    plan_path = folder / PLAN_FILE
    if plan_path.is_file():  # a served review remembers what was decided before
        by_path = {(i["path"], i["suggested"]): n for n, i in issues.items()}
        for row in read_plan(plan_path):
            n = by_path.get((row["path"], row["suggested"]))
            if n is not None:
                decisions[n] = row["decision"]
    lock = threading.Lock()
    app = FastAPI(title="imclass review", docs_url=None, redoc_url=None)

    def rows() -> list[dict[str, Any]]:
        out = []
        for n in sorted(decisions):
            i = issues[n]
            out.append({"root": review["root"], "path": i["path"], "given": i["given"], "suggested": i["suggested"],
                        "destination": destination_for(i["path"], i["given"], i["suggested"]),
                        "sha256": i["sha256"], "decision": decisions[n]})
        return out

    def state() -> dict[str, Any]:
        values = list(decisions.values())
        return {"plan": str(plan_path), "accepted": values.count("accept"), "rejected": values.count("reject"),
                "decisions": {str(k): v for k, v in decisions.items()}}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/decisions")
    def get_decisions() -> dict[str, Any]:
        return state()

    @app.post("/api/decision")
    def decide(body: Decision) -> dict[str, Any]:
        if body.id not in issues:
            raise HTTPException(404, f"no finding {body.id} in this review")
        issue = issues[body.id]
        if not issue.get("suggested") or not issue.get("path"):
            raise HTTPException(422, f"finding {body.id} has no suggested class to move the file to")
        if body.decision not in ("accept", "reject", "undecided"):
            raise HTTPException(422, f"expected decision accept, reject or undecided, received {body.decision!r}")
        with lock:
            if body.decision == "accept":
                for n, d in decisions.items():  # one file, one new class
                    if n != body.id and d == "accept" and issues[n]["path"] == issue["path"]:
                        raise HTTPException(409, f"{issue['path']} is already accepted for {issues[n]['suggested']}")
            if body.decision == "undecided":
                decisions.pop(body.id, None)
            else:
                decisions[body.id] = body.decision
            write_plan(plan_path, rows())
            return state()

    return app
