"""Request and response bodies: one pydantic model each gives the rules, the error wording and the OpenAPI schema."""

from __future__ import annotations

import uuid

import pytest

from recsys import jobs
from recsys.config import Settings
from recsys.feedback import FeedbackEvent
from recsys.recommend.request import RecommendationRequest, RequestError, check_idempotency_key
from web import create_app
from web.openapi import REF_TEMPLATE
from web.responses import Error, Health, Job, StoredFeedbackEvent, Submission


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"customer_id": "15781"}, "customer_id must be an integer"),
        ({"customer_id": True}, "customer_id must be an integer"),
        ({"customer_id": 1, "k": "3"}, "k must be an integer"),
        ({"customer_id": 1, "k": True}, "k must be an integer"),
        ({"customer_id": 1, "k": 3.0}, "k must be an integer"),
        ({"customer_id": 1, "k": 0}, "k must be between 1 and 50, got 0"),
        ({"customer_id": 1, "k": 51}, "k must be between 1 and 50, got 51"),
        ({"customer_id": 0}, "customer_id must be between 1 and 9223372036854775807, got 0"),
        ({"customer_id": 2**63}, "customer_id must be between 1 and 9223372036854775807"),
        ({"query": "x" * 501}, "query is longer than 500 characters"),
        ({"query": "a\x00b"}, "query must not contain NUL characters"),
        ({"customer_id": 1, "explain": "yes"}, "explain must be true or false"),
        ({"customer_id": 1, "ranker": "magic"}, "unknown ranker 'magic'; choose one of retrieval, popularity"),
        ({"customer_id": 1, "size": 2, "colour": "red"}, "unknown field(s): colour, size"),
        ({"k": 3}, "a request needs a query, a customer_id, or both"),
        ({"query": "   "}, "a request needs a query, a customer_id, or both"),
        ({"query": "x", "exclude_purchased": True}, "exclude_purchased needs a customer_id"),
        (["not", "an", "object"], "the request must be a JSON object"),
    ],
)
def test_recommendation_request_rules_name_the_field_and_the_rule(data, message):
    with pytest.raises(RequestError) as raised:
        RecommendationRequest.from_dict(data)
    assert message in str(raised.value)


def test_several_mistakes_are_reported_together():
    with pytest.raises(RequestError) as raised:
        RecommendationRequest.from_dict({"customer_id": "1", "k": 99, "colour": "red"})
    assert str(raised.value) == ("customer_id must be an integer; k must be between 1 and 50, got 99; "
                                 "unknown field(s): colour")


def test_a_valid_request_is_normalised_and_can_be_built_by_position():
    request = RecommendationRequest.from_dict({"customer_id": 15781, "query": "  BAG CHARM ", "k": 3})
    assert (request.customer_id, request.query, request.k, request.ranker) == (15781, "BAG CHARM", 3, None)
    assert RecommendationRequest.from_dict({"customer_id": 7, "query": "  "}).query is None
    assert RecommendationRequest(15781, "BAG CHARM", 3) == request
    assert request.with_defaults(Settings(ranker="popularity")).ranker == "popularity"
    assert RecommendationRequest.from_dict(request.as_dict()) == request


@pytest.mark.parametrize(
    ("key", "message"),
    [("", "idempotency key must not be empty"), ("  ", "idempotency key must not be blank"),
     ("x" * 201, "idempotency key is longer than 200 characters"), (7, "idempotency key must be a string")],
)
def test_idempotency_keys(key, message):
    with pytest.raises(RequestError, match=message):
        check_idempotency_key(key)


def test_feedback_event_rules():
    good = {"event": "clicked", "stock_code": "22224", "customer_id": 15781, "job_id": str(uuid.uuid4()),
            "position": 2}
    assert FeedbackEvent.from_dict(good).job_id == uuid.UUID(good["job_id"])
    for bad, message in [
        ({**good, "event": "liked"}, "unknown event 'liked'; choose one of shown, clicked, purchased"),
        ({**good, "stock_code": ""}, "stock_code must not be empty"),
        ({**good, "stock_code": 22224}, "stock_code must be a string"),
        ({**good, "job_id": "abc"}, "job_id must be a UUID"),
        ({**good, "position": 0}, "position must be between 1 and 1000, got 0"),
        ({**good, "position": True}, "position must be an integer"),
        ({"stock_code": "22224"}, "event is required"),
    ]:
        with pytest.raises(RequestError) as raised:
            FeedbackEvent.from_dict(bad)
        assert str(raised.value) == message


# ---------------------------------------------------------------- the OpenAPI document


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_components_are_the_models_own_schemas():
    app = create_app(Settings())
    document = app.test_client().get("/api/v1/openapi.json").get_json()
    assert document["openapi"] == "3.1.0"
    components = document["components"]["schemas"]
    for model, mode in [(RecommendationRequest, "validation"), (FeedbackEvent, "validation"),
                        (Submission, "serialization"), (Job, "serialization"), (Health, "serialization"),
                        (Error, "serialization")]:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode=mode)
        for name, nested in schema.pop("$defs", {}).items():
            assert components[name] == nested, name
        assert components[model.__name__] == schema, model
    bodies = {(path, method): op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
              for path, ops in document["paths"].items() for method, op in ops.items() if "requestBody" in op}
    assert bodies[("/recommendations", "post")] == REF_TEMPLATE.format(model="RecommendationRequest")
    assert bodies[("/feedback", "post")] == REF_TEMPLATE.format(model="FeedbackEvent")
    assert "nullable" not in str(document)  # OpenAPI 3.0's keyword; 3.1 uses JSON Schema's null type
    prefix = REF_TEMPLATE.format(model="")
    for target in set(_refs(document)):
        assert target.startswith(prefix) and target[len(prefix):] in components, target


# ---------------------------------------------------------------- real responses match their models


def test_responses_match_their_documented_models(client, loaded_db, auth_headers):
    """Validated with extra="forbid": a field the API sends but the document lacks fails here."""
    Health.model_validate(client.get("/api/v1/health").get_json(), extra="forbid")
    payload = {"customer_id": 15781, "query": "BAG CHARM", "k": 3, "ranker": "retrieval"}
    queued = client.post("/api/v1/recommendations", json=payload, headers=auth_headers)
    assert queued.status_code == 202
    job_id = Submission.model_validate(queued.get_json(), extra="forbid").job_id
    Job.model_validate(client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers).get_json(), extra="forbid")
    jobs.run_job(str(job_id), worker=jobs.worker_identity(), settings=loaded_db)
    done = Job.model_validate(client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers).get_json(), extra="forbid")
    assert done.result is not None and len(done.result.items) == 3
    cached = client.post("/api/v1/recommendations", json=payload, headers=auth_headers)
    assert cached.status_code == 200
    assert Submission.model_validate(cached.get_json(), extra="forbid").result == done.result
    shown = done.result.items[0]
    event = {"event": "shown", "stock_code": shown.stock_code, "customer_id": 15781, "job_id": str(job_id),
             "position": shown.rank}
    stored = client.post("/api/v1/feedback", json=event, headers=auth_headers)
    assert stored.status_code == 201, stored.get_json()
    assert StoredFeedbackEvent.model_validate(stored.get_json()).job_id == job_id
    refused = client.post("/api/v1/recommendations", json={**payload, "k": 0}, headers=auth_headers)
    assert refused.status_code == 400
    error = Error.model_validate(refused.get_json(), extra="forbid").error
    assert (error.code, error.message) == ("invalid_request", "k must be between 1 and 50, got 0")
