"""A small JSON API: POST a document, GET it back once mixbatch has filled it in.

POST /documents/        {"text": "...", "task": "embed" | "classify", "lane": "standard"}
GET  /documents/<id>/   the row: status queued, then done (or failed) with the answer
"""

import json

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from docs.models import Document
from docs.requests import TASKS
from routing.client import InvalidRequest
from routing.contrib.django import enqueue


@csrf_exempt  # a JSON API for curl; a real one would authenticate its callers
@require_http_methods(["GET", "POST"])
def documents(request: HttpRequest) -> JsonResponse:
    if request.method == "GET":
        rows = Document.objects.order_by("-pk")[:50]
        return JsonResponse({"documents": [d.as_json() for d in rows]})
    try:
        data = json.loads(request.body or b"{}")
    except json.JSONDecodeError:
        return JsonResponse({"error": "the body is not JSON"}, status=400)
    text, task = data.get("text"), data.get("task", "embed")
    if not isinstance(text, str) or not text.strip():
        return JsonResponse({"error": "text: a non-empty string is required"}, status=400)
    if task not in TASKS:
        return JsonResponse({"error": f"task: one of {sorted(TASKS)}"}, status=400)
    field, build = TASKS[task]
    try:
        with transaction.atomic():
            doc = Document.objects.create(text=text, task=task)
            # Checked now, submitted when this block commits: no row, no request.
            pending = enqueue(doc, field, lane=data.get("lane"), **build(text))
    except InvalidRequest as exc:  # e.g. an unknown lane; the row was rolled back too
        return JsonResponse({"error": str(exc)}, status=400)
    body = doc.as_json() | {"request_id": pending.id}
    return JsonResponse(body, status=201)


@require_http_methods(["GET"])
def document(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse(get_object_or_404(Document, pk=pk).as_json())
