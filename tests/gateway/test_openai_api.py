"""/v1 in OpenAI's shape against the scripted upstream: exact output, streaming, errors, usage."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.gateway.conftest import register, usage_statuses
from tests.gateway.scripted_upstream import HUGE_BYTES, INTERNAL_SECRET, ScriptedUpstream
from tests.support import LiveServer


def sdk(gw: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def flush_usage(gw: LiveServer) -> None:
    gw.call(gw.app.state.gateway.recorder.flush())  # type: ignore[union-attr]


def test_chat_completion_exact_output_and_usage_row(gw: LiveServer, admin: httpx.Client) -> None:
    client = sdk(gw, gw.admin_key)
    reply = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}]
    )
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    flush_usage(gw)
    usage = admin.get("/api/v1/gateway/usage", params={"period": "hour"}).json()
    assert usage["requests"] == 1
    assert usage["output_tokens"] == 3
    assert usage["by_model"][0]["group"] == "echo"


def test_model_is_found_by_display_name(gw: LiveServer) -> None:
    reply = sdk(gw, gw.admin_key).chat.completions.create(
        model="Scripted echo", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content == "echo: x"


def test_streaming_relays_chunks_and_strips_injected_usage(
    gw: LiveServer, upstream: ScriptedUpstream, admin: httpx.Client
) -> None:
    client = sdk(gw, gw.admin_key)
    stream = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    assert all(c.choices for c in chunks), "the usage chunk the client did not ask for leaked"
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    flush_usage(gw)
    usage = admin.get("/api/v1/gateway/usage", params={"period": "hour"}).json()
    assert usage["output_tokens"] == 4, usage  # from the upstream's usage chunk, not zero


def test_streaming_keeps_usage_when_the_client_asks(gw: LiveServer) -> None:
    stream = sdk(gw, gw.admin_key).chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "a b"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_stream_is_relayed_as_it_arrives(gw: LiveServer) -> None:
    """The slow model sends a chunk every 50 ms: the first must arrive long before the last."""
    stamps = []
    with sdk(gw, gw.admin_key) as client:
        stream = client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "a b c d e f g h"}], stream=True
        )
        start = time.monotonic()
        for _ in stream:
            stamps.append(time.monotonic() - start)
    assert stamps[-1] - stamps[1] > 0.3


def test_completions_and_embeddings(gw: LiveServer) -> None:
    client = sdk(gw, gw.admin_key)
    text = client.completions.create(model="echo", prompt="ping")
    assert text.choices[0].text == "echo: ping"
    vectors = client.embeddings.create(model="echo", input=["ab", "abcd"])
    assert [d.embedding for d in vectors.data] == [[0.5, 2.0], [0.5, 4.0]]


def test_tool_calls_pass_through(gw: LiveServer) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    client = sdk(gw, gw.admin_key)
    reply = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "weather?"}], tools=tools
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    stream = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "weather?"}], tools=tools, stream=True
    )
    args = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in stream
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert json.loads(args) == {"city": "Paris"}


def test_errors_use_the_openai_shape(gw: LiveServer) -> None:
    with gw.client(gw.admin_key) as raw:
        bad = raw.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        missing = raw.post("/v1/chat/completions", json={"model": "echo"})
        assert missing.status_code == 400
        assert "messages" in missing.json()["error"]["message"]
        not_object = raw.post("/v1/chat/completions", json=[1, 2])
        assert not_object.status_code == 400
    client = sdk(gw, gw.admin_key)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="fail500", messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502
    assert "boom" in failed.value.message
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, "lgk_" + "0" * 64).models.list()


def test_disabled_model_answers_503(gw: LiveServer, admin: httpx.Client) -> None:
    assert (
        admin.patch("/api/v1/gateway/models/echo", json={"state": "unavailable"}).status_code == 200
    )
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gw, gw.admin_key).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.status_code == 503


def test_unreachable_backend_is_502(gw: LiveServer, admin: httpx.Client) -> None:
    admin.post(
        "/api/v1/gateway/models", json={"id": "gone", "backend_url": "http://127.0.0.1:9/v1"}
    )
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gw, gw.admin_key).chat.completions.create(
            model="gone", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.status_code == 502


def test_backend_dying_mid_stream_ends_with_error_and_done(
    gw: LiveServer, admin: httpx.Client
) -> None:
    with (
        gw.client(gw.admin_key) as raw,
        raw.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "die",
                "stream": True,
                "messages": [{"role": "user", "content": "a b c d"}],
            },
        ) as response,
    ):
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][5:])
    assert "mid-stream" in error["error"]["message"]
    flush_usage(gw)
    usage = admin.get("/api/v1/gateway/usage/all", params={"period": "hour"}).json()
    assert usage["by_model"][0]["errors"] == 1


def test_a_backend_redirect_is_not_followed(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream
) -> None:
    """A hostile backend answers with a redirect to an address only the gateway's host can
    reach: the gateway must not fetch it for the client."""
    register(admin, "redirect", upstream.url, upstream_model="redirect")
    secret = INTERNAL_SECRET["SecretAccessKey"]
    with gw.client(gw.admin_key) as raw:
        for stream in (False, True):
            body = {
                "model": "redirect",
                "stream": stream,
                "messages": [{"role": "user", "content": "x"}],
            }
            answer = raw.post("/v1/chat/completions", json=body)
            assert answer.status_code == 502, answer.text
            assert "redirect" in answer.json()["error"]["message"]
            assert secret not in answer.text


def test_an_endless_backend_answer_is_cut_off(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream
) -> None:
    """An answer, or one stream event, past LEGATOR_GATEWAY_MAX_ANSWER_BYTES fails the request
    instead of being held in memory."""
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    gateway.max_answer_bytes = HUGE_BYTES // 3
    register(admin, "huge", upstream.url, upstream_model="huge")
    message = {"model": "huge", "messages": [{"role": "user", "content": "x"}]}
    with gw.client(gw.admin_key) as raw:
        whole = raw.post("/v1/chat/completions", json=message)
        assert whole.status_code == 502
        assert f"exceeded {HUGE_BYTES // 3} bytes" in whole.json()["error"]["message"]
        with raw.stream("POST", "/v1/chat/completions", json={**message, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        assert "exceeded" in json.loads(events[-2][5:])["error"]["message"]
        assert sum(len(e) for e in events) < 2000  # none of the unfinished event was relayed
        anthropic = raw.post(
            "/v1/messages",
            json={
                "model": "huge",
                "max_tokens": 8,
                "stream": True,
                "messages": message["messages"],
            },
        )
        assert "event: error" in anthropic.text and "exceeded" in anthropic.text
    assert usage_statuses(gw, "huge") == [502, 502, 502]


def test_slot_is_held_until_the_stream_ends(gw: LiveServer, admin: httpx.Client) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    seen: list[int] = []

    def watch() -> None:
        for _ in range(40):
            pool = gateway.scheduler.pools.get("slow")
            seen.append(pool.in_use if pool else 0)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    stream = sdk(gw, gw.admin_key).chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "a b c d e f g h"}], stream=True
    )
    next(iter(stream))
    watcher.start()
    for _ in stream:
        pass
    watcher.join()
    assert seen and all(v == 1 for v in seen[:20]), seen
    deadline = time.monotonic() + 10
    while gateway.scheduler.pools["slow"].in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.scheduler.pools["slow"].in_use == 0


def test_full_queue_and_wait_timeout_answer_429(gw: LiveServer, admin: httpx.Client) -> None:
    assert (
        admin.patch(
            "/api/v1/gateway/settings", json={"max_queue": 1, "queue_timeout_s": 0.3}
        ).status_code
        == 200
    )
    results: list[httpx.Response] = []

    def call() -> None:
        with gw.client(gw.admin_key) as raw:
            results.append(
                raw.post(
                    "/v1/chat/completions",
                    json={"model": "slow", "messages": [{"role": "user", "content": "x"}]},
                )
            )

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 429, 429], [r.text for r in results]
    for response in results:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
    messages = " ".join(r.json()["error"]["message"] for r in results if r.status_code == 429)
    assert "full" in messages and "within" in messages
    # Refused requests are accounted as well: they are the ones that waited longest.
    assert usage_statuses(gw, "slow") == [200, 429, 429]


def test_client_that_disconnects_while_queued_leaves_the_queue(
    gw: LiveServer, upstream: ScriptedUpstream
) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    holder = threading.Thread(
        target=lambda: sdk(gw, gw.admin_key).chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "x"}]
        )
    )
    holder.start()
    time.sleep(0.1)
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.Client(
            base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"}, timeout=0.2
        ) as impatient,
    ):
        impatient.post(
            "/v1/chat/completions",
            json={"model": "slow", "messages": [{"role": "user", "content": "y"}]},
        )
    deadline = time.monotonic() + 10
    while gateway.scheduler.pools["slow"].depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.scheduler.pools["slow"].depth == 0
    holder.join()
    time.sleep(0.1)
    assert gateway.scheduler.pools["slow"].in_use == 0
    assert [r["messages"][0]["content"] for r in upstream.requests[-1:]] == ["x"]
    assert usage_statuses(gw, "slow") == [200, 499]


def test_a_client_gone_mid_stream_frees_the_slot(
    gw: LiveServer, admin: httpx.Client, upstream: ScriptedUpstream
) -> None:
    gateway = gw.app.state.gateway  # type: ignore[union-attr]
    words = " ".join(f"w{i}" for i in range(600))  # 30 s of stream at 50 ms per chunk
    with (
        gw.client(gw.admin_key) as raw,
        raw.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "slow",
                "stream": True,
                "messages": [{"role": "user", "content": words}],
            },
        ) as response,
    ):
        # Keep the line iterator referenced: once collected, httpx closes the connection.
        lines = response.iter_lines()
        first = next(lines)
        assert response.status_code == 200, first
        time.sleep(0.2)
        assert gateway.scheduler.pools["slow"].in_use == 1
        # Leaving the block closed the connection long before the stream's end.
    deadline = time.monotonic() + 15  # half the stream: a slot held to its end fails
    while gateway.scheduler.pools["slow"].in_use and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gateway.scheduler.pools["slow"].in_use == 0
    flush_usage(gw)
    report = admin.get("/api/v1/gateway/usage/all", params={"period": "hour"}).json()
    assert report["requests"] == 1
