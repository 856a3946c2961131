"""LLM providers behind one small interface: a streamed turn with native tool calling.

Messages are kept in a neutral form (``user``/``assistant``/``tool`` dicts) and translated
to each API's wire format here, so the chat, fleet chat and task runner never see a vendor
shape. The official ``openai`` and ``anthropic`` SDKs speak the wire protocols; their
clients are shared across calls through a ``ProviderPool``."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Protocol

import anthropic
import anyio
import openai

from legator.core.config import Settings
from legator.core.errors import ServiceUnavailable
from legator.core.logging import get_logger

log = get_logger("legator.brain.providers")

OnToken = Callable[[str], Awaitable[None]]

NOT_CONFIGURED = (
    "no LLM provider is configured: set LEGATOR_LLM_PROVIDER (openai, anthropic or local), "
    "LEGATOR_LLM_MODEL and, for remote APIs, LEGATOR_LLM_API_KEY (and LEGATOR_LLM_BASE_URL "
    "for an OpenAI-compatible server such as Ollama, vLLM or llama.cpp)"
)


class ProviderError(Exception):
    """The model could not be reached or answered with an error."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Turn:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class ProviderConfig:
    provider: str
    model: str
    api_key: str = field(default="", repr=False)
    base_url: str | None = None
    max_tokens: int = 1024


class Provider(Protocol):
    model: str

    async def turn(
        self,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        on_token: OnToken | None = None,
    ) -> Turn: ...


def parse_arguments(raw: str | None) -> dict[str, Any]:
    """A tool call's JSON arguments; what is not a JSON object is kept for the model to see."""
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError:
        return {"_invalid_json": raw}
    return value if isinstance(value, dict) else {"_invalid_json": raw}


class _SdkProvider:
    """What the SDK-backed providers share: the client, the request's common fields, the
    token callback and the error wrapping. A subclass says only how its API differs:
    ``request`` (the API's own fields) and ``stream`` (reading its streamed answer)."""

    sdk: ClassVar[Callable[..., Any]]
    api_error: ClassVar[type[Exception]]
    label: ClassVar[str]

    def __init__(self, config: ProviderConfig, *, max_retries: int = 2, client: Any = None) -> None:
        self.model = config.model
        self.max_tokens = config.max_tokens
        self.client = client if client is not None else self.new_client(config, max_retries)

    @classmethod
    def new_client(cls, config: ProviderConfig, max_retries: int = 2) -> Any:
        """A new SDK client: an httpx client with its own connection pool and SSL context,
        whose CA bundle alone costs tens of milliseconds of CPU to load. Share it
        (``ProviderPool``) rather than build one a call."""
        return cls.sdk(
            api_key=config.api_key or "none",
            base_url=config.base_url,
            max_retries=max_retries,
        )

    def request(
        self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        raise NotImplementedError

    async def stream(self, request: dict[str, Any], result: Turn, emit: OnToken) -> None:
        raise NotImplementedError

    async def turn(
        self,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        on_token: OnToken | None = None,
    ) -> Turn:
        result = Turn()

        async def emit(text: str) -> None:
            result.text += text
            if on_token is not None:
                await on_token(text)

        request = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            **self.request(system, messages, tools),
        }
        try:
            await self.stream(request, result, emit)
        except self.api_error as exc:
            raise ProviderError(f"{self.label} failed: {exc}") from exc
        return result


class OpenAIProvider(_SdkProvider):
    """Any OpenAI-compatible chat completions API (OpenAI, Ollama, vLLM, llama.cpp)."""

    sdk = openai.AsyncOpenAI
    api_error = openai.APIError
    label = "OpenAI-compatible provider"

    @staticmethod
    def wire_messages(system: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        for message in messages:
            if message["role"] == "tool":
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": message["tool_call_id"],
                        "content": message["content"],
                    }
                )
            elif message["role"] == "assistant" and message.get("tool_calls"):
                out.append(
                    {
                        "role": "assistant",
                        "content": message.get("content") or None,
                        "tool_calls": [
                            {
                                "id": call["id"],
                                "type": "function",
                                "function": {
                                    "name": call["name"],
                                    "arguments": json.dumps(call["arguments"]),
                                },
                            }
                            for call in message["tool_calls"]
                        ],
                    }
                )
            else:
                out.append({"role": message["role"], "content": message["content"]})
        return out

    @staticmethod
    def wire_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "type": "function",
                "function": {
                    "name": tool["name"],
                    "description": tool["description"],
                    "parameters": tool["parameters"],
                },
            }
            for tool in tools
        ]

    def request(
        self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "messages": self.wire_messages(system, messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            request["tools"] = self.wire_tools(tools)
        return request

    async def stream(self, request: dict[str, Any], result: Turn, emit: OnToken) -> None:
        reader = ChatChunkReader(result, emit)
        async for chunk in await self.client.chat.completions.create(**request):
            await reader.feed(chunk.model_dump())
        reader.finish()


class ChatChunkReader:
    """Builds a ``Turn`` from OpenAI chat-completion chunks (as JSON objects): text emitted as
    it comes, tool calls assembled from their fragments, usage from the chunk that has it."""

    def __init__(self, result: Turn, emit: OnToken) -> None:
        self.result = result
        self.emit = emit
        self.calls: dict[int, dict[str, str]] = {}

    async def feed(self, chunk: dict[str, Any]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.result.input_tokens = int(usage.get("prompt_tokens") or 0)
            self.result.output_tokens = int(usage.get("completion_tokens") or 0)
        choices = chunk.get("choices") or []
        delta = choices[0].get("delta") if choices and isinstance(choices[0], dict) else None
        if not isinstance(delta, dict):
            return
        if delta.get("content"):
            await self.emit(str(delta["content"]))
        for part in delta.get("tool_calls") or []:
            slot = self.calls.setdefault(
                int(part.get("index") or 0), {"id": "", "name": "", "arguments": ""}
            )
            if part.get("id"):
                slot["id"] = str(part["id"])
            function = part.get("function") or {}
            slot["name"] += function.get("name") or ""
            slot["arguments"] += function.get("arguments") or ""

    def finish(self) -> None:
        self.result.tool_calls = [
            ToolCall(
                id=slot["id"] or f"call_{index}",
                name=slot["name"],
                arguments=parse_arguments(slot["arguments"]),
            )
            for index, slot in sorted(self.calls.items())
        ]


class AnthropicProvider(_SdkProvider):
    """Anthropic's native Messages API, with tool_use / tool_result blocks."""

    sdk = anthropic.AsyncAnthropic
    api_error = anthropic.APIError
    label = "Anthropic provider"

    @staticmethod
    def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for message in messages:
            if message["role"] == "tool":
                block = {
                    "type": "tool_result",
                    "tool_use_id": message["tool_call_id"],
                    "content": message["content"],
                }
                # Consecutive tool results travel in one user turn, as the API requires.
                if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                    out[-1]["content"].append(block)
                else:
                    out.append({"role": "user", "content": [block]})
            elif message["role"] == "assistant":
                blocks: list[dict[str, Any]] = []
                if message.get("content"):
                    blocks.append({"type": "text", "text": message["content"]})
                for call in message.get("tool_calls") or []:
                    blocks.append(
                        {
                            "type": "tool_use",
                            "id": call["id"],
                            "name": call["name"],
                            "input": call["arguments"],
                        }
                    )
                out.append({"role": "assistant", "content": blocks})
            else:
                out.append({"role": "user", "content": message["content"]})
        return out

    def request(
        self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        request: dict[str, Any] = {"messages": self.wire_messages(messages)}
        if system:
            request["system"] = system
        if tools:
            request["tools"] = [
                {
                    "name": tool["name"],
                    "description": tool["description"],
                    "input_schema": tool["parameters"],
                }
                for tool in tools
            ]
        return request

    async def stream(self, request: dict[str, Any], result: Turn, emit: OnToken) -> None:
        async with self.client.messages.stream(**request) as stream:
            async for text in stream.text_stream:
                await emit(text)
            final = await stream.get_final_message()
        for block in final.content:
            if block.type == "tool_use":
                arguments = block.input if isinstance(block.input, dict) else {}
                result.tool_calls.append(ToolCall(block.id, block.name, dict(arguments)))
        result.input_tokens = final.usage.input_tokens
        result.output_tokens = final.usage.output_tokens


def config_from_settings(settings: Settings) -> ProviderConfig | None:
    if not settings.llm_provider or not settings.llm_model:
        return None
    key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else ""
    return ProviderConfig(
        settings.llm_provider,
        settings.llm_model,
        key,
        settings.llm_base_url,
        settings.brain_max_tokens,
    )


SDK_PROVIDERS: dict[str, type[_SdkProvider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}


def check_config(config: ProviderConfig | None, gateway: Any = None) -> ProviderConfig:
    """``config`` when a provider can be built from it, else the 503 that says how to
    configure one. Builds nothing."""
    if config is None:
        raise ServiceUnavailable(NOT_CONFIGURED)
    if config.provider in SDK_PROVIDERS or (config.provider == "local" and gateway is not None):
        return config
    raise ServiceUnavailable(f"LLM provider {config.provider!r} is not available; {NOT_CONFIGURED}")


def build_provider(config: ProviderConfig | None, gateway: Any = None) -> Provider:
    """A provider with a client of its own (``ProviderPool.lease`` shares clients)."""
    config = check_config(config, gateway)
    sdk_provider = SDK_PROVIDERS.get(config.provider)
    if sdk_provider is not None:
        return sdk_provider(config)
    from legator.brain.local import LocalProvider

    return LocalProvider(gateway, config.model, config.max_tokens)


@dataclass(eq=False, repr=False)
class _Pooled:
    client: Any
    leases: int = 0
    retired: bool = False  # out of the pool: closed when its last lease ends


class ProviderPool:
    """SDK clients shared across calls, so a chat message neither builds a client (an SSL
    context, tens of milliseconds of CPU on the event loop) nor opens a new connection.

    A client is found by a fingerprint: the SHA-256 of what it is built from (provider,
    base URL, API key, retries), so the pool holds no key in the clear and a changed key is
    always a different client. Model and token limit are per request, not per client. Each
    owner (a brain feature) points at the client its last call used: when its profile
    changes (new key or base URL, deleted, routed elsewhere), the client it leaves is closed
    once no other owner and no call in flight uses it. At most ``max_clients`` are kept, the
    least recently used going first; ``aclose`` closes them all (at shutdown)."""

    def __init__(self, *, max_clients: int = 8, max_retries: int = 2) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.max_clients = max_clients
        self.max_retries = max_retries
        self._clients: OrderedDict[str, _Pooled] = OrderedDict()
        self._owners: dict[str, str] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<ProviderPool {len(self._clients)} clients, owners {sorted(self._owners)}>"

    def __len__(self) -> int:
        return len(self._clients)

    def fingerprint(self, config: ProviderConfig) -> str:
        parts = [config.provider, config.base_url, config.api_key, self.max_retries]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    @asynccontextmanager
    async def lease(
        self, owner: str, config: ProviderConfig | None, gateway: Any = None
    ) -> AsyncIterator[Provider]:
        """The provider for ``config`` on the pooled client, for the length of a call."""
        config = check_config(config, gateway)
        sdk_provider = SDK_PROVIDERS.get(config.provider)
        if sdk_provider is None:  # ``local``: in-process, no client to share
            yield build_provider(config, gateway)
            return
        key = self.fingerprint(config)
        built = None
        if key not in self._clients:
            # Off the event loop: loading the CA bundle is blocking CPU work.
            built = await anyio.to_thread.run_sync(
                partial(sdk_provider.new_client, config, self.max_retries)
            )
        entry, doomed = self._checkout(owner, key, built)
        try:
            await self._close(doomed)
            yield sdk_provider(config, client=entry.client)
        finally:
            entry.leases -= 1
            if entry.retired and entry.leases == 0:
                await self._close([entry])

    def _checkout(self, owner: str, key: str, built: Any) -> tuple[_Pooled, list[_Pooled]]:
        """Take a lease on ``key``'s client (``built`` when it was missing) for ``owner``;
        returns it and the clients to close now. No await: the pool never sits half-updated."""
        if self._closed:  # shut down: a one-off client, closed after its call
            return _Pooled(built, leases=1, retired=True), []
        doomed: list[_Pooled] = []
        entry = self._clients.get(key)
        if entry is None:
            entry = self._clients[key] = _Pooled(built)
        elif built is not None:  # another call built the same client meanwhile
            doomed.append(_Pooled(built))
        self._clients.move_to_end(key)
        entry.leases += 1
        previous = self._owners.get(owner)
        self._owners[owner] = key
        if previous is not None and previous != key and previous not in self._owners.values():
            doomed += self._retire(previous)
        while len(self._clients) > self.max_clients:
            doomed += self._retire(next(iter(self._clients)))
        return entry, doomed

    def _retire(self, key: str) -> list[_Pooled]:
        entry = self._clients.pop(key, None)
        for owner in [o for o, k in self._owners.items() if k == key]:
            del self._owners[owner]
        if entry is None:
            return []
        entry.retired = True
        return [entry] if entry.leases == 0 else []

    async def _close(self, entries: list[_Pooled]) -> None:
        for entry in entries:
            # Shielded: a cancelled call still closes the client it leaves.
            with anyio.CancelScope(shield=True):
                try:
                    await entry.client.close()
                except Exception:  # closing is best effort
                    log.warning("closing an LLM client failed", exc_info=True)

    async def aclose(self) -> None:
        """Close every pooled client (those in a call, once it ends); later calls each get
        a one-off client."""
        self._closed = True
        doomed: list[_Pooled] = []
        for key in list(self._clients):
            doomed += self._retire(key)
        await self._close(doomed)
