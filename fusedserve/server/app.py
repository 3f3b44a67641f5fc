"""The FastAPI application factory: routes, error handlers and middleware around one engine.

The app never creates or stops the engine; server/cli.py owns its lifetime. Middleware order, outermost first:
CORS (when --allowed-origins is set, so preflights are answered before auth), API keys, body-size cap.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

import fusedserve
from fusedserve.server.config import ServerConfig
from fusedserve.server.errors import install_error_handlers
from fusedserve.server.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from fusedserve.server.routes import router
from fusedserve.server.state import EngineClient, ServerState


def create_app(
    engine: EngineClient, config: ServerConfig, metrics_registry: CollectorRegistry | None = None
) -> FastAPI:
    """`metrics_registry`: what GET /metrics serves (the engine observer's); None: the default registry."""
    app = FastAPI(title="fusedserve", version=fusedserve.__version__)
    app.state.server = ServerState(engine=engine, config=config, metrics_registry=metrics_registry)
    app.include_router(router)
    install_error_handlers(app)
    # add_middleware wraps what is already there: the last one added runs first.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_keys:
        open_paths = {"/health"} | ({"/metrics"} if config.metrics_no_auth else set())
        app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys, open_paths=open_paths)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=config.allowed_methods,
            allow_headers=config.allowed_headers,
            allow_credentials=False,
        )
    return app
