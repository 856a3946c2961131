"""What the gateway asks of a backend: answers uncompressed, so that a backend that compresses
when offered (behind nginx's gzip, say) is relayed, not read as garbage. And a key in
x-api-key is found beside a proxy's Basic Authorization."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.gateway.conftest import register
from tests.support import LiveServer, free_port

ANSWER = {
    "id": "chatcmpl-gz",
    "object": "chat.completion",
    "created": 1,
    "model": "gz",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "uncompressed " * 40},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43},
}


@pytest.fixture
def gzip_upstream() -> Iterator[tuple[str, list[str]]]:
    """A backend that compresses whatever it may (GZipMiddleware); yields its URL and the
    Accept-Encoding of each request."""
    offered: list[str] = []

    async def chat(request: Request) -> JSONResponse:
        offered.append(request.headers.get("accept-encoding", ""))
        return JSONResponse(ANSWER)

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"])],
        middleware=[Middleware(GZipMiddleware, minimum_size=10)],
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", offered
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_backend_that_compresses_is_relayed(
    gw: LiveServer, admin: httpx.Client, gzip_upstream: tuple[str, list[str]]
) -> None:
    url, offered = gzip_upstream
    register(admin, "gz", url)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.admin_key, max_retries=0)
    answer = client.chat.completions.create(
        model="gz", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == ANSWER["choices"][0]["message"]["content"]  # type: ignore[index]
    assert offered == ["identity"]


def test_x_api_key_beside_a_basic_authorization(gw: LiveServer) -> None:
    headers = {"Authorization": "Basic Zm9vOmJhcg==", "x-api-key": gw.admin_key}
    with httpx.Client(base_url=gw.url, headers=headers) as client:
        assert client.get("/v1/models").status_code == 200
        wrong = {"Authorization": "Bearer lgk_" + "0" * 64}
        assert client.get("/v1/models", headers=wrong).status_code == 401  # Bearer wins
