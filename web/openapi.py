"""The OpenAPI 3 document, assembled from the operations declared next to each route.

Each API view carries its own operation object (`@operation(...)`), and the document's paths
are built from the app's URL map, so a route cannot exist without being documented (a test
checks both directions).
"""

from __future__ import annotations

import re

from flask import Flask

from recsys.platform.models import FEEDBACK_EVENTS, JOB_STATUSES
from recsys.recommend.request import MAX_K, MAX_QUERY_CHARS

API_PREFIX = "/api/v1"
MAX_BIGINT = 2**63 - 1


def operation(**spec):
    """Attach an OpenAPI operation object to a view function."""

    def decorator(view):
        view.openapi = spec
        return view

    return decorator


def public(view):
    """Mark an API view as open (no API key needed)."""
    view.public = True
    return view


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def error_responses(*statuses: int) -> dict:
    texts = {
        400: "Bad input: malformed JSON, a wrong type, or a value out of range",
        401: "Missing, unknown or revoked API key",
        404: "Not found",
        413: "Request body too large",
        415: "Body is not JSON",
        503: "A backing service is unavailable",
    }
    return {str(s): {"description": texts[s], "content": json_content(ref("Error"))} for s in statuses}


def query_param(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def path_param(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


STOCK_CODE = {"type": "string", "minLength": 1, "maxLength": 64}
CUSTOMER_ID = {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT}

SCHEMAS: dict[str, dict] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "RecommendationRequest": {
        "type": "object",
        "additionalProperties": False,
        "description": "A query, a customer_id, or both. Unknown customers are served as a cold start.",
        "properties": {
            "customer_id": {**CUSTOMER_ID, "nullable": True},
            "query": {"type": "string", "maxLength": MAX_QUERY_CHARS, "nullable": True},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
            "ranker": {"type": "string", "nullable": True, "description": "ranker name; default RECSYS_RANKER"},
            "explain": {"type": "boolean", "default": False},
            "exclude_purchased": {"type": "boolean", "default": False},
        },
    },
    "RecommendationItem": {
        "type": "object",
        "properties": {
            "rank": {"type": "integer"},
            "stock_code": {"type": "string"},
            "description": {"type": "string"},
            "score": {"type": "number", "nullable": True},
            "retrieval_score": {"type": "number", "nullable": True},
            "explanation": {"type": "string", "nullable": True},
        },
    },
    "RecommendationResult": {
        "type": "object",
        "description": "Everything that explains the answer: request, history, candidates, final order, timings.",
        "properties": {
            "customer_id": {"type": "integer", "nullable": True},
            "query": {"type": "string", "nullable": True},
            "k": {"type": "integer"},
            "ranker": {"type": "string"},
            "model": {"type": "string", "nullable": True},
            "prompt_version": {"type": "string", "nullable": True},
            "cold_start": {"type": "boolean"},
            "notes": {"type": "array", "items": {"type": "string"}},
            "history": {"type": "array", "items": {"type": "object"}},
            "candidates": {"type": "array", "items": {"type": "object"}},
            "items": {"type": "array", "items": ref("RecommendationItem")},
            "raw_output": {"nullable": True},
            "flags": {"type": "object"},
            "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    },
    "Submission": {
        "type": "object",
        "required": ["status", "cached"],
        "properties": {
            "job_id": {"type": "string", "format": "uuid", "nullable": True},
            "status": {"type": "string", "enum": list(JOB_STATUSES)},
            "cached": {"type": "boolean"},
            "created": {"type": "boolean"},
            "status_url": {"type": "string", "nullable": True},
            "result": {**ref("RecommendationResult"), "nullable": True},
        },
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "kind": {"type": "string"},
            "status": {"type": "string", "enum": list(JOB_STATUSES)},
            "request": {"type": "object"},
            "result": {**ref("RecommendationResult"), "nullable": True},
            "error": {"type": "string", "nullable": True},
            "attempts": {"type": "integer"},
            "timings": {"type": "object", "nullable": True},
            "worker": {"type": "string", "nullable": True},
        },
    },
    "Product": {
        "type": "object",
        "properties": {
            "stock_code": {"type": "string"},
            "description": {"type": "string"},
            "price": {"type": "number", "nullable": True},
            "purchase_count": {"type": "integer"},
            "quantity_total": {"type": "integer"},
            "customer_count": {"type": "integer"},
            "is_non_product": {"type": "boolean"},
            "embedded": {"type": "boolean"},
            "embedding_model": {"type": "string", "nullable": True},
        },
    },
    "Hit": {
        "type": "object",
        "properties": {
            "stock_code": {"type": "string"},
            "description": {"type": "string"},
            "score": {"type": "number"},
        },
    },
    "Hits": {
        "type": "object",
        "properties": {"count": {"type": "integer"}, "items": {"type": "array", "items": ref("Hit")}},
    },
    "HistoryEntry": {
        "type": "object",
        "properties": {
            "stock_code": {"type": "string"},
            "description": {"type": "string"},
            "last_purchased_at": {"type": "string"},
            "quantity": {"type": "integer"},
            "times_bought": {"type": "integer"},
        },
    },
    "FeedbackEvent": {
        "type": "object",
        "additionalProperties": False,
        "required": ["event", "stock_code"],
        "properties": {
            "event": {"type": "string", "enum": list(FEEDBACK_EVENTS)},
            "stock_code": STOCK_CODE,
            "customer_id": {**CUSTOMER_ID, "nullable": True},
            "job_id": {"type": "string", "format": "uuid", "nullable": True},
            "position": {"type": "integer", "minimum": 1, "maximum": 1000, "nullable": True},
        },
    },
    "Health": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "warming", "unavailable"]},
            "database": {"type": "object"},
            "broker": {"type": "object"},
            "worker": {"type": "object"},
        },
    },
}

_CONVERTER = re.compile(r"<(?:[a-z_]+:)?([a-z_]+)>")


def openapi_path(rule: str) -> str:
    """Flask rule → OpenAPI path relative to the API prefix: /api/v1/jobs/<uuid:job_id> → /jobs/{job_id}."""
    return _CONVERTER.sub(r"{\1}", rule[len(API_PREFIX):]) or "/"


def api_routes(app: Flask) -> list[tuple[str, str, str]]:
    """(OpenAPI path, lower-case method, endpoint) of every route under the API prefix."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX + "/"):
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((openapi_path(rule.rule), method.lower(), rule.endpoint))
    return routes


def build_document(app: Flask) -> dict:
    paths: dict[str, dict] = {}
    for path, method, endpoint in api_routes(app):
        view = app.view_functions[endpoint]
        spec = getattr(view, "openapi", None)
        if spec is None:
            continue
        op = {"operationId": endpoint.replace(".", "_") + ("" if method == "get" else f"_{method}"), **spec}
        if getattr(view, "public", False):
            op["security"] = []
        else:
            op.setdefault("responses", {}).setdefault("401", error_responses(401)["401"])
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "recsys API",
            "version": "1.0.0",
            "description": (
                "Personalized product recommendations: pgvector retrieval, reranked by a Gemma model in a "
                "Celery worker. Send `Authorization: Bearer <key>` (create one with `recsys apikey create NAME`). "
                "Prometheus metrics are at /metrics. Errors are `{\"error\": {\"code\", \"message\"}}`."
            ),
        },
        "servers": [{"url": API_PREFIX}],
        "security": [{"bearerAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
