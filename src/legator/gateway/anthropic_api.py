"""``POST /v1/messages`` in Anthropic's shape, served by translating to chat completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.http.deps import require
from legator.core.http.disconnect import ClientGone, unless_gone
from legator.gateway.errors import UpstreamError
from legator.gateway.openai_api import check_common, gateway_of, read_json
from legator.gateway.relay import (
    UPSTREAM_ERRORS,
    StreamState,
    call_json,
    died,
    event_json,
    is_done,
    open_stream,
    reported,
    sse_batches,
    stream_response,
)
from legator.gateway.service import CANCELLED, Admission
from legator.gateway.translate import (
    StreamTranslator,
    UnexpectedAnswer,
    UntranslatableStream,
    messages_to_openai,
    openai_to_message,
)

router = APIRouter(prefix="/v1", tags=["inference (Anthropic)"])


@router.post("/messages", summary="Create a message (Anthropic Messages API)")
async def create_message(
    request: Request, principal: Principal = require(Permission.GATEWAY_INFER)
) -> Response:
    """Anthropic's Messages API: system prompt, tools, stop sequences and streaming events."""
    body = await read_json(request)
    model, stream = check_common(body)
    chat = messages_to_openai(body)
    stops = list(chat.get("stop") or [])
    try:
        adm = await gateway_of(request).admit(
            principal, model, request, endpoint="messages", stream=stream
        )
    except ClientGone:
        return Response(status_code=499)
    name = model or adm.model.id
    if not stream:
        status, tokens_in, tokens_out = 499, 0, 0
        try:
            data = await unless_gone(request, call_json(adm, "/chat/completions", chat))
            try:
                message = openai_to_message(data, name, stops)
            except UnexpectedAnswer as exc:
                raise UpstreamError(f"model {adm.model.id!r} backend's answer: {exc}") from None
            tokens_in = message["usage"]["input_tokens"]
            tokens_out = message["usage"]["output_tokens"]
            status = 200
            return JSONResponse(message)
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
    try:
        upstream = await open_stream(adm, "/chat/completions", chat, request)
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
    state = StreamState()
    content = _events(adm, upstream, state, StreamTranslator(name, stops))
    return stream_response(adm, upstream, content, state)


async def _events(
    adm: Admission,
    upstream: aiohttp.ClientResponse,
    state: StreamState,
    translator: StreamTranslator,
) -> AsyncIterator[bytes]:
    yield translator.start()
    tail = b""
    try:
        async for batch in sse_batches(upstream, adm.gateway.max_answer_bytes):
            out = b""
            for event in batch:
                if is_done(event):
                    state.done = True
                    break
                data: Any = event_json(event)
                if not isinstance(data, dict):
                    continue
                if failure := reported(adm, data):
                    state.error = failure
                    break
                state.take_usage(data)
                state.chunks += 1
                try:
                    out += translator.feed(data)
                except UntranslatableStream as exc:
                    out += translator.drain()  # what the chunk began, for the end to close
                    state.error = f"model {adm.model.id!r}: {exc}"
                    break
            if state.done or state.error:
                tail = out  # leaves with the end of the stream, in one write
                break
            if out:
                yield out
    except UPSTREAM_ERRORS as exc:
        state.error = died(adm, exc)
    if not state.done and state.error is None:
        state.error = f"the backend of model {adm.model.id!r} ended the stream early"
    state.last = True
    yield tail + translator.end(state.error)
