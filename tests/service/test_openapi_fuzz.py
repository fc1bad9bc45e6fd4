"""schemathesis against the app's own OpenAPI, with all its checks: no 5xx, every response
as the schema says (status, headers, body), schema-invalid requests refused, and schema-valid
ones accepted.

Two ways. :func:`test_generated_requests_pass_every_check` draws schema-valid requests per
operation. :func:`test_every_phase_and_check_of_the_command_line` runs the engine behind
``schemathesis run URL --checks all`` in-process, every phase (examples; coverage, which sends
the methods a path does not declare, OPTIONS included, and requests with each part missing or
wrong; fuzzing, positive and negative; stateful, which follows the links between operations),
on a server without keys and on one with read and write keys, sent or not; uploads are real
images (:mod:`tests.service.schemathesis_images`).

"Schema-valid request accepted" is not asked of requests that break a rule the schema cannot
state (:func:`_schema_cannot_say`): a side of /explain is an image or an id, an example search
needs a positive example and at most ``max_batch_images`` examples in all (the schema bounds
each list, not their sum), grouped and explained hits are bounded (k x group_size), and
schemathesis sends a one-item list of files as a text part. Generation is derandomized: CI
sees the same requests on every run, and a failure there reproduces here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from service.routes.search import MAX_EXPLAINED_HITS, MAX_GROUPED_HITS
from service.settings import Settings
from tests.service.conftest import settings_for

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import CHECKS  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.engine import Status, events, from_schema  # noqa: E402

import tests.service.schemathesis_images  # noqa: E402, F401  (image parts are images)

pytestmark = pytest.mark.slow  # generated requests and the schemathesis command line: the full lane


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
        _fuzz(op, name, failures, statuses, accepted)
    assert not failures, "\n".join(f"{where}\n    {curl}" for where, curl in failures.items())
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
    name: str,
    failures: dict[str, str],
    statuses: set[int],
    accepted: list[Any],
) -> None:
    @settings(max_examples=25, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy())  # type: ignore[attr-defined]
    def check(case: object) -> None:
        response = case.call()  # type: ignore[attr-defined]
        statuses.add(response.status_code)
        try:
            skip = accepted if _schema_cannot_say("positive_data_acceptance", case) else []
            case.validate_response(response, excluded_checks=skip)  # type: ignore[attr-defined]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # schemathesis' FailureGroup is a BaseExceptionGroup
            for failure in getattr(e, "exceptions", [e]):
                where = f"{name}: {str(failure).splitlines()[0] if str(failure) else failure!r}"
                failures.setdefault(where, case.as_curl_command()[:300])  # type: ignore[attr-defined]

    check()


READ, WRITE = "read-key-for-the-fuzzer", "write-key-for-the-fuzzer"
KEYS = {"read_keys": [READ], "write_keys": [WRITE], "protect_metrics": True}
# Settings, headers sent with every request, and a status every run must have seen.
RUNS: dict[str, tuple[dict[str, object], dict[str, str], int]] = {
    "no keys": ({}, {}, 200),
    "keys, none sent": (KEYS, {}, 401),
    "keys, the write key sent": (KEYS, {"Authorization": f"Bearer {WRITE}"}, 200),
}
EXAMPLES = 30  # per operation and phase: 1,000 to 1,800 requests a run, about 6 s


@pytest.mark.parametrize("run", RUNS)
def test_every_phase_and_check_of_the_command_line(
    served: dict[str, Path], fresh_index: Path, run: str
) -> None:
    extra, headers, expected = RUNS[run]
    app = create_app(settings_for(served, fresh_index, **extra), load_in_background=False)
    config = SchemathesisConfig.from_dict({
        "seed": 0, "max-failures": 1000, "checks": {"enabled": True}, "headers": headers,
        "generation": {"max-examples": EXAMPLES},
    })  # fmt: skip
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    failures, statuses = _run(schema)
    assert not failures, "\n".join(f"{where}\n    {curl}" for where, curl in failures.items())
    assert expected in statuses


def _run(schema: object) -> tuple[dict[str, str], set[int]]:
    """The failures of every check on every request the engine sent (by operation, check and
    status; a curl command for each), and the statuses it got."""
    failures: dict[str, str] = {}
    statuses: set[int] = set()
    for event in from_schema(schema).execute():  # type: ignore[arg-type]
        if isinstance(event, events.FatalError | events.NonFatalError):
            failures[f"engine: {event}"] = ""
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        for case_id, checks in recorder.checks.items():
            interaction = recorder.interactions.get(case_id)
            status = interaction.response.status_code if interaction and interaction.response else 0
            statuses.add(status)
            case = recorder.cases[case_id].value
            for check in checks:
                if check.status != Status.FAILURE or _schema_cannot_say(check.name, case):
                    continue
                where = f"{case.operation.label}: {check.name} ({status})"
                failures.setdefault(where, case.as_curl_command()[:400])
    return failures, statuses


# Form fields that repeat: schemathesis sends a one-item list of them as a single part without
# a file name, which a form reads as a text field (the server answers that it is not text).
REPEATED_FILES = {"images", "positive", "negative"}


def _schema_cannot_say(check: str, case: object) -> bool:
    """Whether ``check`` failed on a schema-valid ``case`` that breaks a rule the OpenAPI schema
    cannot state, and that the server refuses with 422 naming it: a side of /explain is an
    image or an id, not both nor neither; an example search needs a positive example (an
    upload or a query parameter) and at most ``max_batch_images`` examples in all; grouped
    and explained hits are bounded (k x group_size); and the repeated file parts above."""
    if check != "positive_data_acceptance":
        return False
    name = case.operation.label  # type: ignore[attr-defined]
    body = case.body if isinstance(case.body, dict) else {}  # type: ignore[attr-defined]
    query = case.query or {}  # type: ignore[attr-defined]
    if _too_many_hits(case) or any(
        not isinstance(body[field], list) for field in REPEATED_FILES & body.keys()
    ):
        return True
    if name == "POST /explain":
        return any((side in body) == (f"{side}_id" in body) for side in "ab")
    if name == "POST /search/examples":
        examples = [*body.get("positive", []), *body.get("negative", [])]
        examples += [*query.get("positive_id", []), *query.get("negative_id", [])]
        too_many = len(examples) > Settings().max_batch_images
        return too_many or not (body.get("positive") or query.get("positive_id"))
    return False
