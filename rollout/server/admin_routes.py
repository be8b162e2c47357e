"""Control routes under ``/admin`` (mounted only with ``enable_admin``; every call needs the admin key
as ``Authorization: Bearer <admin key>``).

``POST /admin/<method>`` runs the engine's control call of that name with the JSON body as its
keyword arguments and answers ``{"method", "result"}``:

- ``pause`` ``{"mode": "abort"|"wait"|"keep"}``, ``resume``, ``abort_all``, ``reset_prefix_cache``;
- ``abort`` ``{"request_ids": [...]}`` (the ids given to /generate);
- ``update_weights_from_disk`` ``{"path", "version"?, "pause"?}``, ``sleep`` ``{"level", "pause"?}``,
  ``wake_up`` ``{"tags"}``; the weight-group calls (``init_weight_group``, ``begin_weight_update``,
  ``receive_weight_buckets``, ``weight_bucket``, ``finish_weight_update``, ``abort_weight_update``,
  ``destroy_weight_group``) with their keyword arguments as given. A call the engine core does not
  have is answered 501. A field sent as ``null`` counts as not sent (the engine's default applies).

A trainer pushes weights over a process group through these (``WeightSender`` over an
``HTTPRolloutClient`` does it): it hosts the group, posts ``init_weight_group`` (answered once the
engine joined) while joining as rank 0, posts ``begin_weight_update`` with the manifest (every name,
shape and dtype checked: a bad update is a 400 and changes nothing), posts ``receive_weight_buckets``
(answered once the last bucket is written: the new version) while broadcasting the buckets. An update
that gets no call for ``lease_s`` seconds (``begin_weight_update``'s argument, default 600) is ended
by the engine, as ``abort_weight_update`` would: a trainer killed in between does not hold the server.

``GET /admin/info``: what the engine reported at start-up (``device``, ``dtype``, ``device_uuid``,
vocabulary and cache sizes): a weight sender picks its transport and wire dtype from it.
``GET /admin/state?check_invariants=false``: the engine's state, queues, block usage and counters.
Errors: 400 for bad arguments (ValueError/TypeError from the engine), 503 when the engine is dead,
500 for other failures, with OpenAI's error object.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from rollout import messages
from rollout.client import EngineDeadError
from rollout.server.errors import APIError, json_response, parse_body, read_body
from rollout.server.protocol import (
    AbortBody,
    EmptyBody,
    KwargsBody,
    PauseBody,
    SleepBody,
    UpdateFromDiskBody,
    WakeUpBody,
)
from rollout.server.state import ServerState

CALLS: dict[str, type[BaseModel]] = {
    "pause": PauseBody,
    "resume": EmptyBody,
    "abort_all": EmptyBody,
    "reset_prefix_cache": EmptyBody,
    "update_weights_from_disk": UpdateFromDiskBody,
    "init_weight_group": KwargsBody,
    "destroy_weight_group": KwargsBody,
    "begin_weight_update": KwargsBody,
    "receive_weight_buckets": KwargsBody,
    "weight_bucket": KwargsBody,
    "finish_weight_update": KwargsBody,
    "abort_weight_update": KwargsBody,
    "sleep": SleepBody,
    "wake_up": WakeUpBody,
}
"""Control calls the admin routes expose, with the body each one takes."""


def server(request: Request) -> ServerState:
    return request.app.state.server


async def _body(request: Request, model: type[BaseModel]) -> dict[str, Any]:
    st = server(request)
    raw = await read_body(request, st.config.max_request_bytes)
    if not raw.strip():
        raw = b"{}"
    body = parse_body(raw, model).model_dump(exclude_unset=True)
    # A top-level null is "not sent": the bodies' optional fields are None, which is not every call's
    # default (``pause`` is "keep" for updates, "abort" for sleep); no call reads None as more than that.
    return {k: v for k, v in body.items() if v is not None}


async def _call(st: ServerState, method: str, kwargs: dict[str, Any]) -> Any:
    missing = APIError(501, f"this engine has no control call {method!r}", None, "not_implemented")
    known = getattr(messages, "CONTROL_METHODS", None)  # the core would drop an unknown call unanswered
    if known is not None and method not in known:
        raise missing
    try:
        return await st.llm.call(method, **kwargs)
    except EngineDeadError:
        raise
    except (ValueError, TypeError) as e:
        if str(e).startswith("no control method"):
            raise missing from None
        raise APIError(400, str(e)) from None
    except RuntimeError as e:
        raise APIError(500, f"{method} failed: {e}") from None


def build_router() -> APIRouter:
    """The admin routes (the caller adds the admin-key dependency)."""
    router = APIRouter(prefix="/admin")

    def control_route(method: str, model: type[BaseModel]) -> None:
        async def route(request: Request) -> Response:
            kwargs = await _body(request, model)
            result = await _call(server(request), method, kwargs)
            return json_response({"method": method, "result": result})

        route.__name__ = f"admin_{method}"
        router.add_api_route(f"/{method}", route, methods=["POST"], name=f"admin_{method}")

    for method, model in CALLS.items():
        control_route(method, model)

    @router.post("/abort")
    async def admin_abort(request: Request) -> Response:
        body = await _body(request, AbortBody)
        await server(request).llm.abort(body["request_ids"])
        return json_response({"method": "abort", "result": len(body["request_ids"])})

    @router.get("/info")
    async def admin_info(request: Request) -> Response:
        return json_response(dataclasses.asdict(server(request).llm.info))

    @router.get("/state")
    async def admin_state(request: Request, check_invariants: bool = False) -> Response:
        result = await _call(server(request), "get_state", {"check_invariants": check_invariants})
        return json_response(result)

    return router
