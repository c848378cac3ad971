"""The FastAPI application: routes, error mapping, middleware, and the in-process worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from safereset import __version__
from safereset.runtime import Runtime
from safereset.web import api, errors, pages
from safereset.web.security import HttpMiddleware

log = logging.getLogger("safereset.http")


def create_app(runtime: Runtime, *, run_worker: bool | None = None) -> FastAPI:
    """Build the app; the mail worker runs inside it unless ``run_worker`` is False."""
    with_worker = runtime.settings.run_worker if run_worker is None else run_worker

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.worker().run(stop)) if with_worker else None
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task

    app = FastAPI(
        title="safereset",
        version=__version__,
        summary="Account recovery built on explicit state machines.",
        docs_url=None,  # Swagger UI loads scripts from a CDN, which the CSP forbids.
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = runtime.service
    app.state.https = runtime.settings.public_url.startswith("https://")
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).with_name("static")), name="static")
    errors.install(app)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/forgot", status_code=303)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        # Browsers ask for it on their own; an empty response keeps their consoles quiet.
        return Response(status_code=204)

    @app.get("/healthz", tags=["operations"])
    def health(request: Request) -> JSONResponse:
        """Report whether the database responds to a query."""
        try:
            with runtime.service.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as error:
            log.warning("health check failed: %s", type(error).__name__)
            return JSONResponse({"status": "unavailable"}, 503)
        return JSONResponse({"status": "ok"})

    app.add_middleware(
        HttpMiddleware,
        https=app.state.https,
        trusted_proxies=runtime.settings.proxy_networks,
    )
    return app
