"""Schemathesis over the service's own OpenAPI document (``GET /docs.json``), every route: seeded generated
requests, valid and invalid (positive and negative modes), against ``recsys serve`` in a subprocess. Checks:
no 5xx, and every response conforms to the schema the document declares for its status."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.serving.test_operations import API_KEY, free_port, kill_tree, server_env, start_cli_server
from tests.serving.test_service import train_and_register

EXAMPLES_PER_ROUTE = 50  # hypothesis stops earlier on routes with little to vary (the GET probes)
SENT: list[tuple[str, int]] = []  # (generation mode, status) of every generated request, for the summary


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = train_and_register()
    port = free_port()
    env = server_env(tmp_path_factory.mktemp("impressions"), RECSYS_SERVING_MAX_CANDIDATES="50")
    log = tmp_path_factory.mktemp("fuzz-server") / "serve.log"
    process = start_cli_server(env, port, log, models.retriever)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_tree(process)


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str) -> schemathesis.BaseSchema:
    doc = httpx.get(f"{fuzz_url}/docs.json", headers={"x-api-key": API_KEY}, timeout=30).json()
    assert len(doc["paths"]) == 9, sorted(doc["paths"])  # 5 endpoints, /livez /healthz /readyz /metrics
    return schemathesis.openapi.from_dict(doc)


OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/health"),
    ("POST", "/metadata"),
    ("POST", "/rank"),
    ("POST", "/recommend"),
    ("POST", "/user_embedding"),
]


def test_the_document_lists_every_route(api_schema: schemathesis.BaseSchema) -> None:
    listed = sorted((op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations())
    assert listed == sorted(OPERATIONS)


# Invalid requests only where there is something to make invalid: the probes take no parameters or body.
CASES = [(GenerationMode.POSITIVE, m, p) for m, p in OPERATIONS] + [
    (GenerationMode.NEGATIVE, m, p) for m, p in OPERATIONS if m == "POST"
]


@pytest.mark.parametrize(("mode", "method", "path"), CASES, ids=[f"{c[0].value}-{c[2]}" for c in CASES])
def test_generated_requests_get_declared_answers(
    api_schema: schemathesis.BaseSchema, fuzz_url: str, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_ROUTE,
        derandomize=True,  # the same valid requests every run (negative mutations vary a little)
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=fuzz_url,
            headers={"x-api-key": API_KEY},
            checks=[not_a_server_error, response_schema_conformance],
            timeout=30,
        )
        SENT.append((mode.value, response.status_code))

    run()


def test_the_fuzz_sent_a_few_hundred_requests(fuzz_url: str) -> None:
    statuses = {f"{m} {s}": SENT.count((m, s)) for m, s in sorted(set(SENT))}
    print(f"schemathesis: {len(SENT)} requests, (mode, status) counts {statuses}")
    assert len(SENT) >= 200, statuses
    assert statuses.get("positive 200", 0) > 0 and statuses.get("negative 400", 0) > 0
    # Valid requests carry the key and reach their route; the negative mode also drops the key (401).
    assert statuses.get("positive 401", 0) == 0
