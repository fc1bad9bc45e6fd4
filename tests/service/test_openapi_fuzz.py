"""schemathesis against the app's own OpenAPI, with all its checks: no 5xx, every response
as the schema says (status, headers, body), schema-invalid requests refused, and schema-valid
ones accepted.

One check is left out where it cannot hold: for the operations that take image uploads,
"schema-valid request accepted" would need arbitrary bytes (which the schema allows as
``format: binary``) to be decodable images, and /explain's "an image or an id for each side"
and /search/examples' "at least one positive example" to be expressed in the schema; those
answer 415/422 by design. The same check runs on every other operation, except for grouped
searches asking for more than 1,000 hits (k x group_size), and for searches asking for more
than 100 explained hits (k, or k x group_size, with explain), which the schema cannot bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.app import create_app
from service.routes.search import MAX_EXPLAINED_HITS, MAX_GROUPED_HITS
from tests.service.conftest import settings_for

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import CHECKS  # noqa: E402

UPLOADS = {
    "POST /search", "POST /search/batch", "POST /search/examples", "POST /explain",
    "POST /gallery",
}  # fmt: skip


def test_generated_requests_pass_every_check(served: dict[str, Path], fresh_index: Path) -> None:
    # schemathesis runs the app's lifespan itself: the engine loads once, in its client.
    app = create_app(settings_for(served, fresh_index), load_in_background=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    accepted = CHECKS.get_by_names(["positive_data_acceptance"])
    failures: dict[str, str] = {}
    statuses: set[int] = set()
    for operation in schema.get_all_operations():
        op = operation.ok()
        name = f"{op.method.upper()} {op.path}"
        _fuzz(op, accepted if name in UPLOADS else [], name, failures, statuses, accepted)
    assert failures == {}
    assert 200 in statuses  # the engine was loaded: requests were really served
    assert 422 in statuses


def _too_many_hits(case: object) -> bool:
    query = getattr(case, "query", None) or {}
    try:
        hits = int(query.get("k", 10))
        if query.get("group_by") == "label":
            hits *= int(query.get("group_size", 3))
            if hits > MAX_GROUPED_HITS:
                return True
    except (TypeError, ValueError):
        return False
    explain = str(query.get("explain", "true")).lower() not in ("false", "0", "no", "off")
    return explain and hits > MAX_EXPLAINED_HITS


def _fuzz(
    op: object,
    excluded: list[object],
    name: str,
    failures: dict[str, str],
    statuses: set[int],
    accepted: list[object],
) -> None:
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy())  # type: ignore[attr-defined]
    def check(case: object) -> None:
        response = case.call()  # type: ignore[attr-defined]
        statuses.add(response.status_code)
        try:
            skip = excluded + accepted if _too_many_hits(case) else excluded
            case.validate_response(response, excluded_checks=skip)  # type: ignore[attr-defined]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # schemathesis' FailureGroup is a BaseExceptionGroup
            for failure in getattr(e, "exceptions", [e]):
                where = f"{name}: {str(failure).splitlines()[0] if str(failure) else failure!r}"
                failures.setdefault(where, case.as_curl_command()[:300])  # type: ignore[attr-defined]

    check()
