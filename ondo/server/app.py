"""The FastAPI application: routes, error handlers, the playground's static files, and the
engine's life cycle (its thread starts with the app, so /health answers 503 while it loads)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ondo.engine.async_engine import AsyncEngine
from ondo.server.errors import install_error_handlers
from ondo.server.guard import GuardMiddleware, ServerLimits
from ondo.server.routes import api, require_api_key, router
from ondo.server.serving_lora import router as lora_router
from ondo.server.serving import ServerState

STATIC_DIR = Path(__file__).parent / "static"

_DESCRIPTION = """OpenAI-compatible API of ondo, a self-hosted LLM inference engine.

`/v1/completions` and `/v1/chat/completions` take OpenAI's requests plus ondo's decoding options
(top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, min_tokens, ...). Errors use
OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. The playground is at `/`."""


def create_app(engine: AsyncEngine, served_model_name: str | None = None, api_key: str | None = None,
               tool_call_parser: str | None = None, reasoning_parser: str | None = None,
               limits: ServerLimits | None = None, accept_once_loaded: bool = False) -> FastAPI:
    """The app serving `engine`; the engine is started (loaded) when the app starts.
    `accept_once_loaded`: the app starts (and takes connections) only once the engine is loaded; an
    API server process that shares its socket with one already answering leaves them to it meanwhile."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if accept_once_loaded:
            await asyncio.to_thread(engine.wait_until_loaded)
        try:
            yield
        finally:
            engine.abort_all()
            await asyncio.to_thread(engine.shutdown)

    from ondo import __version__

    app = FastAPI(title="ondo", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    state = ServerState(engine, served_model_name, api_key, tool_call_parser, reasoning_parser)
    app.state.ondo = state
    # Outermost: request ids, shutdown refusals, the API key before the body, the body's cap.
    app.add_middleware(GuardMiddleware, limits=limits or ServerLimits(), api_key=api_key,
                       is_draining=lambda: state.draining)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(api)
    app.include_router(lora_router, dependencies=[Depends(require_api_key)])
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app
