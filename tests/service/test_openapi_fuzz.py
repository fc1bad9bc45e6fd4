"""schemathesis against the app's own OpenAPI: no generated request gets a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.app import create_app
from tests.service.conftest import settings_for

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402


def test_no_generated_request_gets_a_server_error(
    served: dict[str, Path], fresh_index: Path
) -> None:
    # schemathesis runs the app's lifespan itself: the engine loads once, in its client.
    app = create_app(settings_for(served, fresh_index), load_in_background=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    statuses: set[int] = set()
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=op.as_strategy())
        def check(case: object) -> None:
            response = case.call()  # type: ignore[attr-defined]
            statuses.add(response.status_code)
            if response.status_code >= 500:
                where = f"{case.method} {case.formatted_path}"  # type: ignore[attr-defined]
                failures.append(f"{where}: {response.status_code} {response.text[:200]}")

        check()
    assert failures == []
    assert 200 in statuses  # the engine was loaded: requests were really served
    assert 422 in statuses
