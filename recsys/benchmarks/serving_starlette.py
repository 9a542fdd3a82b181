"""The recommendation engine behind a minimal uvicorn + Starlette app: the yardstick of the framework's cost.

    RECSYS_SERVING_RETRIEVER=<tag> uvicorn recsys.benchmarks.serving_starlette:app --workers 2 \\
        --loop uvloop --http httptools --no-access-log

Same configuration (``RECSYS_SERVING_*``), same ``Recommender``, same adaptive batchers, same impressions
log and the same process settings (frozen GC, young-generation threshold, switch interval) as
``recsys.serving.service``; what it leaves out is BentoML: its request/response IO models, middleware
stack (auth guard, connection recycling, metrics, tracing) and runner plumbing. The request body is
validated by the same pydantic models, the response serialised by pydantic's own JSON encoder.
``benchmarks.serving_load --starlette`` serves it next to ``bentoml serve``, so BentoML's overhead is a
measured ratio of server CPU per request. Not a deployment: no auth, no body cap, no readiness states.
"""

from __future__ import annotations

import gc
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from recsys.serving.impressions import ImpressionLogger
from recsys.serving.middleware import ConnectionRecycler
from recsys.serving.schemas import RankRequest, RecommendRequest
from recsys.serving.service import (
    AdaptiveBatcher,
    InvalidRequest,
    Recommender,
    ServerProcessConfig,
    ServingConfig,
    server_timing,
    timed_batches,
    warm_up,
)

STATE: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(_app: Starlette):  # type: ignore[no-untyped-def]
    import torch

    config = ServingConfig.from_env()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    logger = (
        ImpressionLogger(config.impressions_dir, max_buffered_rows=config.impressions_max_buffered_rows)
        if config.log_impressions
        else None
    )
    engine = Recommender.from_config(config, logger)
    warm_up(engine)
    STATE["engine"] = engine
    STATE["recommend"] = AdaptiveBatcher(
        timed_batches(engine.recommend_many), config.max_batch_size, config.batch_wait_ms
    )
    STATE["rank"] = AdaptiveBatcher(
        timed_batches(engine.rank_many), config.max_batch_size, config.batch_wait_ms
    )
    gc.collect()
    gc.freeze()  # the service's process settings, so that only the framework differs
    gc.set_threshold(20_000, 20, 20)
    sys.setswitchinterval(0.0005)
    try:
        yield
    finally:
        engine.close()


async def _handle(request: Request, endpoint: str) -> Response:
    engine: Recommender = STATE["engine"]
    body = await request.body()
    t0 = time.thread_time()
    try:
        if endpoint == "rank":
            parsed = RankRequest.model_validate_json(body)
            t1 = time.thread_time()
            job: Any = engine.rank_job(parsed)
        else:
            parsed = RecommendRequest.model_validate_json(body)
            t1 = time.thread_time()
            job = engine.recommend_job(parsed)
    except ValidationError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    except InvalidRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    t2 = time.thread_time()
    pool = await STATE[endpoint].submit(job)
    t3 = time.thread_time()
    response = engine.finish_rank(job, pool) if endpoint == "rank" else engine.finish_recommend(job, pool)
    payload = response.model_dump_json().encode()
    t4 = time.thread_time()
    log = engine.last_log_s
    parts = {"parse": t1 - t0, "job": t2 - t1, "model": job.model_s, "log": log, "respond": t4 - t3 - log}
    return Response(payload, media_type="application/json", headers={"server-timing": server_timing(parts)})


async def rank(request: Request) -> Response:
    return await _handle(request, "rank")


async def recommend(request: Request) -> Response:
    return await _handle(request, "recommend")


async def readyz(_request: Request) -> Response:
    return Response(
        "ready" if "engine" in STATE else "starting", status_code=200 if "engine" in STATE else 503
    )


app = ConnectionRecycler(  # the service's keep-alive spreading (recsys's own middleware, not BentoML's)
    Starlette(
        routes=[
            Route("/rank", rank, methods=["POST"]),
            Route("/recommend", recommend, methods=["POST"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
    ),
    every=ServerProcessConfig.from_env().keepalive_requests,
)
