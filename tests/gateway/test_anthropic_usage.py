"""A streamed Anthropic message's input token count, as the official SDK assembles it."""

from __future__ import annotations

import json

import anthropic

from tests.gateway.scripted_upstream import ScriptedUpstream, usage
from tests.support import LiveServer


def test_the_sdk_final_message_carries_the_input_count(
    gw: LiveServer, upstream: ScriptedUpstream
) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.admin_key, max_retries=0, timeout=20)
    prompt = [{"role": "user", "content": "one two three four five six"}]
    with client.messages.stream(model="echo", max_tokens=32, messages=prompt) as stream:
        events = list(stream)
        final = stream.get_final_message()
    expected = usage(upstream.requests[-1], 0)["prompt_tokens"]
    assert expected > 0
    delta = next(event for event in events if event.type == "message_delta")
    assert delta.usage.input_tokens == expected
    assert final.usage.input_tokens == expected
    assert final.usage.output_tokens == 7  # "echo:" and the six words after it


def test_message_start_says_the_input_count_is_not_known_yet(gw: LiveServer) -> None:
    """OpenAI-compatible streams report usage only in their last chunk: ``message_start``
    carries 0, the real count comes in ``message_delta`` (see docs/gateway.md)."""
    body = {
        "model": "echo",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "a b"}],
    }
    with gw.client(gw.admin_key) as client, client.stream("POST", "/v1/messages", json=body) as r:
        data = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    start = data[0]["message"]["usage"]
    end = next(event for event in data if event["type"] == "message_delta")["usage"]
    assert start == {"input_tokens": 0, "output_tokens": 0}
    assert end["input_tokens"] > 0 and end["output_tokens"] > 0
