"""Property-based run of every documented operation (schemathesis): no input a client can send gives a 5xx.

Positive and negative cases are drawn from the app's own OpenAPI document and sent to the WSGI
app with a valid API key; the only check is `not_a_server_error`. Bounded by MAX_EXAMPLES.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from recsys.config import Settings
from web import create_app
from web.openapi import api_routes

MAX_EXAMPLES = 30
LABELS = sorted(f"{method.upper()} {path}" for path, method, _ in api_routes(create_app(Settings())))


@pytest.mark.parametrize("label", LABELS)
def test_no_server_errors(app, loaded_db, auth_headers, label):
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the OpenAPI document"
    cases = st.one_of(operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(headers=auth_headers, checks=[not_a_server_error])

    run()
