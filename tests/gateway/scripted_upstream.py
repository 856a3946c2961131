"""A scripted OpenAI-compatible server for exact-output and failure cases.

The request's ``model`` picks the behaviour: ``echo`` (default), ``slow`` (50 ms per chunk,
0.5 s per answer), ``die`` (the connection drops mid-stream), ``fail500``, ``tools``,
``redirect`` (a 307 to a private address of its own, as a hostile backend could send) and
``huge`` (an answer, or a stream's first event, of ``HUGE_BYTES`` that never ends) and
``reports`` (a stream that reports an error in an event after two chunks, as vLLM does) and
``badusage`` (echo, with a usage that no column holds and one that is not a number) and
``slowjson`` (echo, after ``SLOW_JSON_S``, before a stream's headers too; it gives up when the
gateway disconnects, counted in ``abandoned``) and ``donenospace``/``doneid`` (streams ending
``data:[DONE]``, or ``id: 3`` then ``data: [DONE]``) and ``html``/``ignorestream`` (a stream
asked for, answered 200 with an HTML page, or with a JSON completion).
Every request body it received is kept in ``requests`` so tests can check what the gateway sent.
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
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port

TOOL_ARGS = '{"city": "Paris"}'
REPORTED = "out of memory on the GPU"
# What ``redirect`` points the gateway at: only this host can read it.
INTERNAL_SECRET = {"AccessKeyId": "ASIA-INTERNAL-ONLY", "SecretAccessKey": "never-to-a-client"}
HUGE_BYTES = 3 * 1024 * 1024
SLOW_JSON_S = 5.0
# How the modes that end a stream differently end it; the others send ``data: [DONE]``.
DONE_LINES = {"donenospace": b"data:[DONE]\n\n", "doneid": b"id: 3\ndata: [DONE]\n\n"}


def reply_text(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    last = messages[-1]["content"] if messages else body.get("prompt", "")
    if isinstance(last, list):
        last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
    return f"echo: {last}"


def words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p if i == 0 else " " + p for i, p in enumerate(parts)]


# What ``badusage`` reports: a count no column holds, a count that is not a number.
BAD_USAGE = {"prompt_tokens": 5_000_000_000, "completion_tokens": "lots", "total_tokens": -1}


def usage(body: dict[str, Any], completion: int) -> dict[str, Any]:
    if body.get("model") == "badusage":
        return BAD_USAGE
    prompt = len(json.dumps(body.get("messages") or body.get("prompt") or "").split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    data = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "scripted",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class ScriptedUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[dict[str, Any]] = []
        self.active_streams = 0
        self.slow_answers = 0  # ``slow`` answers being prepared now
        self.peak_slow_answers = 0  # the most at once
        self.abandoned = 0  # ``slowjson`` requests whose client (the gateway) left first
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/internal/credentials", self.internal, methods=["GET", "POST"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ScriptedUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "scripted upstream did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def internal(self, _request: Request) -> Response:
        return JSONResponse(INTERNAL_SECRET)

    async def models(self, _request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "echo", "object": "model"}]})

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return JSONResponse(
            {
                "object": "list",
                "model": body.get("model"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.5, float(len(text))]}
                    for i, text in enumerate(inputs)
                ],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        )

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        text = reply_text(body)
        return JSONResponse(
            {
                "id": "cmpl-scripted",
                "object": "text_completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": usage(body, len(words(text))),
            }
        )

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        mode = body.get("model", "echo")
        if mode == "fail500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode == "ratelimited":
            error = {"error": {"message": "slow down", "type": "rate_limit_error"}}
            return JSONResponse(error, status_code=429, headers={"Retry-After": "7"})
        if mode == "redirect":
            location = f"http://127.0.0.1:{self.port}/internal/credentials"
            return Response(status_code=307, headers={"location": location})
        if mode == "huge":
            return StreamingResponse(_endless_event(), media_type="text/event-stream")
        if mode == "slow" and not body.get("stream"):
            self.slow_answers += 1
            self.peak_slow_answers = max(self.peak_slow_answers, self.slow_answers)
            try:
                await asyncio.sleep(0.5)
            finally:
                self.slow_answers -= 1
        if mode == "slowjson" and not await self._outwait(request, SLOW_JSON_S):
            return Response(status_code=499)
        if mode == "html" and body.get("stream"):
            return Response("<html><body>Welcome to nginx!</body></html>", media_type="text/html")
        if body.get("stream") and mode != "ignorestream":
            return StreamingResponse(self._stream(body, mode), media_type="text/event-stream")
        if mode == "shapeless":  # JSON, but not a chat completion's shape
            return JSONResponse({"choices": [{"message": "hello"}]})
        text = reply_text(body)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = "stop"
        if mode == "tools":
            name = body["tools"][0]["function"]["name"]
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": name, "arguments": TOOL_ARGS},
                    }
                ],
            }
            finish = "tool_calls"
        return JSONResponse(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": 1,
                "model": mode,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage(body, len(words(text))),
            }
        )

    async def _outwait(self, request: Request, seconds: float) -> bool:
        """Whether the client stayed connected for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if await request.is_disconnected():
                self.abandoned += 1
                return False
        return True

    async def _stream(self, body: dict[str, Any], mode: str) -> AsyncIterator[bytes]:
        self.active_streams += 1
        try:
            yield chunk({"role": "assistant", "content": ""})
            pieces = words(reply_text(body))
            if mode == "tools":
                name = body["tools"][0]["function"]["name"]
                yield chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    }
                )
                for part in ('{"city": ', '"Paris"}'):
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                yield chunk({}, "tool_calls")
            else:
                for i, piece in enumerate(pieces):
                    if mode == "slow":
                        await asyncio.sleep(0.05)
                    if mode == "die" and i == 2:
                        raise RuntimeError("scripted upstream dies mid-stream")
                    if mode == "shapeless" and i == 2:
                        yield b'data: {"choices": ["x"]}\n\n'
                        continue
                    if mode == "reports" and i == 2:
                        error = {"error": {"message": REPORTED, "type": "server_error"}}
                        yield b"data: " + json.dumps(error).encode() + b"\n\n"
                        yield b"data: [DONE]\n\n"
                        return
                    yield chunk({"content": piece})
                yield chunk({}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                data = {
                    "id": "chatcmpl-scripted",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": mode,
                    "choices": [],
                    "usage": usage(body, len(pieces)),
                }
                yield b"data: " + json.dumps(data).encode() + b"\n\n"
            yield DONE_LINES.get(mode, b"data: [DONE]\n\n")
        finally:
            self.active_streams -= 1


async def _endless_event() -> AsyncIterator[bytes]:
    """``HUGE_BYTES`` of one event (or JSON body) that is never finished, in 64 KiB reads."""
    yield b'data: {"choices": [{"delta": {"content": "'
    piece = b"x" * 65536
    for _ in range(HUGE_BYTES // len(piece)):
        yield piece
