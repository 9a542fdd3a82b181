"""The BentoML service's ASGI app run in the test process (no server, no port)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.testclient import TestClient


def _drop_bentoml_metrics() -> None:
    """BentoML registers its request metrics in the process-wide Prometheus registry at each app's start-up;
    a second app in the same process would register them again (DuplicateTimeseries), so an earlier app's
    collectors go first."""
    import prometheus_client

    registry = prometheus_client.REGISTRY
    for collector, names in list(registry._collector_to_names.items()):  # noqa: SLF001 - no public lookup
        if any(name.startswith("bentoml_") for name in names):
            registry.unregister(collector)


@contextmanager
def service_client(env: dict[str, str]) -> Iterator[TestClient]:
    """A client of ``RecommendationService`` started with ``env`` set (restored afterwards)."""
    from recsys.serving.service import RecommendationService

    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _drop_bentoml_metrics()
        with TestClient(RecommendationService.to_asgi()) as client:
            yield client
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
