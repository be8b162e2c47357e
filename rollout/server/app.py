"""Build the FastAPI app of one server over one ``AsyncLLM``.

Routes: OpenAI's (``openai_routes``), the native ones (``native_routes``), the control routes
(``admin_routes``, only with ``ServerConfig.enable_admin``). Keys are checked in constant time from
``Authorization: Bearer <key>``: the API key guards /v1/*, /generate, /tokenize and /detokenize;
/health, /version and /metrics stay open; the admin key alone opens /admin/*. Everything the app
holds is on ``app.state.server`` (a ``ServerState``).

One app serves one event loop (the ``AsyncLLM``'s); run it in a single uvicorn worker.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request

import rollout
from rollout.async_llm import AsyncLLM
from rollout.server import admin_routes, native_routes, openai_routes
from rollout.server.errors import APIError, install_error_handlers
from rollout.server.metrics import ServerMetrics
from rollout.server.state import ServerConfig, ServerState


def bearer_guard(key: str, what: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses (401) a request without ``Authorization: Bearer <key>``."""
    expected = key.encode()

    async def guard(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(
                401, f"missing or wrong {what} (send 'Authorization: Bearer <key>')", None, "invalid_api_key"
            )

    return guard


def load_tokenizer(llm: AsyncLLM) -> Any | None:
    """The engine's tokenizer, loaded in this process (None when the model has none)."""
    if not llm.info.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm.client.model_path)


def build_app(
    llm: AsyncLLM, config: ServerConfig, *, tokenizer: Any | None = None, shutdown_engine: bool = True
) -> FastAPI:
    """The app serving ``llm``. ``tokenizer`` defaults to the model's own; with ``shutdown_engine``
    the engine stops when the app shuts down."""
    state = ServerState(
        config=config,
        llm=llm,
        tokenizer=tokenizer if tokenizer is not None else load_tokenizer(llm),
        metrics=ServerMetrics(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await llm.get_state()  # starts the output reader on this loop; fails early on a dead engine
        try:
            yield
        finally:
            if shutdown_engine:
                await llm.aclose()

    app = FastAPI(
        title="rollout-engine",
        version=rollout.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    install_error_handlers(app)
    api_deps = [Depends(bearer_guard(config.api_key, "API key"))] if config.api_key else []
    app.include_router(openai_routes.router, dependencies=api_deps)
    app.include_router(native_routes.router, dependencies=api_deps)
    app.include_router(native_routes.open_router)
    if config.enable_admin:
        assert config.admin_key  # ServerConfig refuses enable_admin without a key
        admin_deps = [Depends(bearer_guard(config.admin_key, "admin key"))]
        app.include_router(admin_routes.build_router(), dependencies=admin_deps)
    return app
