"""The official SDKs through the gateway to a real llama.cpp server (llama-cpp-python)
loading a tiny random-weight GGUF that the fixture writes. The text is gibberish; the
protocol, streaming, tools, usage and slots are real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.gateway.conftest import register
from tests.gateway.llama_server import llama_server
from tests.support import LiveServer, live_server

pytestmark = pytest.mark.slow
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_server(log, n_ctx=512, extra=("--chat_format", "chatml-function-calling")) as url:
        yield url


@pytest.fixture
def gateway(tmp_path: Path, llama_url: str) -> Iterator[LiveServer]:
    with live_server(tmp_path / "data") as server, server.client(server.admin_key) as api:
        register(api, "tiny", llama_url, name="Tiny llama", context_length=512)
        yield server


def test_openai_sdk_chat_streaming_and_not(gateway: LiveServer) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.admin_key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert len(chunks) >= 2
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    gateway.call(gateway.app.state.gateway.recorder.flush())  # type: ignore[union-attr]
    with gateway.client(gateway.admin_key) as api:
        usage = api.get("/api/v1/gateway/usage", params={"period": "hour"}).json()
    assert usage["requests"] == 2
    assert usage["output_tokens"] >= 2


def test_openai_sdk_tools(gateway: LiveServer) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.admin_key, max_retries=0)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[TOOL],  # type: ignore[list-item]
        tool_choice=choice,  # type: ignore[arg-type]
        max_tokens=24,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments.startswith("{")
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[TOOL],  # type: ignore[list-item]
        tool_choice=choice,  # type: ignore[arg-type]
        max_tokens=24,
        stream=True,
    )
    names = {
        call.function.name
        for chunk in stream
        if chunk.choices and chunk.choices[0].delta.tool_calls
        for call in chunk.choices[0].delta.tool_calls
        if call.function and call.function.name
    }
    assert names == {"get_weather"}


def test_anthropic_sdk_messages_streaming_and_tools(gateway: LiveServer) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.admin_key, max_retries=0)
    message = client.messages.create(
        model="tiny",
        max_tokens=8,
        system="You are terse.",
        messages=[{"role": "user", "content": "hello"}],
    )
    assert message.role == "assistant" and message.stop_reason in ("max_tokens", "end_turn")
    assert message.usage.input_tokens > 0
    with client.messages.stream(
        model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    tool = {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": TOOL["function"]["parameters"],  # type: ignore[index]
    }
    # The raw event stream: the SDK's accumulating helper would json-parse the random
    # model's arguments, which may hold control characters.
    events = list(
        client.messages.create(
            model="tiny",
            max_tokens=24,
            tools=[tool],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "get_weather"},
            messages=[{"role": "user", "content": "weather in Paris?"}],
            stream=True,
        )
    )
    starts = [e for e in events if e.type == "content_block_start"]
    assert any(getattr(e.content_block, "name", "") == "get_weather" for e in starts)
    partial = "".join(
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    assert partial.startswith("{")
    assert events[-1].type == "message_stop"
