"""LLM providers behind one small interface: a streamed turn with native tool calling.

Messages are kept in a neutral form (``user``/``assistant``/``tool`` dicts) and translated
to each API's wire format here, so the chat, fleet chat and task runner never see a vendor
shape. The official ``openai`` and ``anthropic`` SDKs speak the wire protocols; their
clients are shared across calls through a ``ProviderPool``.

A provider's answer is untrusted input: whatever goes wrong while reading it (a broken
connection, an event that is not JSON, a field of the wrong type, a limit passed) becomes a
``ProviderError`` with a short message, so the conversation ends cleanly with its record.
One turn keeps at most ``MAX_TURN_TEXT_CHARS`` of text, ``MAX_TOOL_ARGUMENTS_CHARS`` of
arguments per tool call and ``MAX_TOOL_CALLS_READ`` tool calls, and one event of its stream is
at most ``MAX_EVENT_BYTES`` as it comes; the agent loop bounds its time (``agent.converse``)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Protocol

import anthropic
import anyio
import httpx
import httpx2
import openai
import pydantic

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


# Limits of one model turn (see docs/brain.md, "Failures and limits"). A model that passes
# one is looping or broken: the turn ends with a ProviderError rather than buffer without end.
MAX_TURN_TEXT_CHARS = 1_000_000  # the text of one answer
MAX_TOOL_ARGUMENTS_CHARS = 64 * 1024  # the JSON arguments of one tool call
MAX_TOOL_NAME_CHARS = 256  # a tool call's name, and its id
# Tool calls read from one answer; the agent runs at most ``agent.MAX_TOOL_CALLS_PER_TURN`` of
# them and answers the rest as not run, and an answer with more than this is refused.
MAX_TOOL_CALLS_READ = 64
MAX_USAGE_TOKENS = 100_000_000  # a usage count above this in one turn is not believable
ERROR_MESSAGE_CHARS = 300  # of a provider's own error text, which can quote a whole body
# One event of a streamed answer (or an error body), in bytes as they come: the SDKs buffer an
# event whole, copying the buffer at each read, before any limit above can be checked. Room
# for a turn's whole text in one event, escaped.
MAX_EVENT_BYTES = 8 * 1024 * 1024
# A stream that closes before the API's end of answer (a connection cut cleanly) is no answer.
ENDED_EARLY = "its stream ended before the answer did"


class ProviderError(Exception):
    """The model could not be reached or answered with an error."""


class AnswerError(ProviderError):
    """The provider's answer broke its wire format or one of this module's limits."""


class CallbackFailed(Exception):
    """The caller's own token callback failed (a chat client gone, say): not the provider's
    fault, so ``turn`` re-raises the original exception rather than a ``ProviderError``."""


def short_message(message: str, secret: str = "") -> str:
    """A provider's error text for a transcript: the key it was called with masked, on one
    line, cut at ``ERROR_MESSAGE_CHARS`` (an SDK's message can carry the whole error body)."""
    if len(secret) >= 8:
        message = message.replace(secret, "***")
    message = " ".join(message.split())
    if len(message) > ERROR_MESSAGE_CHARS:
        message = message[:ERROR_MESSAGE_CHARS] + "…"
    return message


def unreadable(label: str, exc: Exception) -> ProviderError:
    """The ``ProviderError`` for an unexpected failure while reading ``label``'s answer. Only
    the exception's type is named: its text can quote the body."""
    if isinstance(exc, json.JSONDecodeError):
        what = "an event of its stream is not valid JSON"
    elif isinstance(exc, httpx.HTTPError):
        what = "its stream broke off"
    else:
        what = "its answer could not be read"
    log.warning(
        "an LLM provider's answer could not be read", provider=label, error=type(exc).__name__
    )
    return ProviderError(f"{label}: {what} ({type(exc).__name__})")


def count_tokens(value: Any, what: str) -> int:
    """A usage count from an answer: absent is 0; anything but a believable count is refused."""
    if value is None:
        return 0
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_USAGE_TOKENS:
        raise AnswerError(f"its usage {what!r} is not a count of tokens")
    return value


def as_json(value: Any) -> Any:
    """An SDK's event as plain JSON values, as it came: the SDKs build their models without
    validating them, so a field can hold any type and is checked here, not by the model."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(warnings=False)
    return value


class TextSink:
    """Where a turn's text goes as it streams: kept, at most ``MAX_TURN_TEXT_CHARS`` of it, in
    pieces (joined once at the end: ``+=`` on an attribute copies the whole text each time),
    and passed on to the caller's callback."""

    def __init__(self, on_token: OnToken | None) -> None:
        self.on_token = on_token
        self.parts: list[str] = []
        self.size = 0

    async def __call__(self, text: str) -> None:
        if not isinstance(text, str):
            raise AnswerError("a piece of its text is not a string")
        self.size += len(text)
        if self.size > MAX_TURN_TEXT_CHARS:
            raise AnswerError(
                f"its answer passed the limit of {MAX_TURN_TEXT_CHARS:,} characters of text "
                "in one turn"
            )
        self.parts.append(text)
        if self.on_token is not None:
            try:
                await self.on_token(text)
            except Exception as exc:
                raise CallbackFailed() from exc

    @property
    def text(self) -> str:
        return "".join(self.parts)


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


class _EventCap(httpx2.AsyncByteStream):
    """A response body that ends with an ``AnswerError`` once ``MAX_EVENT_BYTES`` pass without
    the blank line that ends an event (an error body, which has none, is bounded the same way;
    so is a compressed body, whose blank lines are not visible in its bytes)."""

    BOUNDARIES = (b"\n\n", b"\r\r", b"\n\r\n")

    def __init__(self, stream: httpx2.AsyncByteStream) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        run, tail = 0, b""  # bytes since the last boundary; the end of the previous chunk
        async for chunk in self.stream:
            data = tail + chunk
            ends = [data.rfind(b) + len(b) for b in self.BOUNDARIES if b in data]
            run = len(data) - max(ends) if ends else run + len(chunk)
            if run > MAX_EVENT_BYTES:
                raise AnswerError(
                    f"an event of its stream passed the limit of {MAX_EVENT_BYTES:,} bytes"
                )
            tail = data[-2:]
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _cap_events(response: httpx2.Response) -> None:
    assert isinstance(response.stream, httpx2.AsyncByteStream)
    response.stream = _EventCap(response.stream)


def _split_userinfo(base_url: str | None) -> tuple[str | None, httpx2.BasicAuth | None]:
    """``base_url`` without its credentials (``https://user:pw@proxy/v1``), and those as the
    Basic auth the HTTP client would make of them: sent the same, but the client logs each
    request's URL whole."""
    url = httpx2.URL(base_url) if base_url else None
    if url is None or not url.userinfo:
        return base_url, None
    return str(url.copy_with(userinfo=b"")), httpx2.BasicAuth(url.username, url.password)


# The loggers through which the SDKs and their HTTP clients write a request's URL: at INFO
# (``HTTP Request: POST https://…``, ``Retrying request to …``) and at DEBUG.
URL_LOGGERS = ("httpx", "httpx2", "openai._base_client", "anthropic._base_client")
HIDDEN = "***"


def _hide_query(value: Any) -> Any:
    """``value`` with its query's values hidden, where it is a URL with a query."""
    if isinstance(value, (httpx.URL, httpx2.URL)):
        url = str(value)
    elif isinstance(value, str) and "://" in value:
        url = value
    else:
        return value
    head, sep, query = url.partition("?")
    if not sep:
        return value
    names = (pair.partition("=")[0] for pair in query.split("&"))
    return f"{head}?" + "&".join(f"{name}={HIDDEN}" for name in names)


class QueryHidingFilter(logging.Filter):
    """Hides the values of the query of each URL a record's arguments hold: a provider URL
    may carry its key there (``?key=``), and the HTTP clients log each request's URL whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_hide_query(arg) for arg in record.args)
        return True


def hide_url_queries() -> None:
    """Put a ``QueryHidingFilter`` on each of ``URL_LOGGERS`` (once)."""
    for name in URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QueryHidingFilter) for f in logger.filters):
            logger.addFilter(QueryHidingFilter())


def parse_arguments(raw: str | None) -> dict[str, Any]:
    """A tool call's JSON arguments; what is not a JSON object is kept for the model to see."""
    try:
        value = json.loads(raw or "{}")
    except (ValueError, RecursionError):  # nested past the stack is not an object either
        return {"_invalid_json": raw}
    return value if isinstance(value, dict) else {"_invalid_json": raw}


class _SdkProvider:
    """What the SDK-backed providers share: the client, the request's common fields, the
    token callback and the error wrapping. A subclass says only how its API differs:
    ``request`` (the API's own fields) and ``stream`` (reading its streamed answer)."""

    sdk: ClassVar[Callable[..., Any]]
    http_client: ClassVar[Callable[..., httpx2.AsyncClient]]  # the SDK's, with its defaults
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
        hide_url_queries()
        base_url, auth = _split_userinfo(config.base_url)
        return cls.sdk(
            api_key=config.api_key or "none",
            base_url=base_url,
            max_retries=max_retries,
            # Uncompressed, so that the size of an event can be bounded as it comes.
            http_client=cls.http_client(
                auth=auth,
                headers={"Accept-Encoding": "identity"},
                event_hooks={"response": [_cap_events]},
            ),
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
        sink = TextSink(on_token)
        request = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            **self.request(system, messages, tools),
        }
        try:
            await self.stream(request, result, sink)
        except CallbackFailed as exc:
            raise exc.__cause__ or exc from None
        except AnswerError as exc:
            raise ProviderError(f"{self.label}: {exc}") from exc
        except self.api_error as exc:
            if isinstance(exc.__cause__, AnswerError):  # _EventCap, while the SDK sent
                raise ProviderError(f"{self.label}: {exc.__cause__}") from exc
            secret = str(getattr(self.client, "api_key", "") or "")
            raise ProviderError(f"{self.label} failed: {short_message(str(exc), secret)}") from exc
        except Exception as exc:  # anything else reading the answer: never a bare 500
            raise unreadable(self.label, exc) from exc
        result.text = sink.text
        return result


class OpenAIProvider(_SdkProvider):
    """Any OpenAI-compatible chat completions API (OpenAI, Ollama, vLLM, llama.cpp)."""

    sdk = openai.AsyncOpenAI
    http_client = openai.DefaultAsyncHttpxClient
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
        # ``async with``: a turn that ends early (a limit, a cancel) closes the stream now.
        async with await self.client.chat.completions.create(**request) as stream:
            async for chunk in stream:
                await reader.feed(as_json(chunk))
        if not reader.finished:  # the connection closed cleanly, but early
            raise AnswerError(ENDED_EARLY)
        reader.finish()


def _string(value: Any, what: str, limit: int) -> str:
    """A string field of an answer: absent is empty; another type, or past ``limit``
    characters, is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AnswerError(f"{what} is not a string")
    if len(value) > limit:
        raise AnswerError(f"{what} passed the limit of {limit:,} characters")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    """A JSON object of an answer: absent is empty; another type is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AnswerError(f"{what} is not a JSON object")
    return value


@dataclass
class _CallSlot:
    """A tool call being assembled from its streamed fragments (kept as pieces: see
    ``TextSink``)."""

    id: str = ""
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)
    name_chars: int = 0
    argument_chars: int = 0

    def add(self, name: str, arguments: str) -> None:
        self.name_chars += len(name)
        self.argument_chars += len(arguments)
        if self.name_chars > MAX_TOOL_NAME_CHARS:
            raise AnswerError(
                f"a tool call's name passed the limit of {MAX_TOOL_NAME_CHARS} characters"
            )
        if self.argument_chars > MAX_TOOL_ARGUMENTS_CHARS:
            raise AnswerError(
                f"a tool call's arguments passed the limit of {MAX_TOOL_ARGUMENTS_CHARS:,} "
                "characters"
            )
        self.name.append(name)
        self.arguments.append(arguments)


def _slot_for(calls: dict[int, _CallSlot], index: int) -> _CallSlot:
    slot = calls.get(index)
    if slot is None:
        if len(calls) >= MAX_TOOL_CALLS_READ:
            raise AnswerError(
                f"it asked for more than {MAX_TOOL_CALLS_READ} tool calls in one turn"
            )
        slot = calls[index] = _CallSlot()
    return slot


class ChatChunkReader:
    """Builds a ``Turn`` from OpenAI chat-completion chunks (as JSON objects): text emitted as
    it comes, tool calls assembled from their fragments, usage from the chunk that has it.
    Every field is checked: a chunk of the wrong shape raises ``AnswerError``."""

    def __init__(self, result: Turn, emit: OnToken) -> None:
        self.result = result
        self.emit = emit
        self.calls: dict[int, _CallSlot] = {}
        self.finished = False  # a finish_reason or the usage came: the answer is whole

    async def feed(self, chunk: Any) -> None:
        chunk = _object(chunk, "a chunk of its stream")
        if chunk.get("usage") is not None:
            self.finished = True  # the last chunk a stream with include_usage sends
            usage = _object(chunk["usage"], "its usage")
            self.result.input_tokens = count_tokens(usage.get("prompt_tokens"), "prompt_tokens")
            self.result.output_tokens = count_tokens(
                usage.get("completion_tokens"), "completion_tokens"
            )
        choices = chunk.get("choices")
        if choices is None:
            return
        if not isinstance(choices, list):
            raise AnswerError("its 'choices' is not a list")
        if not choices:
            return
        choice = _object(choices[0], "a choice")
        self.finished = self.finished or choice.get("finish_reason") is not None
        delta = _object(choice.get("delta"), "a choice's delta")
        content = _string(delta.get("content"), "a text delta", MAX_TURN_TEXT_CHARS)
        if content:
            await self.emit(content)
        parts = delta.get("tool_calls")
        if parts is None:
            return
        if not isinstance(parts, list):
            raise AnswerError("its 'tool_calls' is not a list")
        for part in parts:
            part = _object(part, "a tool call")
            index = part.get("index")
            if index is None:  # some servers leave it out when there is one call
                index = 0
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise AnswerError("a tool call's 'index' is not a non-negative integer")
            slot = _slot_for(self.calls, index)
            call_id = _string(part.get("id"), "a tool call's 'id'", MAX_TOOL_NAME_CHARS)
            if call_id:
                slot.id = call_id
            function = _object(part.get("function"), "a tool call's 'function'")
            slot.add(
                _string(function.get("name"), "a tool call's 'name'", MAX_TOOL_NAME_CHARS),
                _string(
                    function.get("arguments"),
                    "a tool call's 'arguments'",
                    MAX_TOOL_ARGUMENTS_CHARS,
                ),
            )

    def finish(self) -> None:
        self.result.tool_calls = [
            ToolCall(
                id=slot.id or f"call_{index}",
                name="".join(slot.name),
                arguments=parse_arguments("".join(slot.arguments)),
            )
            for index, slot in sorted(self.calls.items())
        ]


class AnthropicProvider(_SdkProvider):
    """Anthropic's native Messages API, with tool_use / tool_result blocks."""

    sdk = anthropic.AsyncAnthropic
    http_client = anthropic.DefaultAsyncHttpxClient
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
                # An empty answer (no text, no calls) is stored as it came, but the API
                # refuses an assistant turn without content: the next message would fail.
                if blocks:
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
        # The raw events, read here rather than by the SDK's ``messages.stream`` helper: that
        # one re-parses a tool call's whole partial input at every fragment and appends text
        # to an attribute, both quadratic in the answer's length, and checks no field.
        reader = MessageEventReader(result, emit)
        async with await self.client.messages.create(**request, stream=True) as stream:
            async for event in stream:
                await reader.feed(as_json(event))
        if not reader.stopped:  # the connection closed cleanly, but early
            raise AnswerError(ENDED_EARLY)
        reader.finish()


class MessageEventReader:
    """Builds a ``Turn`` from Anthropic Messages stream events (as JSON objects), checking
    every field it uses, as ``ChatChunkReader`` does for OpenAI's chunks."""

    def __init__(self, result: Turn, emit: OnToken) -> None:
        self.result = result
        self.emit = emit
        self.calls: dict[int, _CallSlot] = {}
        self.inputs: dict[int, dict[str, Any]] = {}  # a tool_use block's input at its start
        self.other_chars = 0  # thinking and the like: not kept, but bounded all the same
        self.stopped = False  # message_stop came: the answer is whole

    def _usage(self, usage: Any) -> None:
        usage = _object(usage, "its usage")
        if usage.get("input_tokens") is not None:
            self.result.input_tokens = count_tokens(usage["input_tokens"], "input_tokens")
        if usage.get("output_tokens") is not None:
            self.result.output_tokens = count_tokens(usage["output_tokens"], "output_tokens")

    async def feed(self, event: Any) -> None:
        event = _object(event, "an event of its stream")
        kind = event.get("type")
        if kind == "message_stop":
            self.stopped = True
        elif kind == "message_start":
            self._usage(_object(event.get("message"), "its message").get("usage"))
        elif kind == "message_delta":
            self._usage(event.get("usage"))
        elif kind == "content_block_start":
            block = _object(event.get("content_block"), "a content block")
            if block.get("type") == "tool_use":
                index = self._index(event)
                slot = _slot_for(self.calls, index)
                slot.id = _string(block.get("id"), "a tool call's 'id'", MAX_TOOL_NAME_CHARS)
                slot.add(
                    _string(block.get("name"), "a tool call's 'name'", MAX_TOOL_NAME_CHARS), ""
                )
                start = _object(block.get("input"), "a tool call's 'input'")
                if start and len(json.dumps(start)) > MAX_TOOL_ARGUMENTS_CHARS:
                    raise AnswerError(
                        "a tool call's arguments passed the limit of "
                        f"{MAX_TOOL_ARGUMENTS_CHARS:,} characters"
                    )
                self.inputs[index] = start
        elif kind == "content_block_delta":
            delta = _object(event.get("delta"), "a content block's delta")
            if delta.get("type") == "text_delta":
                await self.emit(_string(delta.get("text"), "a text delta", MAX_TURN_TEXT_CHARS))
            elif delta.get("type") == "input_json_delta":
                index = self._index(event)
                if index not in self.calls:
                    raise AnswerError("a tool call's input came before the tool call")
                piece = _string(
                    delta.get("partial_json"), "a tool call's input", MAX_TOOL_ARGUMENTS_CHARS
                )
                self.calls[index].add("", piece)
            else:
                self.other_chars += sum(len(v) for v in delta.values() if isinstance(v, str))
                if self.other_chars > MAX_TURN_TEXT_CHARS:
                    raise AnswerError(
                        f"its answer passed the limit of {MAX_TURN_TEXT_CHARS:,} characters "
                        "in one turn"
                    )

    @staticmethod
    def _index(event: dict[str, Any]) -> int:
        index = event.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise AnswerError("a content block's 'index' is not a non-negative integer")
        return index

    def finish(self) -> None:
        calls = []
        for index, slot in sorted(self.calls.items()):
            raw = "".join(slot.arguments)
            # No input fragments: the input came whole with the block's start.
            arguments = parse_arguments(raw) if raw else dict(self.inputs.get(index) or {})
            calls.append(ToolCall(slot.id or f"toolu_{index}", "".join(slot.name), arguments))
        self.result.tool_calls = calls


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
