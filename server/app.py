"""`create_app(engine, settings)`: the FastAPI app of one served model.

The app owns its scheduler (started and stopped by the lifespan), its Prometheus
registry and its settings, all in `app.state.kiln`; nothing is process-global, so tests
can run several apps side by side. `engine` is a loaded `Engine` or a zero-argument
loader: with a loader the model loads on the worker thread while the server already
answers (503 "still loading" until it is ready), which is what `kiln serve` does; with
`settings.engine_process` too, the loader (picklable) runs in an engine process of its own
(server/engine_process.py).

The package: settings.py (flags) -> app.py (this) -> middleware.py (metrics, 413, 401)
-> routes.py (endpoints) -> completions.py (OpenAI completions) / streaming.py (SSE)
-> scheduler.py (the worker thread that owns the engine; engine_process.py runs it in a process
of its own, loading.py builds the engine `kiln serve` describes); protocol.py holds the
pydantic bodies, errors.py the OpenAI error shape, metrics.py the Prometheus registry,
testing.py a live-server helper for tests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from model.engine import Engine

from .errors import JSONBody, install_error_handlers
from .metrics import ServerMetrics
from .middleware import APIKey, BodyLimit, RequestMetrics
from .routes import ENDPOINTS, PLAYGROUND_CSP, STATIC_DIR, KilnState, router
from .scheduler import Scheduler
from .settings import ServerSettings

log = logging.getLogger("kiln.server")

DESCRIPTION = """OpenAI-compatible completions (`/v1/completions`), perplexity (`/v1/perplexity`),
vLLM-style tokenizer endpoints, health and Prometheus metrics, served by Kiln.
Errors are `{"error": {"message", "type", "param", "code"}}`."""


def sampling_defaults(settings: ServerSettings) -> dict:
    """What requests that leave out temperature / top_p / top_k get (--generation-config auto: the model's
    generation_config.json recommendations, as vLLM applies them), logged once."""
    if settings.generation_config == "none":
        return {}
    from model.checkpoint import read_sampling_defaults
    from model.cli import default_model_dir

    defaults, ignored = read_sampling_defaults(settings.model_dir or default_model_dir())
    if ignored:
        log.warning("generation_config.json: %s not usable (out of range or not a number), ignored",
                    ", ".join(ignored))
    if defaults:
        log.info("requests that leave out %s get the model's generation_config.json values: %s "
                 "(--generation-config none for OpenAI's defaults)", "/".join(defaults),
                 ", ".join(f"{k}={v:g}" for k, v in defaults.items()))
    return defaults


def create_app(engine: Engine | Callable[[], Engine], settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServerMetrics(settings.served_model_name)
    if settings.engine_process and not hasattr(engine, "step"):  # a loader: it runs in the engine process
        from model.cli import default_model_dir
        from model.tokenizer import load_tokenizer

        from .engine_process import EngineProcess

        scheduler = EngineProcess(engine, functools.partial(load_tokenizer, settings.model_dir or default_model_dir()),
                                  metrics, max_queue=settings.max_queue, log_level=settings.log_level)
    else:
        scheduler = Scheduler(engine, metrics, max_queue=settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            # uvicorn has already let in-flight requests finish (--shutdown-timeout); what is left is aborted
            await run_in_threadpool(scheduler.stop, 30.0)

    app = FastAPI(title="Kiln", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  default_response_class=JSONBody)
    app.state.kiln = KilnState(settings=settings, scheduler=scheduler, metrics=metrics,
                               sampling_defaults=sampling_defaults(settings))
    app.openapi = functools.partial(_openapi, app, app.openapi)
    install_error_handlers(app)
    app.include_router(router)
    app.mount("/static", _StaticWithCSP(directory=STATIC_DIR), name="static")  # the playground's JS and CSS
    # added innermost first: RequestMetrics ends up outermost and sees every response
    app.add_middleware(APIKey, api_key=settings.api_key)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=ENDPOINTS)
    return app


def _openapi(app: FastAPI, build: Callable[[], dict]) -> dict:
    """FastAPI's schema, less the 422 it lists for every operation with parameters: a request that fails
    validation gets a 400 with the OpenAI error body here (errors.py), which the routes list instead."""
    if app.openapi_schema is None:
        schema = build()  # (FastAPI keeps it as app.openapi_schema)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


class _StaticWithCSP(StaticFiles):
    """The playground's files with the page's Content-Security-Policy (index.html is reachable here too)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Content-Security-Policy"] = PLAYGROUND_CSP
        return response
