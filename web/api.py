"""JSON API under /api/v1. Each view parses, calls the core, and formats; its OpenAPI operation sits on top."""

from __future__ import annotations

import json

from flask import Blueprint, current_app, g, jsonify, request, url_for

from recsys import feedback as feedback_events
from recsys import jobs
from recsys.catalog import history as customer_histories
from recsys.catalog import listing, retrieval
from recsys.discover.request import DiscoverRequest
from recsys.jobs.queries import get_job_json
from recsys.platform.bodies import MAX_BIGINT
from recsys.recommend.request import IDEMPOTENCY_KEY, MAX_QUERY_CHARS, RecommendationRequest
from web import health as health_checks
from web.errors import ApiError
from web.metrics import count_recommendation
from web.openapi import (
    CUSTOMER_ID,
    STOCK_CODE,
    build_document,
    error_responses,
    json_content,
    operation,
    path_param,
    public,
    query_param,
    request_body,
)
from web.params import bad, bool_arg, int_arg, parse_body, str_arg, uuid_value
from web.responses import (
    CustomerHistory,
    DiscoverSubmission,
    Health,
    Job,
    Product,
    SearchResults,
    SimilarProducts,
    StoredFeedbackEvent,
    Submission,
)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_SEARCH_K = 100
MAX_HISTORY_N = 500


def settings():
    return current_app.config["RECSYS_SETTINGS"]


@bp.before_request
def require_api_key():
    """Every API view needs a valid key unless it is marked public."""
    view = current_app.view_functions.get(request.endpoint)
    if view is None or getattr(view, "public", False):
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="recsys"'}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing API key: send Authorization: Bearer <key>", challenge)
    key = current_app.extensions["recsys_api_keys"].verify(token.strip(), settings())
    if key is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key", challenge)
    g.api_key = key


def _json_document(document: str):
    """200 with JSON already encoded (stored JSON passed through by the core), sent as `jsonify` sends its own."""
    return current_app.response_class(f"{document}\n", mimetype="application/json")


IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": False,
                      "description": "Repeat a submission safely: the same key returns the same job.",
                      "schema": IDEMPOTENCY_KEY.json_schema()}


def _idempotency_key() -> str | None:
    # the environ entry `request.headers.get` reads, without the KeyError it raises and catches when absent
    key = request.environ.get("HTTP_IDEMPOTENCY_KEY")
    return key.strip() if key is not None else None


_job_url_prefixes: dict[str, str] = {}


def _job_url(job_id: str) -> str:
    """`url_for("api.get_job", job_id=job_id)` for a job id (a UUID: nothing in it to quote), with the part before
    the id built once per script root: url_for itself cost ~3% of a submission's CPU."""
    root = request.script_root
    prefix = _job_url_prefixes.get(root)
    if prefix is None:
        prefix = _job_url_prefixes[root] = url_for("api.get_job", job_id="-")[:-1]
    return prefix + job_id


def _submission(outcome):
    """200 with the result when the submit was answered (cache or a finished job), else 202 with the job to poll."""
    job_id = str(outcome.job_id) if outcome.job_id else None
    body = {"job_id": job_id, "status": outcome.status, "cached": outcome.cached, "created": outcome.created,
            "status_url": _job_url(job_id) if job_id else None}
    encoded = json.dumps(body, separators=(",", ":"))  # what jsonify writes, without its provider's per-call set-up
    if outcome.result_json is not None:
        # the stored result goes in as the database printed it: parsing and re-encoding it cost more than the rest
        return _json_document(f'{encoded[:-1]},"result":{outcome.result_json}}}')
    return _json_document(encoded), 202, {"Location": body["status_url"]}


@bp.post("/recommendations")
@operation(
    summary="Ask for recommendations",
    description=(
        "Answers 200 with the result when the same request was answered before (result cache or an "
        "Idempotency-Key seen before whose job has finished); otherwise enqueues a job and answers 202 with "
        "its id and a status URL (also in the Location header)."
    ),
    parameters=[IDEMPOTENCY_HEADER],
    requestBody=request_body(RecommendationRequest),
    responses={
        "200": {"description": "Answered from the cache", "content": json_content(Submission)},
        "202": {"description": "Enqueued", "content": json_content(Submission),
                "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(400, 413, 415, 503),
    },
)
def create_recommendation():
    asked = parse_body(RecommendationRequest)
    outcome = jobs.submit_recommendation(asked, settings(), idempotency_key=_idempotency_key(), wait_for_broker=False)
    if outcome.result_json is not None:
        count_recommendation("cached" if outcome.cached else "finished")
    else:
        count_recommendation("enqueued")
    return _submission(outcome)


@bp.post("/discover")
@operation(
    summary="Discover products for a need in plain words",
    description=(
        "The LLM turns the need (and the customer's country and recent purchases, when the customer is known) "
        "into 3–5 product ideas; each is searched in the catalog, and the result groups real products by idea "
        "(3 shown, the rest kept as extras that replace a product reported purchased). Answers 200 with the "
        "result when the same request was answered before, else 202 with the job to poll at status_url."
    ),
    parameters=[IDEMPOTENCY_HEADER],
    requestBody=request_body(DiscoverRequest),
    responses={
        "200": {"description": "Answered from the cache", "content": json_content(DiscoverSubmission)},
        "202": {"description": "Enqueued", "content": json_content(DiscoverSubmission),
                "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(400, 413, 415, 503),
    },
)
def create_discover():
    asked = parse_body(DiscoverRequest)
    outcome = jobs.submit_discover(asked, settings(), idempotency_key=_idempotency_key(), wait_for_broker=False)
    return _submission(outcome)


@bp.get("/jobs/<job_id>")
@operation(
    summary="A job's status, and its result and timings once finished",
    parameters=[path_param("job_id", {"type": "string", "format": "uuid"}, "the id from POST /recommendations")],
    responses={"200": {"description": "The job", "content": json_content(Job)}, **error_responses(404)},
)
def get_job(job_id: str):
    try:
        parsed = uuid_value(job_id, "job id")
    except ApiError:
        raise ApiError(404, "not_found", f"no job {job_id[:40]!r}: job ids are UUIDs") from None
    job = get_job_json(parsed, settings())
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return _json_document(job)


@bp.get("/products/<stock_code>")
@operation(
    summary="One product",
    parameters=[path_param("stock_code", STOCK_CODE, "the product's stock code, e.g. 85123A")],
    responses={"200": {"description": "The product", "content": json_content(Product)},
               **error_responses(404)},
)
def get_product(stock_code: str):
    item = retrieval.product(stock_code, settings()) if "\x00" not in stock_code else None
    if item is None:
        raise ApiError(404, "product_not_found", f"no product with stock code {stock_code[:64]!r}")
    return jsonify(item)


@bp.get("/products/<stock_code>/similar")
@operation(
    summary="Products most like this one (cosine similarity of embeddings)",
    parameters=[
        path_param("stock_code", STOCK_CODE, "the product's stock code"),
        query_param("k", {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_K, "default": 10}, "how many"),
    ],
    responses={"200": {"description": "Nearest products", "content": json_content(SimilarProducts)},
               **error_responses(400, 404)},
)
def similar_products(stock_code: str):
    k = int_arg("k", 10, 1, MAX_SEARCH_K)
    if "\x00" in stock_code or retrieval.product(stock_code, settings()) is None:
        raise ApiError(404, "product_not_found", f"no product with stock code {stock_code[:64]!r}")
    hits = retrieval.similar(stock_code, k, settings())
    return jsonify({"stock_code": stock_code, "count": len(hits), "items": [h.as_dict() for h in hits]})


@bp.get("/search")
@operation(
    summary="Products for a text query: vector search, or hybrid (full-text + vector)",
    parameters=[
        query_param("q", {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS}, "query text", True),
        query_param("k", {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_K, "default": 10}, "how many"),
        query_param("customer_id", CUSTOMER_ID, "the customer, for exclude_purchased"),
        query_param("exclude_purchased", {"type": "boolean", "default": False},
                    "leave out what customer_id bought (vector search only)"),
        query_param("hybrid", {"type": "boolean", "default": False}, "fuse full-text and vector ranks"),
    ],
    responses={"200": {"description": "Matching products", "content": json_content(SearchResults)},
               **error_responses(400)},
)
def search():
    query = str_arg("q", required=True, max_length=MAX_QUERY_CHARS)
    k = int_arg("k", 10, 1, MAX_SEARCH_K)
    customer_id = int_arg("customer_id", None, 1, MAX_BIGINT)
    exclude = bool_arg("exclude_purchased")
    hybrid = bool_arg("hybrid")
    try:
        hits = retrieval.search(query, k, settings(), customer_id=customer_id, exclude_purchased=exclude,
                                hybrid=hybrid)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return jsonify({"query": query, "hybrid": hybrid, "count": len(hits), "items": [h.as_dict() for h in hits]})


@bp.get("/customers/<int:customer_id>/history")
@operation(
    summary="What a customer bought, most recent first",
    parameters=[
        path_param("customer_id", CUSTOMER_ID, "the customer"),
        query_param("n", {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY_N, "default": 10}, "how many"),
        query_param("order", {"type": "string", "enum": ["recent", "seed"], "default": "recent"},
                    "recent first, or the notebook's order (stock codes sorted)"),
    ],
    responses={
        "200": {"description": "History", "content": json_content(CustomerHistory)},
        **error_responses(400, 404),
    },
)
def customer_history(customer_id: int):
    n = int_arg("n", 10, 1, MAX_HISTORY_N)
    order = request.args.get("order", "recent")
    if order not in customer_histories.HISTORY_ORDERS:
        raise bad(f"order must be one of {', '.join(customer_histories.HISTORY_ORDERS)}")
    if customer_id > MAX_BIGINT or listing.customer(customer_id, settings()) is None:
        raise ApiError(404, "customer_not_found", f"no customer {customer_id}")
    entries = customer_histories.history(customer_id, n, order, settings())
    return jsonify({"customer_id": customer_id, "count": len(entries), "items": [e.as_dict() for e in entries]})


@bp.post("/feedback")
@operation(
    summary="Record that a product was shown, clicked or purchased, and act on it",
    description=(
        "With job_id, the product must be one that job's result showed, and customer_id (if given) the job's "
        "customer. `purchased` records a purchase for the customer (their history and cache key change); on a "
        "discover result the product's group replaces it with its first extra, and `replacement` says which. "
        "A repeated Idempotency-Key records nothing and answers 200 with the first answer."
    ),
    parameters=[
        {"name": "Idempotency-Key", "in": "header", "required": False,
         "description": "Report an event safely more than once: it is recorded once.",
         "schema": IDEMPOTENCY_KEY.json_schema()}
    ],
    requestBody=request_body(feedback_events.FeedbackEvent),
    responses={
        "200": {"description": "Recorded before under this Idempotency-Key",
                "content": json_content(StoredFeedbackEvent)},
        "201": {"description": "Recorded (and acted on)", "content": json_content(StoredFeedbackEvent)},
        **error_responses(400, 404, 409, 413, 415),
    },
)
def feedback():
    event = parse_body(feedback_events.FeedbackEvent)
    idempotency_key = request.headers.get("Idempotency-Key")
    try:
        stored = feedback_events.record(event, settings(),
                                        idempotency_key=idempotency_key.strip() if idempotency_key else None)
    except feedback_events.FeedbackRejected as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None
    return jsonify(stored), 201 if stored["created"] else 200


@bp.get("/health")
@public
@operation(
    summary="Database, broker and worker status (200 when the database and broker answer, else 503)",
    responses={
        "200": {"description": "Serving", "content": json_content(Health)},
        "503": {"description": "Database or broker down", "content": json_content(Health)},
    },
)
def health():
    database = health_checks.check_database(settings())
    broker = health_checks.check_broker(settings())
    worker = health_checks.check_workers(settings())
    serving = database["ok"] and broker["ok"]
    status = "unavailable" if not serving else ("ok" if worker["ok"] else "degraded")
    if serving and health_checks.warming():
        status, serving = "warming", False  # this process is still loading what searches need
    body = {"status": status, "database": database, "broker": broker, "worker": worker}
    return jsonify(body), 200 if serving else 503


@bp.get("/openapi.json")
@public
@operation(
    summary="This document",
    responses={"200": {"description": "OpenAPI 3 document", "content": json_content({"type": "object"})}},
)
def openapi_document():
    document = current_app.extensions.get("recsys_openapi")
    if document is None:
        document = current_app.extensions["recsys_openapi"] = build_document(current_app)
    return jsonify(document)
