"""A small JSON API: POST a document, GET it back once mixbatch has filled it in.

POST /documents         {"text": "...", "task": "embed" | "classify", "lane": "standard"}
GET  /documents/<id>    the row: status queued, then done (or failed) with the answer
"""

from typing import Any

import sqlalchemy as sa
from flask import Blueprint, abort, request

from flask_docs.db import as_json, document, documents, mixbatch
from flask_docs.requests import TASKS
from routing.client import InvalidRequest

bp = Blueprint("documents", __name__)


@bp.post("/documents")
def create() -> tuple[dict[str, Any], int]:
    data = request.get_json(silent=True) or {}
    text, task = data.get("text"), data.get("task", "embed")
    if not isinstance(text, str) or not text.strip():
        return {"error": "text: a non-empty string is required"}, 400
    if task not in TASKS:
        return {"error": f"task: one of {sorted(TASKS)}"}, 400
    field, build = TASKS[task]
    try:
        with mixbatch.transaction() as conn:
            insert = documents.insert().values(text=text, task=task)
            doc_id = conn.execute(insert).inserted_primary_key[0]
            # Checked now, submitted when this block commits: no row, no request.
            pending = mixbatch.enqueue(
                documents, doc_id, field, lane=data.get("lane"), **build(text)
            )
            row = document(conn, doc_id)
    except InvalidRequest as exc:  # e.g. an unknown lane; the row was rolled back too
        return {"error": str(exc)}, 400
    return {**(row or {}), "request_id": pending.id}, 201


@bp.get("/documents")
def index() -> dict[str, Any]:
    with mixbatch.engine.connect() as conn:
        rows = conn.execute(sa.select(documents).order_by(documents.c.id.desc()).limit(50))
        return {"documents": [as_json(r) for r in rows.mappings()]}


@bp.get("/documents/<int:doc_id>")
def show(doc_id: int) -> dict[str, Any]:
    with mixbatch.engine.connect() as conn:
        row = document(conn, doc_id)
    if row is None:
        abort(404)
    return row
