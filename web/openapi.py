"""The OpenAPI 3.1 document, assembled from the operations declared next to each route.

Each API view carries its own operation object (`@operation(...)`), and the document's paths
are built from the app's URL map, so a route cannot exist without being documented (a test
checks both directions). Operations name their request and response bodies by model class; the
component schemas are those models' own JSON schemas (`recsys.platform.bodies`, `web.responses`).
"""

from __future__ import annotations

import re

from flask import Flask
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from recsys.platform.bodies import CustomerId, StockCode
from web.responses import Error

API_PREFIX = "/api/v1"
REF_TEMPLATE = "#/components/schemas/{model}"


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


def json_content(schema: dict | type[BaseModel]) -> dict:
    """A JSON media type: a model (documented as a component) or an inline schema."""
    return {"application/json": {"schema": schema}}


def request_body(model: type[BaseModel]) -> dict:
    """A required JSON request body validated by `model` (see `web.params.parse_body`)."""
    return {"required": True, "content": json_content(model)}


def error_responses(*statuses: int) -> dict:
    texts = {
        400: "Bad input: malformed JSON, a wrong type, or a value out of range",
        401: "Missing, unknown or revoked API key",
        404: "Not found",
        409: "Conflicts with what is recorded (another customer's job, already purchased, a reused key)",
        413: "Request body too large",
        415: "Body is not JSON",
        503: "A backing service is unavailable",
    }
    return {str(s): {"description": texts[s], "content": json_content(Error)} for s in statuses}


def query_param(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def path_param(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


def _with_refs(node, mode: JsonSchemaMode, models: dict):
    """`node` with each model class replaced by a reference to its component, collecting the models.

    Under a requestBody a model is documented as it validates input, elsewhere as it serializes.
    """
    if isinstance(node, type) and issubclass(node, BaseModel):
        models[(node, mode)] = None
        return {"$ref": REF_TEMPLATE.format(model=node.__name__)}
    if isinstance(node, dict):
        return {key: _with_refs(value, "validation" if key == "requestBody" else mode, models)
                for key, value in node.items()}
    if isinstance(node, list):
        return [_with_refs(value, mode, models) for value in node]
    return node


def component_schemas(models: dict) -> dict[str, dict]:
    """The component schemas of the referenced models and the models they contain, from pydantic.

    A model whose input and output schemas differ would get two components ("-Input", "-Output")
    that the references do not name; that is refused here rather than documented wrongly.
    """
    refs, document = models_json_schema(list(models), ref_template=REF_TEMPLATE)
    for (model, _mode), schema in refs.items():
        if schema["$ref"] != REF_TEMPLATE.format(model=model.__name__):
            raise ValueError(f"{model.__name__} has different input and output schemas; give each its own model")
    return dict(sorted(document.get("$defs", {}).items()))


STOCK_CODE = TypeAdapter(StockCode).json_schema()
CUSTOMER_ID = TypeAdapter(CustomerId).json_schema()

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
    models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
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
        paths.setdefault(path, {})[method] = _with_refs(op, "serialization", models)
    return {
        "openapi": "3.1.0",
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
            "schemas": component_schemas(models),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
