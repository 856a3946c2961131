"""Anthropic ↔ OpenAI translation, unit by unit."""

from __future__ import annotations

import json

import pytest

from legator.core.errors import BadRequest
from legator.gateway.translate import (
    StreamTranslator,
    UnexpectedAnswer,
    UntranslatableStream,
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
        (
            base(messages=[{"role": "user", "content": [{"type": "image", "source": "x.png"}]}]),
            "messages.0.content.0.source: must be an object",
        ),
        (
            base(tool_choice={"type": "auto", "disable_parallel_tool_use": "yes"}),
            "disable_parallel_tool_use",
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
    assert "parallel_tool_calls" not in chat
    one_call = messages_to_openai(
        base(
            tools=[{"name": "f"}],
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        )
    )
    assert one_call["tool_choice"] == "auto" and one_call["parallel_tool_calls"] is False


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
    # A backend that leaves the sequence in the text: Anthropic's text stops before it.
    out = openai_to_message(reply("the END", "stop"), "m", ["END"])
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "END")
    assert out["content"] == [{"type": "text", "text": "the "}]
    # vLLM says which sequence hit, beside finish_reason; the text does not hold it.
    said = reply("1 2 3 ", "stop")
    said["choices"][0]["stop_reason"] = "END"  # type: ignore[index]
    out = openai_to_message(said, "m", ["END"])
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "END")
    assert out["content"] == [{"type": "text", "text": "1 2 3 "}]
    # A stop that is none of the request's sequences (an end-of-turn token id, say).
    said["choices"][0]["stop_reason"] = 2  # type: ignore[index]
    assert openai_to_message(said, "m", ["END"])["stop_reason"] == "end_turn"
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
    # Cut off by the token limit mid-call: its input is unfinished, so not tool_use.
    bad_args["choices"][0]["finish_reason"] = "length"  # type: ignore[index]
    assert openai_to_message(bad_args, "m", [])["stop_reason"] == "max_tokens"


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
    raw += t.end()
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
    raw = t.start() + t.feed({"choices": [{"delta": {"content": "Hi"}}]}) + t.end("gone")
    events = _events(raw)
    assert [e for e, _ in events][-2:] == ["content_block_stop", "error"]
    assert events[-1][1]["error"] == {"type": "api_error", "message": "gone"}


def _call(index: int, arguments: str, call_id: str | None = None, name: str = "") -> dict:
    call: dict[str, object] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call["id"] = call_id
        call["function"] = {"name": name, "arguments": arguments}
    return {"choices": [{"delta": {"tool_calls": [call]}}]}


def _tool_blocks(events: list[tuple[str, dict]]) -> dict[int, tuple[str, str]]:
    """Each tool_use block's id and the arguments streamed into it, by block index."""
    blocks: dict[int, tuple[str, str]] = {}
    for event, data in events:
        if event == "content_block_start" and data["content_block"]["type"] == "tool_use":
            blocks[data["index"]] = (data["content_block"]["id"], "")
        elif event == "content_block_delta" and data["delta"]["type"] == "input_json_delta":
            call_id, arguments = blocks[data["index"]]
            blocks[data["index"]] = (call_id, arguments + data["delta"]["partial_json"])
    return blocks


def test_calls_sent_under_one_index_with_new_ids_are_separate_blocks() -> None:
    """Ollama and SGLang send every call as index 0, each with its own id."""
    t = StreamTranslator("m")
    raw = t.start()
    raw += t.feed(_call(0, '{"p":', "c1", "read"))
    raw += t.feed(_call(0, '"a.py"}'))
    raw += t.feed(_call(0, '{"p":"b.py"}', "c2", "read"))
    raw += t.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    raw += t.end()
    events = _events(raw)
    assert _tool_blocks(events) == {0: ("c1", '{"p":"a.py"}'), 1: ("c2", '{"p":"b.py"}')}
    starts = [e for e, _ in events if e in ("content_block_start", "content_block_stop")]
    assert starts == ["content_block_start", "content_block_stop"] * 2  # one after the other
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_interleaved_call_arguments_are_refused_not_mixed_up() -> None:
    t = StreamTranslator("m")
    t.start()
    t.feed(_call(0, '{"p":', "c1", "read"))
    t.feed(_call(1, '{"p":', "c2", "read"))
    with pytest.raises(UntranslatableStream, match="interleaved"):
        t.feed(_call(0, '"a.py"}'))


def test_a_streamed_call_cut_off_by_the_limit_is_max_tokens() -> None:
    t = StreamTranslator("m")
    raw = t.start() + t.feed(_call(0, '{"path": "/etc/pas', "c1", "read"))
    raw += t.feed({"choices": [{"delta": {}, "finish_reason": "length"}]}) + t.end()
    assert _events(raw)[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


def test_a_streamed_stop_sequence_named_by_the_backend() -> None:
    t = StreamTranslator("m", ["END"])
    raw = t.start() + t.feed({"choices": [{"delta": {"content": "1 2 3 "}}]})
    raw += t.feed({"choices": [{"delta": {}, "finish_reason": "stop", "stop_reason": "END"}]})
    raw += t.end()
    assert _events(raw)[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def _text(raw: bytes) -> str:
    return "".join(
        str(data["delta"]["text"])  # type: ignore[index]
        for kind, data in _events(raw)
        if kind == "content_block_delta" and data["delta"]["type"] == "text_delta"  # type: ignore[index]
    )


@pytest.mark.parametrize(
    ("pieces", "sent", "reason"),
    [
        (["abc", "END"], "abc", "stop_sequence"),  # the backend left the sequence in
        (["abcE", "ND"], "abc", "stop_sequence"),  # split across chunks
        (["abcE"], "abcE", "end_turn"),  # a beginning that came to nothing
        (["aEb", "cE", "Nx", "yz"], "aEbcENxyz", "end_turn"),
        (["ab", "\n\nHuman:"], "ab", "stop_sequence"),
    ],
)
def test_a_stream_never_sends_the_stop_sequence(pieces: list[str], sent: str, reason: str) -> None:
    t = StreamTranslator("m", ["END", "\n\nHuman:"])
    raw = t.start()
    for piece in pieces:
        raw += t.feed({"choices": [{"delta": {"content": piece}}]})
    raw += t.feed({"choices": [{"delta": {}, "finish_reason": "stop"}]}) + t.end()
    assert _text(raw) == sent
    assert _events(raw)[-2][1]["delta"]["stop_reason"] == reason  # type: ignore[index]


def test_text_held_for_a_stop_sequence_goes_out_before_a_tool_call() -> None:
    t = StreamTranslator("m", ["END"])
    raw = t.start() + t.feed({"choices": [{"delta": {"content": "see E"}}]})
    assert _text(raw) == "see "
    raw += t.feed(_call(0, "{}", "c1", "read")) + t.end()
    kinds = [(kind, data.get("index")) for kind, data in _events(raw)]
    assert _text(raw) == "see E"
    assert kinds.index(("content_block_stop", 0)) < kinds.index(("content_block_start", 1))


def test_a_chunk_that_fails_half_way_leaves_well_formed_events() -> None:
    t = StreamTranslator("m")
    raw = t.start() + t.feed(_call(0, "", "c1", "read"))
    both = {
        "choices": [
            {
                "delta": {
                    "tool_calls": [
                        {"index": 1, "id": "c2", "function": {"name": "read", "arguments": ""}},
                        {"index": 0, "function": {"arguments": "{}"}},
                    ]
                }
            }
        ]
    }
    with pytest.raises(UntranslatableStream):
        t.feed(both)
    raw += t.drain() + t.end("interleaved")
    kinds = [(kind, data.get("index")) for kind, data in _events(raw)]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
        ("error", None),
    ]


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": ["x"]},
        {"choices": {"a": 1}},
        {"choices": [{"delta": "hello"}]},
        {"choices": [{"delta": {"content": ["part"]}}]},
        {"choices": [{"delta": {"tool_calls": ["x"]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 5}}]}}]},
    ],
)
def test_a_chunk_of_another_shape_is_untranslatable(chunk: dict[str, object]) -> None:
    with pytest.raises(UntranslatableStream):
        StreamTranslator("m").feed(chunk)


def test_streamed_arguments_sent_as_an_object_are_json_text() -> None:
    t = StreamTranslator("m")
    raw = t.feed(_call(0, {"path": "a.py"}, "c1", "read"))  # type: ignore[arg-type]
    deltas = [d["delta"] for k, d in _events(raw) if k == "content_block_delta"]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"path": "a.py"}'}]


@pytest.mark.parametrize(
    "data",
    [
        {"choices": {"a": 1}},
        {"choices": [{"message": "hello"}]},
        {"choices": [{"message": {"tool_calls": ["x"]}}]},
        {"choices": [{"message": {"tool_calls": {"a": 1}}}]},
        {"choices": [{"message": {"content": 5}}]},
    ],
)
def test_an_answer_of_another_shape_is_unexpected(data: dict[str, object]) -> None:
    with pytest.raises(UnexpectedAnswer):
        openai_to_message(data, "m", [])


def test_an_answer_in_parts_is_joined_text() -> None:
    data = {
        "choices": [
            {"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}
        ]
    }
    assert openai_to_message(data, "m", [])["content"] == [{"type": "text", "text": "ab"}]


@pytest.mark.parametrize("content", ["", []])
def test_an_empty_user_turn_is_refused(content: object) -> None:
    body = {
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": content},
        ],
    }
    with pytest.raises(BadRequest, match=r"messages\.2\.content: must not be empty"):
        messages_to_openai(body)


def test_images_in_a_tool_result_follow_the_tool_messages() -> None:
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    chat = messages_to_openai(
        base(
            messages=[
                {"role": "user", "content": "look"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "shot", "input": {}},
                        {"type": "tool_use", "id": "t2", "name": "ls", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {"type": "text", "text": "a screenshot"},
                                {"type": "image", "source": png},
                            ],
                        },
                        {"type": "tool_result", "tool_use_id": "t2", "content": "a.py"},
                        {"type": "text", "text": "what do you see?"},
                    ],
                },
            ]
        )
    )
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["user", "assistant", "tool", "tool", "user"]
    assert chat["messages"][2]["content"] == "a screenshot"
    assert chat["messages"][4]["content"] == [
        {"type": "text", "text": "[images from tool result t1]"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "what do you see?"},
    ]
    bad = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "image"}]}
    with pytest.raises(BadRequest, match=r"messages\.0\.content\.0\.content\.0\.source"):
        messages_to_openai(base(messages=[{"role": "user", "content": [bad]}]))
