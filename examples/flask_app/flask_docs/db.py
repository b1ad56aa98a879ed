"""The database (SQLAlchemy Core) and the mixbatch extension that writes answers into it.

``embedding`` and ``label`` are the targets of the two kinds of request; the ``mixbatch_*``
columns are optional bookkeeping that the default writer fills when a table has them (the
outcome, the request id to look it up with, and the error of a failed request).
"""

from typing import Any

import sqlalchemy as sa

from routing.contrib.flask import Mixbatch

metadata = sa.MetaData()

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("task", sa.String(16), nullable=False, default="embed"),
    sa.Column("embedding", sa.JSON, nullable=True),
    sa.Column("label", sa.String(200), nullable=True),
    sa.Column("mixbatch_status", sa.String(16), nullable=False, default="queued"),
    sa.Column("mixbatch_request_id", sa.String(128), nullable=True),
    sa.Column("mixbatch_error", sa.Text, nullable=True),
)

#: Answers may be written into the tables of ``metadata``; it also gains ``mixbatch_applied``.
mixbatch = Mixbatch(metadata=metadata)


def document(conn: sa.Connection, doc_id: int) -> dict[str, Any] | None:
    row = conn.execute(sa.select(documents).where(documents.c.id == doc_id)).mappings().first()
    return None if row is None else as_json(row)


def as_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "text": row["text"],
        "task": row["task"],
        "embedding": row["embedding"],
        "label": row["label"],
        "status": row["mixbatch_status"],
        "request_id": row["mixbatch_request_id"],
        "error": row["mixbatch_error"],
    }
