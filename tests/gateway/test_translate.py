"""Anthropic ↔ OpenAI translation, unit by unit."""

from __future__ import annotations

import json

import pytest

from legator.core.errors import BadRequest
from legator.gateway.translate import (
    StreamTranslator,
    messages_to_openai,
    openai_to_message,
)


def base(**extra: object) -> dict[str, object]:
    return {
        "model": "m",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: field"),
        (base(max_tokens=0), "max_tokens: must be"),
        (base(max_tokens=True), "max_tokens: must be"),
        (base(messages=[]), "messages: must be"),
        (base(messages=[{"role": "system", "content": "x"}]), "messages.0.role"),
        (base(messages=[{"role": "user"}]), "messages.0: needs"),
        (base(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "unsupported block"),
        (base(system=[{"type": "image"}]), "system.0: only text"),
        (base(stop_sequences="END"), "stop_sequences"),
        (base(tools=[{"description": "no name"}]), "tools.0.name"),
        (base(tool_choice={"type": "sometimes"}), "tool_choice"),
        (
            base(messages=[{"role": "user", "content": [{"type": "tool_result"}]}]),
            "tool_use_id",
        ),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest) as err:
        messages_to_openai(body)
    assert message in err.value.message


def test_request_translation() -> None:
    chat = messages_to_openai(
        base(
            system="sys",
            top_k=5,
            stop_sequences=["END"],
            tool_choice={"type": "any"},
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
            messages=[
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm"},
                        {"type": "text", "text": "calling"},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [{"type": "text", "text": "42"}],
                            "is_error": True,
                        },
                        {"type": "image", "source": {"type": "url", "url": "http://x/i.png"}},
                    ],
                },
            ],
        )
    )
    assert chat["messages"][0] == {"role": "system", "content": "sys"}
    assert chat["messages"][2] == {
        "role": "assistant",
        "content": "calling",
        "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    }
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "[error] 42"}
    assert chat["messages"][4]["content"] == [
        {"type": "image_url", "image_url": {"url": "http://x/i.png"}}
    ]
    assert chat["tool_choice"] == "required"
    assert chat["top_k"] == 5 and chat["stop"] == ["END"]


def test_response_stop_reasons() -> None:
    def reply(text: str, finish: str) -> dict[str, object]:
        return {
            "choices": [{"message": {"content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }

    out = openai_to_message(reply("hello", "stop"), "m", [])
    assert (out["stop_reason"], out["stop_sequence"]) == ("end_turn", None)
    assert out["usage"] == {"input_tokens": 3, "output_tokens": 2}
    assert openai_to_message(reply("x", "length"), "m", [])["stop_reason"] == "max_tokens"
    out = openai_to_message(reply("the END", "stop"), "m", ["END"])
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "END")
    bad_args = {
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    out = openai_to_message(bad_args, "m", [])
    assert out["content"] == [
        {"type": "tool_use", "id": "c", "name": "f", "input": {"_raw": "{oops"}}
    ]
    assert out["stop_reason"] == "tool_use"


def _events(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in raw.decode().strip().split("\n\n"):
        event, data = block.split("\n")
        out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_stream_translation_switches_blocks() -> None:
    t = StreamTranslator("m")
    raw = t.start()
    raw += t.feed({"choices": [{"delta": {"content": "Hi"}}]})
    raw += t.feed(
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}
                        ]
                    }
                }
            ]
        }
    )
    raw += t.feed(
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}}]}
    )
    raw += t.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    raw += t.feed({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}})
    raw += t.end([])
    events = _events(raw)
    assert [e for e, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[4][1]["index"] == 1
    assert events[4][1]["content_block"] == {
        "type": "tool_use",
        "id": "c1",
        "name": "f",
        "input": {},
    }
    assert events[8][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[8][1]["usage"] == {"input_tokens": 4, "output_tokens": 6}


def test_stream_error_ends_with_an_error_event() -> None:
    t = StreamTranslator("m")
    raw = t.start() + t.feed({"choices": [{"delta": {"content": "Hi"}}]}) + t.end([], "gone")
    events = _events(raw)
    assert [e for e, _ in events][-2:] == ["content_block_stop", "error"]
    assert events[-1][1]["error"] == {"type": "api_error", "message": "gone"}
