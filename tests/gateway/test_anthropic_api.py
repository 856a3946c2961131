"""/v1/messages with the official anthropic SDK, translated, against the scripted upstream."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.gateway.conftest import register, usage_statuses
from tests.gateway.scripted_upstream import REPORTED, ScriptedUpstream
from tests.support import LiveServer

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def sdk(gw: LiveServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)


def test_message_with_system_blocks_and_stop_sequences(
    gw: LiveServer, upstream: ScriptedUpstream
) -> None:
    message = sdk(gw, gw.admin_key).messages.create(
        model="echo",
        max_tokens=64,
        system=[{"type": "text", "text": "be brief"}],
        stop_sequences=["END"],
        extra_body={"temperature": 0.2},
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hi there"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 3
    sent = upstream.requests[-1]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["stop"] == ["END"]
    assert sent["max_tokens"] == 64 and sent["temperature"] == 0.2


def test_streaming_event_sequence(gw: LiveServer) -> None:
    client = sdk(gw, gw.admin_key)
    with client.messages.stream(
        model="echo", max_tokens=32, messages=[{"role": "user", "content": "a b c"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert kinds[-2] == "message_delta" or "message_delta" in kinds
    assert final.content[0].text == "echo: a b c"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4


def test_tools_round_trip(gw: LiveServer, upstream: ScriptedUpstream) -> None:
    client = sdk(gw, gw.admin_key)
    message = client.messages.create(
        model="tools",
        max_tokens=64,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "weather in Paris?"}],
    )
    assert message.stop_reason == "tool_use"
    call = next(b for b in message.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    sent = upstream.requests[-1]
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # The tool's result goes back as an OpenAI tool message.
    follow = client.messages.create(
        model="echo",
        max_tokens=64,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [c.model_dump() for c in message.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
                ],
            },
        ],
    )
    sent = upstream.requests[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": json.dumps({"city": "Paris"}),
    }
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    assert follow.content[0].text == "echo: sunny"  # type: ignore[union-attr]


def test_streamed_tool_use(gw: LiveServer) -> None:
    with sdk(gw, gw.admin_key).messages.stream(
        model="tools",
        max_tokens=64,
        tools=[WEATHER],
        messages=[{"role": "user", "content": "weather?"}],
    ) as stream:
        final = stream.get_final_message()
    call = next(b for b in final.content if b.type == "tool_use")
    assert call.input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"


def test_images_are_passed_through(gw: LiveServer, upstream: ScriptedUpstream) -> None:
    sdk(gw, gw.admin_key).messages.create(
        model="echo",
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0"},
                    },
                    {"type": "text", "text": "what is this?"},
                ],
            }
        ],
    )
    parts = upstream.requests[-1]["messages"][0]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0"}}
    assert parts[1] == {"type": "text", "text": "what is this?"}


def test_errors_use_the_anthropic_shape(gw: LiveServer) -> None:
    client = sdk(gw, gw.admin_key)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(
            model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with gw.client(gw.admin_key) as raw:
        response = raw.post("/v1/messages", json={"model": "echo", "messages": []})
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.InternalServerError) as failed:
        client.messages.create(
            model="fail500", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert failed.value.status_code == 502


def test_backend_dying_mid_stream_sends_an_error_event(gw: LiveServer) -> None:
    with httpx.stream(
        "POST",
        gw.url + "/v1/messages",
        headers={"x-api-key": gw.admin_key},
        json={
            "model": "die",
            "max_tokens": 16,
            "stream": True,
            "messages": [{"role": "user", "content": "a b c d"}],
        },
    ) as response:
        events = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start"
    assert events[-1] == "error"
    assert "content_block_stop" in events


def test_an_error_the_backend_reports_mid_stream_is_an_error_event(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream
) -> None:
    """Not a message that ends as if whole: before, the SDK got end_turn and no error."""
    register(admin, "reports", upstream.url, upstream_model="reports")
    with (
        pytest.raises(anthropic.APIStatusError) as failed,
        sdk(gw, gw.admin_key).messages.stream(
            model="reports", max_tokens=16, messages=[{"role": "user", "content": "a b c d"}]
        ) as stream,
    ):
        stream.get_final_message()
    assert REPORTED in str(failed.value)
    # The OpenAI route passes the backend's error event on as it came; both are failures.
    with gw.client(gw.admin_key) as raw:
        body = {
            "model": "reports",
            "stream": True,
            "messages": [{"role": "user", "content": "x y z"}],
        }
        events = raw.post("/v1/chat/completions", json=body).text.split("\n\n")
    assert REPORTED in events[-3] and events[-2] == "data: [DONE]"
    assert usage_statuses(gw, "reports") == [502, 502]


def test_deeply_nested_json_is_a_bad_request(gw: LiveServer) -> None:
    nested = "[" * 5000 + "]" * 5000
    with gw.client(gw.admin_key) as raw:
        for path in ("/v1/messages", "/v1/chat/completions"):
            answer = raw.post(
                path,
                content=f'{{"model": "echo", "metadata": {nested}}}',
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 400, (path, answer.text)
            assert "nested too deeply" in answer.text


def test_a_streamed_stop_sequence_is_never_sent(gw: LiveServer) -> None:
    # The scripted backend echoes the prompt word by word and leaves "END" in its text.
    with sdk(gw, gw.admin_key).messages.stream(
        model="echo",
        max_tokens=32,
        stop_sequences=["END"],
        messages=[{"role": "user", "content": "a b END"}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == "echo: a b " == final.content[0].text  # type: ignore[union-attr]
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")


def test_an_answer_of_another_shape_is_a_502(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream
) -> None:
    register(admin, "shapeless", upstream.url, upstream_model="shapeless")
    client = sdk(gw, gw.admin_key)
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(
            model="shapeless", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.status_code == 502
    assert "not an object" in err.value.message
    with gw.client(gw.admin_key) as raw:
        streamed = raw.post(
            "/v1/messages",
            json={
                "model": "shapeless",
                "max_tokens": 16,
                "stream": True,
                "messages": [{"role": "user", "content": "a b c d"}],
            },
        )
    kinds = [line[7:] for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert kinds[-1] == "error" and "message_stop" not in kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert usage_statuses(gw, "shapeless") == [502, 502]
