"""Property-based run of the HTTP service against its own OpenAPI schema (schemathesis): no input gives a 500.

Every operation of the schema is called with generated requests, schema-conforming and not (wrong types,
missing and extra fields, huge numbers, odd strings, bad base64), in process over ASGI. The check is the
docs/design.md §13 guarantee: a 5xx answer is a bug. Consistency under concurrent writes and the 413 on
oversized bodies are tested in test_service.py.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from pmmrec import Recommender
from pmmrec.serving.app import create_app


@pytest.fixture(scope="module")
def api_schema(quick_world, tmp_path_factory):
    from test_service import LIMITS, train_tiny

    checkpoint = train_tiny(quick_world / "target", tmp_path_factory.mktemp("fuzz") / "run")
    app = create_app(Recommender.from_checkpoint(checkpoint), LIMITS)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_request_makes_a_server_error(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8  # recommend, items, health, metrics, explorer routes, ...
    called = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal called
                called += 1
                case.call_and_validate(checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:  # nothing can be invalid about e.g. GET /health (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE
    assert called >= 12 * len(operations)
