"""The FastAPI application: routes, error handlers, the playground's static files, and the
engine's life cycle (its thread starts with the app, so /health answers 503 while it loads)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ondo.engine.async_engine import AsyncEngine
from ondo.server.errors import install_error_handlers
from ondo.server.routes import api, router
from ondo.server.serving import ServerState

STATIC_DIR = Path(__file__).parent / "static"

_DESCRIPTION = """OpenAI-compatible API of ondo, a self-hosted LLM inference engine.

`/v1/completions` and `/v1/chat/completions` take OpenAI's requests plus ondo's decoding options
(top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, min_tokens, ...). Errors use
OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. The playground is at `/`."""


def create_app(engine: AsyncEngine, served_model_name: str | None = None, api_key: str | None = None,
               tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> FastAPI:
    """The app serving `engine`; the engine is started (loaded) when the app starts."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.abort_all()
            await asyncio.to_thread(engine.shutdown)

    from ondo import __version__

    app = FastAPI(title="ondo", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.ondo = ServerState(engine, served_model_name, api_key, tool_call_parser, reasoning_parser)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app
