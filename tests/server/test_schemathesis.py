"""Property-based fuzzing from the server's own OpenAPI schema: valid and invalid requests alike
must never get a 5xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

MAX_EXAMPLES = 30


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_the_schema_allows_or_forbids_gets_a_server_error(tiny_server, mode):
    schema = schemathesis.openapi.from_url(f"{tiny_server.url}/openapi.json")
    failures, statuses = [], []

    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=MAX_EXAMPLES, phases=[Phase.generate], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            # Keep generations short: the point is the input handling, not the model.
            if isinstance(case.body, dict):
                for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    if isinstance(case.body.get(name), int) and case.body[name] > 8:
                        case.body[name] = 8
                if case.path.endswith("/responses") and "max_output_tokens" not in case.body:
                    case.body["max_output_tokens"] = 8    # else each answer runs to the end of the context
            response = case.call(base_url=tiny_server.url, timeout=120)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

        try:
            fuzz()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # an operation without inputs has no invalid form
    assert not failures, failures
    if mode == GenerationMode.POSITIVE:
        assert statuses.count(200) >= 10, statuses  # the fuzzing reached the model, not only the checks
