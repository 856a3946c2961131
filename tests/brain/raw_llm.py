"""A fake LLM server that sends exactly the Server-Sent Events a test scripts, well formed or
not: OpenAI's chat completions (``/v1/chat/completions``) and Anthropic's Messages API
(``/v1/messages``) over real HTTP, for the failures and limits the scripted LLM
(``llm_server``) cannot produce: malformed events, a stream that breaks off or never ends,
answers past a limit, error bodies that quote the caller's key.

Each request takes the next step of ``script``: a list of raw SSE events (strings, sent as
they are; ``DROP`` breaks the connection there), an async generator function (for a stream
that trickles), or ``{"status": 401, "body": ...}``. With no step left, the answer is a short
text. The builders below write well-formed answers in either format."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port

DROP = "<drop the connection>"
Tools = Sequence[tuple[str, dict[str, Any]]]
Step = list[str] | Callable[[], AsyncIterator[str]] | dict[str, Any]


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {body}\n\n"


# ---- OpenAI chat completions -------------------------------------------------------------------


def chunk(delta: Any, finish: str | None = None, **extra: Any) -> str:
    data = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "raw",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return sse(data)


def usage_chunk(prompt: Any = 11, completion: Any = 7) -> str:
    return sse(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "raw",
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        }
    )


def tool_part(index: Any, name: Any, arguments: Any, call_id: Any = None) -> str:
    call = {"index": index, "type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    return chunk({"tool_calls": [call]})


def openai_answer(text: str = "", tools: Tools = ()) -> list[str]:
    events = [chunk({"role": "assistant", "content": ""})]
    if text:
        events.append(chunk({"content": text}))
    for index, (name, arguments) in enumerate(tools):
        events.append(tool_part(index, name, json.dumps(arguments), f"call_{index}"))
    events += [chunk({}, "tool_calls" if tools else "stop"), usage_chunk(), "data: [DONE]\n\n"]
    return events


# ---- Anthropic Messages --------------------------------------------------------------------------


def message_start(input_tokens: Any = 13) -> str:
    message = {
        "id": "msg_raw",
        "type": "message",
        "role": "assistant",
        "model": "raw",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    return sse({"type": "message_start", "message": message}, "message_start")


def block_start(index: Any, block: dict[str, Any]) -> str:
    data = {"type": "content_block_start", "index": index, "content_block": block}
    return sse(data, "content_block_start")


def block_delta(index: Any, delta: dict[str, Any]) -> str:
    return sse(
        {"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"
    )


def block_stop(index: int) -> str:
    return sse({"type": "content_block_stop", "index": index}, "content_block_stop")


def message_end(stop: str = "end_turn", output_tokens: Any = 9) -> list[str]:
    delta = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}}
    return [
        sse({**delta, "usage": {"output_tokens": output_tokens}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]


def anthropic_answer(text: str = "", tools: Tools = ()) -> list[str]:
    events = [message_start()]
    index = 0
    if text:
        events += [
            block_start(0, {"type": "text", "text": ""}),
            block_delta(0, {"type": "text_delta", "text": text}),
            block_stop(0),
        ]
        index = 1
    for name, arguments in tools:
        events += [
            block_start(
                index, {"type": "tool_use", "id": f"toolu_{index}", "name": name, "input": {}}
            ),
            block_delta(index, {"type": "input_json_delta", "partial_json": json.dumps(arguments)}),
            block_stop(index),
        ]
        index += 1
    return events + message_end("tool_use" if tools else "end_turn")


def answer(provider: str, text: str = "", tools: Tools = ()) -> list[str]:
    """A well-formed streamed answer in ``provider``'s wire format."""
    build = openai_answer if provider == "openai" else anthropic_answer
    return build(text, tools)


# ---- the server --------------------------------------------------------------------------------


class RawLLM:
    def __init__(self) -> None:
        self.script: list[Step] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # of each request, as received
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stopping = False
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._openai, methods=["POST"]),
                Route("/v1/messages", self._anthropic, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def base_url(self, provider: str) -> str:
        """The base URL each SDK expects: OpenAI's ends in ``/v1``, Anthropic's does not."""
        return f"{self.url}/v1" if provider == "openai" else self.url

    def __enter__(self) -> RawLLM:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(10)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "raw", "object": "model"}]})

    async def _openai(self, request: Request) -> Response:
        return await self._answer(request, "openai")

    async def _anthropic(self, request: Request) -> Response:
        return await self._answer(request, "anthropic")

    async def _answer(self, request: Request, provider: str) -> Response:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        step = self.script.pop(0) if self.script else answer(provider, "done.")
        if isinstance(step, dict):
            return Response(
                json.dumps(step["body"]), status_code=step["status"], media_type="application/json"
            )
        if callable(step):
            return StreamingResponse(self._until_stopped(step()), media_type="text/event-stream")
        return StreamingResponse(self._events(step), media_type="text/event-stream")

    async def _until_stopped(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        async for event in events:
            if self._stopping:
                return
            yield event

    @staticmethod
    async def _events(events: list[str]) -> AsyncIterator[str]:
        for event in events:
            if event == DROP:
                raise RuntimeError("the fake provider drops the connection")  # uvicorn aborts
            yield event
