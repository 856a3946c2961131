"""A small OpenAI-compatible upstream for the cases the scripted one has no mode for: error
texts that echo a credential back, and stream events of any size, made as they are sent.

The request's ``model`` picks the behaviour: ``leakjson`` (HTTP 500, a JSON error whose message
echoes ``SECRET`` in an Authorization header, then ``PADDING``), ``leaktext`` (HTTP 502, the
same as plain text), ``leakstream`` (a stream reporting that error in an event, as vLLM
reports its errors) and ``bigline`` / ``bigevent`` (a stream whose second event is ``size``
bytes: never finished, or finished by a blank line then ``[DONE]``) and ``hang`` (no answer,
streamed or not, until the client leaves).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port

SECRET = "sk-proj-qzLeak0123456789abcdefABCDEF0123456789"
PADDING = "y" * 2000
LEAK = f'upstream refused the call, headers: {{"Authorization": "Bearer {SECRET}"}} ' + PADDING
PIECE = 1024 * 1024


def _chunk(content: str) -> bytes:
    data = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class LeakyUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.size = 0  # of ``bigline``'s and ``bigevent``'s big event, in bytes
        self.sent = 0  # bytes of the big event sent so far
        self.hanging = 0  # ``hang`` requests received
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LeakyUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "leaky upstream did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def chat(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        mode = body.get("model")
        if mode == "leakjson":
            return JSONResponse({"error": {"message": LEAK}}, status_code=500)
        if mode == "leaktext":
            return PlainTextResponse(LEAK, status_code=502)
        if mode == "hang":
            self.hanging += 1
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return Response(status_code=499)
        return StreamingResponse(self._stream(str(mode)), media_type="text/event-stream")

    async def _stream(self, mode: str) -> AsyncIterator[bytes]:
        yield _chunk("hello")
        if mode == "leakstream":
            yield b"data: " + json.dumps({"error": {"message": LEAK}}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            return
        self.sent = 0
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "'
        while self.sent < self.size:
            piece = b"x" * min(PIECE, self.size - self.sent)
            self.sent += len(piece)
            yield piece
        if mode == "bigevent":
            yield b'"}}]}\n\n' + _chunk("bye") + b"data: [DONE]\n\n"
