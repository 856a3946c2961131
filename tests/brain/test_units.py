"""Pure parts: history trimming, the wire translation of tool turns and the client pool."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from legator.brain.agent import MAX_TOOL_CALLS_PER_TURN, RESULTS_BUDGET_CHARS, make_room, shown
from legator.brain.providers import (
    AnthropicProvider,
    OpenAIProvider,
    ProviderConfig,
    ProviderPool,
)
from legator.brain.service import trim_history
from legator.brain.tools import result_chars, truncate
from legator.core.errors import ServiceUnavailable


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


def test_an_empty_answer_is_no_empty_anthropic_turn() -> None:
    """Anthropic refuses an assistant message with empty content ("all messages must have
    non-empty content"): a session holding an empty answer failed on every later message."""
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "still there?"},
    ]
    wire = AnthropicProvider.wire_messages(messages)
    assert all(m["content"] for m in wire)
    assert [m["role"] for m in wire] == ["user", "user"]  # the API joins consecutive turns


def test_truncate_marks_what_it_cut() -> None:
    assert truncate("abc", 10) == "abc"
    assert truncate("a" * 30, 10) == "a" * 10 + "\n…[truncated: 20 more characters]"


SECRET = "sk-pool-secret-0123456789"
CONFIG = ProviderConfig("openai", "m", SECRET, "http://127.0.0.1:9/v1")


async def test_pool_shares_a_client_per_provider_url_and_key() -> None:
    pool = ProviderPool()
    async with pool.lease("probe_chat", CONFIG) as first:
        client = first.client
    async with pool.lease("probe_chat", replace(CONFIG, model="m2", max_tokens=9)) as other:
        assert other.client is client and (other.model, other.max_tokens) == ("m2", 9)
    async with pool.lease("task", CONFIG) as shared:
        assert shared.client is client
    for changed in (
        replace(CONFIG, api_key="sk-other"),
        replace(CONFIG, base_url="http://127.0.0.1:10/v1"),
        replace(CONFIG, provider="anthropic"),
    ):
        async with pool.lease("fleet_chat", changed) as provider:
            assert provider.client is not client
    assert isinstance(provider, AnthropicProvider) and len(pool) == 2
    # No key in the clear: not in the pool's keys, its repr or the config's repr.
    assert SECRET not in repr(pool) and SECRET not in repr(CONFIG)
    assert SECRET not in pool.fingerprint(CONFIG) and SECRET not in str(list(pool._clients))
    await pool.aclose()


async def test_pool_closes_a_client_once_no_owner_or_call_uses_it() -> None:
    pool = ProviderPool()
    rotated = replace(CONFIG, api_key="sk-rotated")
    async with pool.lease("probe_chat", CONFIG) as old:
        pass
    async with pool.lease("task", CONFIG):
        pass
    async with pool.lease("probe_chat", rotated) as new:
        assert new.client is not old.client
    assert not old.client.is_closed()  # the task still routes to it
    async with pool.lease("task", CONFIG) as in_flight:
        async with pool.lease("task", rotated):
            pass
        assert not in_flight.client.is_closed()  # a call in flight keeps it open
    assert old.client.is_closed() and not new.client.is_closed()
    await pool.aclose()
    assert new.client.is_closed() and len(pool) == 0


async def test_pool_is_bounded_and_closes_everything_at_shutdown() -> None:
    pool = ProviderPool(max_clients=2)
    clients = []
    for n in range(3):
        async with pool.lease(f"owner-{n}", replace(CONFIG, api_key=f"sk-{n}")) as provider:
            clients.append(provider.client)
    assert len(pool) == 2 and clients[0].is_closed()  # the least recently used went
    async with pool.lease("owner-1", replace(CONFIG, api_key="sk-1")) as again:
        assert again.client is clients[1]
    async with pool.lease("owner-2", replace(CONFIG, api_key="sk-2")) as held:
        await pool.aclose()
        assert clients[1].is_closed() and not held.client.is_closed()
    assert held.client.is_closed()
    async with pool.lease("owner-1", CONFIG) as late:  # after shutdown: a one-off client
        assert not late.client.is_closed()
    assert late.client.is_closed() and len(pool) == 0
    with pytest.raises(ServiceUnavailable, match="LEGATOR_LLM_PROVIDER"):
        async with pool.lease("owner-1", None):
            pass


def test_tool_results_stay_within_the_budget_however_long_the_conversation() -> None:
    """The most a conversation can hold: 100 steps of 16 results, each as long as a result
    may be. The oldest give way to notes, and when the notes alone would pass the budget the
    oldest notes to a shorter one; the newest results stay whole."""
    limit = result_chars(4000)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for n in range(100 * MAX_TOOL_CALLS_PER_TURN):
        content = shown(f'{{"request_id": "r{n}", "stdout": "' + "z" * 20_000, limit)
        assert len(content) == limit and content.endswith("characters not shown]")
        messages.append({"role": "tool", "tool_call_id": f"c{n}", "content": content})
        make_room(messages, RESULTS_BUDGET_CHARS)
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assert sum(map(len, results)) <= RESULTS_BUDGET_CHARS
    assert results[-1].startswith(f'{{"request_id": "r{n}"')
    notes = [r for r in results if r.startswith("[dropped by Legator")]
    assert any('It began: {"request_id"' in r for r in notes)  # the id of one to ask again
    assert len(results) == 100 * MAX_TOOL_CALLS_PER_TURN  # every call keeps its answer
