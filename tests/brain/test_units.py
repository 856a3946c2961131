"""Pure parts: history trimming and the wire translation of tool turns."""

from __future__ import annotations

from legator.brain.providers import AnthropicProvider, OpenAIProvider
from legator.brain.service import trim_history
from legator.brain.tools import truncate


def _exchange(n: int, size: int = 400) -> list[dict]:
    return [
        {"role": "user", "content": f"question {n} " + "x" * size},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": f"c{n}", "name": "get_health", "arguments": {"probe": "p"}}],
        },
        {"role": "tool", "tool_call_id": f"c{n}", "content": "y" * size},
        {"role": "assistant", "content": f"answer {n}", "tool_calls": []},
    ]


def test_trim_keeps_the_last_exchange_and_whole_exchanges() -> None:
    history = [m for n in range(10) for m in _exchange(n)] + [{"role": "user", "content": "now"}]
    trimmed = trim_history(history, budget=600)
    assert trimmed[0]["role"] == "user"  # never starts inside an exchange
    assert trimmed[-1]["content"] == "now"
    assert len(trimmed) < len(history)
    # A last exchange larger than the budget is kept whole.
    big = _exchange(0, size=10_000)
    assert trim_history(big, budget=10) == big
    # Within budget: untouched.
    assert trim_history(_exchange(1), budget=100_000) == _exchange(1)


def test_tool_turns_on_both_wires() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "checking",
            "tool_calls": [
                {"id": "a", "name": "get_health", "arguments": {"probe": "p"}},
                {"id": "b", "name": "get_inventory", "arguments": {"probe": "p"}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "ok"},
        {"role": "tool", "tool_call_id": "b", "content": "inv"},
    ]
    anthropic_wire = AnthropicProvider.wire_messages(messages)
    assert [m["role"] for m in anthropic_wire] == ["user", "assistant", "user"]
    assert [b["type"] for b in anthropic_wire[1]["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["tool_use_id"] for b in anthropic_wire[2]["content"]] == ["a", "b"]
    openai_wire = OpenAIProvider.wire_messages("sys", messages)
    assert openai_wire[0] == {"role": "system", "content": "sys"}
    assert openai_wire[2]["tool_calls"][1]["function"]["arguments"] == '{"probe": "p"}'
    assert [m["role"] for m in openai_wire] == ["system", "user", "assistant", "tool", "tool"]


def test_truncate_marks_what_it_cut() -> None:
    assert truncate("abc", 10) == "abc"
    assert truncate("a" * 30, 10) == "a" * 10 + "\n…[truncated: 20 more characters]"
