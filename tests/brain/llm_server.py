"""A scripted LLM server speaking OpenAI's chat completions and Anthropic's Messages API
over real HTTP, streamed as Server-Sent Events with the real tool-call wire format.

Each request takes the next step of the script: ``{"text": ..., "tools": [(name, args)]}``,
``{"status": 503}`` for an outage, or a callable that builds a step from the request body.
Every request body is kept in ``requests`` so tests can check what the model was shown, and
the connection (client address and port) each came on in ``connections``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port

Step = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def _pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class ScriptedLLM:
    def __init__(self, script: list[Step] | None = None) -> None:
        self.script: list[Step] = list(script or [])
        self.requests: list[dict[str, Any]] = []
        self.keys: list[str] = []  # the API key each request carried
        self.connections: list[tuple[str, int] | None] = []  # the caller's (host, port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._openai, methods=["POST"]),
                Route("/v1/messages", self._anthropic, methods=["POST"]),
            ]
        )
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ScriptedLLM:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def _next(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.keys.append(request.headers.get("x-api-key") or bearer)
        self.connections.append(
            (request.client.host, request.client.port) if request.client else None
        )
        self.requests.append(body)
        if not self.script:
            return {"status": 500, "message": "the script has no more steps"}
        step = self.script.pop(0)
        return step(body) if callable(step) else step

    # ---- OpenAI --------------------------------------------------------------------------

    async def _openai(self, request: Request) -> Response:
        body = await request.json()
        step = self._next(request, body)
        if "status" in step:
            return JSONResponse(
                {"error": {"message": step.get("message", "outage"), "type": "server_error"}},
                status_code=step["status"],
            )
        return StreamingResponse(self._openai_events(step), media_type="text/event-stream")

    def _openai_events(self, step: dict[str, Any]) -> Iterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return _sse(
                {
                    "id": "chatcmpl-scripted",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": "scripted",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            )

        yield chunk({"role": "assistant", "content": ""})
        for piece in _pieces(step.get("text", "")) if step.get("text") else []:
            yield chunk({"content": piece})
        for index, (name, arguments) in enumerate(step.get("tools", [])):
            yield chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": f"call_{index}_{name}",
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
            for piece in _pieces(json.dumps(arguments)):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        yield chunk({}, "tool_calls" if step.get("tools") else "stop")
        yield _sse(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": "scripted",
                "choices": [],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            }
        )
        yield "data: [DONE]\n\n"

    # ---- Anthropic -----------------------------------------------------------------------

    async def _anthropic(self, request: Request) -> Response:
        body = await request.json()
        step = self._next(request, body)
        if "status" in step:
            return JSONResponse(
                {
                    "type": "error",
                    "error": {"type": "overloaded_error", "message": step.get("message", "")},
                },
                status_code=step["status"],
            )
        return StreamingResponse(self._anthropic_events(step), media_type="text/event-stream")

    def _anthropic_events(self, step: dict[str, Any]) -> Iterator[str]:
        message = {
            "id": "msg_scripted",
            "type": "message",
            "role": "assistant",
            "model": "scripted",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 13, "output_tokens": 1},
        }
        yield _sse({"type": "message_start", "message": message}, "message_start")
        index = 0
        if step.get("text"):
            yield _sse(
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            )
            for piece in _pieces(step["text"]):
                yield _sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                    "content_block_delta",
                )
            yield _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            index += 1
        for name, arguments in step.get("tools", []):
            yield _sse(
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {
                        "type": "tool_use",
                        "id": f"toolu_{index}_{name}",
                        "name": name,
                        "input": {},
                    },
                },
                "content_block_start",
            )
            for piece in _pieces(json.dumps(arguments)):
                yield _sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece},
                    },
                    "content_block_delta",
                )
            yield _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            index += 1
        stop = "tool_use" if step.get("tools") else "end_turn"
        yield _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
            "message_delta",
        )
        yield _sse({"type": "message_stop"}, "message_stop")


def tool_results(body: dict[str, Any]) -> list[str]:
    """The tool results the model was shown in a request, in either wire format."""
    out: list[str] = []
    for message in body.get("messages", []):
        if message.get("role") == "tool":
            out.append(str(message.get("content")))
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    out.append(str(block.get("content")))
    return out
