"""``/v1`` in OpenAI's shape: chat completions, completions, embeddings and the model list."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import BadRequest
from legator.core.http.deps import require
from legator.core.http.disconnect import ClientGone, unless_gone
from legator.gateway.counts import usage_counts
from legator.gateway.errors import UpstreamError
from legator.gateway.relay import (
    StreamState,
    call_upstream,
    open_stream,
    openai_events,
    stream_response,
)
from legator.gateway.service import CANCELLED, Admission, Gateway

router = APIRouter(prefix="/v1", tags=["inference (OpenAI)"])
INFER = require(Permission.GATEWAY_INFER)
_REQUIRED = {
    "chat": ("messages", list),
    "completions": ("prompt", (str, list)),
    "embeddings": ("input", (str, list)),
}
_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


class _NotJson(ValueError):
    """NaN, Infinity or -Infinity: Python's json takes them, JSON (and backends) have none."""


def _no_constant(name: str) -> Any:
    raise _NotJson(f"request body is not valid JSON: {name} is not a JSON value")


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except _NotJson as exc:
        raise BadRequest(str(exc)) from None
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def check_common(body: dict[str, Any]) -> tuple[str | None, bool]:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BadRequest("model: must be a non-empty string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be true or false")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options: must be an object")
    if options and not isinstance(options.get("include_usage", False), bool | None):
        raise BadRequest("stream_options.include_usage: must be true or false")
    return model, stream


async def relay_openai(
    request: Request, principal: Principal, kind: str, body: dict[str, Any]
) -> Response:
    field, types = _REQUIRED[kind]
    model, stream = check_common(body)
    if field not in body:
        raise BadRequest(f"{field}: field required")
    if not isinstance(body[field], types) or (kind == "chat" and not body[field]):
        raise BadRequest(f"{field}: must be a non-empty {'list' if kind == 'chat' else 'value'}")
    if kind == "embeddings":
        stream = False
    gateway = gateway_of(request)
    try:
        adm = await gateway.admit(principal, model, request, endpoint=kind, stream=stream)
    except ClientGone:
        return Response(status_code=499)
    path = _PATHS[kind]
    if not stream:
        return await _one_shot(adm, request, path, body)
    try:
        upstream = await open_stream(adm, path, body, request)
    except UpstreamError as exc:
        adm.finish(exc.status)
        raise
    except ClientGone:
        adm.finish(499)
        return Response(status_code=499)
    except asyncio.CancelledError:
        adm.finish(CANCELLED)
        raise
    except BaseException:
        adm.finish(499)
        raise
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    state = StreamState()
    content = openai_events(adm, upstream, state, wants_usage)
    return stream_response(adm, upstream, content, state)


async def _one_shot(adm: Admission, request: Request, path: str, body: dict[str, Any]) -> Response:
    status, tokens_in, tokens_out = 499, 0, 0
    try:
        data, raw = await unless_gone(request, call_upstream(adm, path, body))
        tokens_in, tokens_out = usage_counts(data.get("usage"))
        status = 200
        return Response(raw, media_type="application/json")
    except UpstreamError as exc:
        status = exc.status
        raise
    except ClientGone:
        return Response(status_code=499)
    except asyncio.CancelledError:
        status = CANCELLED
        raise
    finally:
        adm.finish(status, tokens_in, tokens_out)


@router.post("/chat/completions", summary="Create a chat completion")
async def chat_completions(request: Request, principal: Principal = INFER) -> Response:
    """OpenAI's chat completions; `stream: true` relays server-sent events as they come."""
    return await relay_openai(request, principal, "chat", await read_json(request))


@router.post("/completions", summary="Create a text completion")
async def completions(request: Request, principal: Principal = INFER) -> Response:
    return await relay_openai(request, principal, "completions", await read_json(request))


@router.post("/embeddings", summary="Create embeddings")
async def embeddings(request: Request, principal: Principal = INFER) -> Response:
    return await relay_openai(request, principal, "embeddings", await read_json(request))


@router.get("/models", summary="Models this key may use")
async def list_models(request: Request, principal: Principal = INFER) -> dict[str, Any]:
    models = gateway_of(request).catalog.visible(principal)
    return {
        "object": "list",
        "data": [
            {
                "id": m.id,
                "object": "model",
                "created": int(m.created_at.timestamp()),
                "owned_by": "legator",
                "name": m.name or m.id,
                "context_length": m.context_length,
                "state": m.state,
            }
            for m in models
        ],
    }
