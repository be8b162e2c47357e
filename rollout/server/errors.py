"""OpenAI's error object for every failure, and strict body parsing that produces it.

Every error response is ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
OpenAI uses: 400 bad request (``param`` names the offending field), 401 bad or missing key, 404
unknown model or route, 413 body too large, 501 not supported by this engine, 503 engine dead.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollout.client import EngineDeadError

M = TypeVar("M", bound=BaseModel)
_log = logging.getLogger("rollout.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to answer with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A compact JSON response (json.dumps, no pydantic serialization on the hot path)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(err: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return json_response(err.body(), err.status, headers)


def bad_value(e: ValueError | TypeError, fields: dict[str, str] | None = None) -> APIError:
    """A 400 for a ValueError/TypeError raised by the engine's checks. ``param`` is the field the
    message starts with (SamplingParams and prompt checks name it first), mapped through ``fields``
    (engine name -> request field name)."""
    text = str(e)
    m = re.match(r"(\w+)", text)
    word = m.group(1) if m else None
    fields = fields or {}
    param = fields.get(word, word) if word is not None else None
    if word == "unknown":  # "unknown SamplingParams field(s): a, b"
        param = text.rsplit(": ", 1)[-1].split(",")[0].strip() or None
    return APIError(400, text, param)


def parse_body(raw: bytes, model: type[M]) -> M:
    """Parse a JSON body strictly into ``model``; a 400 naming the first bad field otherwise."""
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('msg')}")
    if err["type"] in ("model_type", "model_attributes_type") and not loc:
        return APIError(400, "the body must be a JSON object")
    where = ".".join(loc) if loc else "body"
    count = e.error_count()
    more = f" (and {count - 1} more error{'s' if count > 2 else ''})" if count > 1 else ""
    return APIError(400, f"{where}: {err['msg']}{more}", loc[0] if loc else None)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it grows past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def engine_dead(exc: EngineDeadError) -> APIError:
    """The 503 for a dead engine: its cause (a traceback with the server's paths) goes to the
    server's log, not to the client."""
    _log.error("the engine is not running: %s", exc)
    return APIError(503, "the engine is not running (the cause is in the server's log)")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error (ours, routing's, FastAPI's own validation, engine death) with the error
    object; other exceptions become a 500 with the object too (and are logged by uvicorn)."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(APIError(exc.status_code, message))

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
        return error_response(APIError(400, f"{'.'.join(loc)}: {first.get('msg')}", loc[0] if loc else None))

    async def on_dead(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineDeadError)
        return error_response(engine_dead(exc))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(EngineDeadError, on_dead)
