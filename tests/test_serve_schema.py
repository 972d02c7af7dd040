"""Schemathesis against the service's own OpenAPI schema: generated requests, valid and not, to every route.

Every answer must be a non-5xx whose status, content type, headers and body match what the schema
declares, and schema-violating requests must be refused with a 4xx. Every default check runs but
``positive_data_acceptance``: a schema cannot say "the bytes of a decodable image", so schema-valid
random bytes are rightly refused (400). The app runs in process with its lifespan (the model loaded, the queue started), on a tiny
trained model. About 30 s on two cores.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (installed with schemathesis)

import cnnkit  # noqa: E402
from cnnkit.serve import create_app  # noqa: E402
from tests.conftest import write_class_folder  # noqa: E402

EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("schema-run")
    data = write_class_folder(root / "data", per_class=6)
    run = root / "colours"
    cnnkit.train(data, run, epochs=1, image_size=16, cache_root=root / "cache")
    # Small limits so generated bodies reach them: 413, and the instance cap.
    app = create_app(run, max_batch_size=8, max_wait_ms=1, max_body_bytes=64 * 1024, max_instances=8)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_route_answers_as_its_schema_says_and_never_5xx(api_schema, mode):
    """Each operation: generated cases (schema-valid, or schema-violating), each call validated by every check.

    (Not ``@schema.parametrize`` with ``from_fixture``: its lazy loader needs a pytest internal gone in pytest 9.)
    """
    from hypothesis import given
    from schemathesis.checks import positive_data_acceptance

    generation_mode = getattr(schemathesis.GenerationMode, mode.upper())
    cases: dict[str, int] = {}
    statuses: collections.Counter = collections.Counter()
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and not (len(operation.body) or len(operation.query)):
            continue  # only string path parameters (GET /v1/models/{name}): any value is valid, none negative
        cases[operation.label] = 0
        # Routes with a body get the served model's name and version, so the generated bodies reach the
        # decoding and the model (a random name is a 404 before the body is read); the others keep
        # generated names, which exercise the 404s.
        served = {"name": "colours", "version": "1"} if len(operation.body) else {}
        pinned = {p.name: served[p.name] for p in operation.path_parameters if p.name in served}

        @given(case=operation.as_strategy(generation_mode, path_parameters=pinned or None))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            cases[operation.label] += 1
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            statuses[response.status_code] += 1

        check()
    assert len(cases) >= (11 if mode == "positive" else 5) and all(cases.values()), cases  # every route exercised
    assert statuses[400] > 0 and (mode == "negative" or statuses[200] > 0), statuses  # bodies reached the handlers
    print(f"schemathesis {mode}: {len(cases)} operations, {sum(cases.values())} cases, 0 failures; "
          f"statuses {dict(sorted(statuses.items()))}")
