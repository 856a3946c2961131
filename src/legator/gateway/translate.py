"""Anthropic Messages ↔ OpenAI chat completions: requests, responses and stream events.

Pure functions and one small state machine; no I/O. Hand-written because no maintained
library translates in this direction for a proxy (LiteLLM's translators live inside its proxy).
"""

from __future__ import annotations

import json
from typing import Any

from legator.core.db import new_id
from legator.core.errors import BadRequest
from legator.gateway.counts import usage_counts

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_PASSTHROUGH = ("temperature", "top_p", "top_k")


def _text_of(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise BadRequest(f"{where}: must be a string or a list of blocks")
    parts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise BadRequest(f"{where}.{i}: only text blocks are allowed here")
        parts.append(str(block.get("text", "")))
    return "\n".join(parts)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise BadRequest(f"{where}.source: must be an object with type 'base64' or 'url'")
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = str(source.get("url", ""))
    else:
        raise BadRequest(f"{where}.source: expected type 'base64' or 'url'")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(content: Any, where: str) -> tuple[str, list[dict[str, Any]]]:
    """A tool result's text, and its image blocks as ``image_url`` parts."""
    if not content or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise BadRequest(f"{where}: must be a string or a list of blocks")
    images = [
        _image_part(block, f"{where}.{i}")
        for i, block in enumerate(content)
        if isinstance(block, dict) and block.get("type") == "image"
    ]
    texts = [
        block for block in content if not (isinstance(block, dict) and block.get("type") == "image")
    ]
    return _text_of(texts, where), images


def _user_messages(content: Any, where: str) -> list[dict[str, Any]]:
    if not content and isinstance(content, str | list):
        # Dropped, it would turn the assistant turn before it into a prefill.
        raise BadRequest(f"{where}.content: must not be empty")
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: must be a string or a list of blocks")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(block, f"{where}.content.{i}"))
        elif kind == "tool_result":
            if not block.get("tool_use_id"):
                raise BadRequest(f"{where}.content.{i}.tool_use_id: field required")
            text, images = _tool_result(block.get("content", ""), f"{where}.content.{i}.content")
            if block.get("is_error"):
                text = f"[error] {text}"
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            if images:
                # A tool message carries text only: its images follow in the user message that
                # comes after the tool messages, named after the call they came from.
                label = f"[images from tool result {block['tool_use_id']}]"
                parts.extend([{"type": "text", "text": label}, *images])
        else:
            raise BadRequest(f"{where}.content.{i}: unsupported block type {kind!r}")
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        joined = "\n".join(p["text"] for p in parts) if only_text else parts
        out.append({"role": "user", "content": joined})
    return out


def _assistant_message(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: must be a string or a list of blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            if not block.get("id") or not block.get("name"):
                raise BadRequest(f"{where}.content.{i}: tool_use needs id and name")
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": json.dumps(block.get("input") or {}),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise BadRequest(f"{where}.content.{i}: unsupported block type {kind!r}")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("tools: must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not tool.get("name"):
            raise BadRequest(f"tools.{i}.name: field required")
        out.append(
            {
                "type": "function",
                "function": {
                    "name": tool["name"],
                    "description": tool.get("description", ""),
                    "parameters": tool.get("input_schema") or {"type": "object"},
                },
            }
        )
    return out


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        raise BadRequest("tool_choice: must be an object")
    disable = choice.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise BadRequest("tool_choice.disable_parallel_tool_use: must be true or false")
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest("tool_choice: expected auto, any, none or tool with a name")


def messages_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat completions request."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise BadRequest("max_tokens: field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("max_tokens: must be a positive integer")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("messages: field required")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty list")
    out: list[dict[str, Any]] = []
    if body.get("system"):
        out.append({"role": "system", "content": _text_of(body["system"], "system")})
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or "content" not in message:
            raise BadRequest(f"{where}: needs role and content")
        role = message.get("role")
        if role == "user":
            out.extend(_user_messages(message["content"], where))
        elif role == "assistant":
            out.append(_assistant_message(message["content"], where))
        else:
            raise BadRequest(f"{where}.role: must be 'user' or 'assistant'")
    request: dict[str, Any] = {"messages": out, "max_tokens": max_tokens}
    for name in _PASSTHROUGH:
        if name in body:
            request[name] = body[name]
    if "stop_sequences" in body:
        stops = body["stop_sequences"]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop_sequences: must be a list of strings")
        request["stop"] = stops
    if body.get("tools"):
        request["tools"] = _tools(body["tools"])
    if body.get("tool_choice"):
        request["tool_choice"] = _tool_choice(body["tool_choice"])
        if body["tool_choice"].get("disable_parallel_tool_use"):
            request["parallel_tool_calls"] = False
    return request


def _stop(
    finish_reason: str | None, matched: Any, text: str, stops: list[str], tool_seen: bool
) -> tuple[str, str | None]:
    """Anthropic's stop reason and sequence. OpenAI's API does not say which stop sequence
    hit: vLLM does (``stop_reason`` beside ``finish_reason``), and a backend that leaves the
    sequence at the end of the text shows it; otherwise a stop is ``end_turn``. A tool call
    cut off by the token limit is ``max_tokens``, not ``tool_use``: its input is unfinished."""
    reason = STOP_REASONS.get(finish_reason or "stop", "end_turn")
    if reason == "end_turn":
        if isinstance(matched, str) and matched in stops:
            return "stop_sequence", matched
        for stop in stops:
            if stop and text.endswith(stop):
                return "stop_sequence", stop
    if tool_seen and reason != "max_tokens":
        return "tool_use", None
    return reason, None


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except (ValueError, RecursionError):
        return {"_raw": str(arguments)}
    return value if isinstance(value, dict) else {"value": value}


class UnexpectedAnswer(Exception):
    """The backend's answer is JSON but not the shape of a chat completion."""


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnexpectedAnswer(f"{what} is not an object")
    return value


def _answer_text(content: Any) -> str:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    raise UnexpectedAnswer("message.content is neither text nor a list of parts")


def _arguments(value: Any) -> str:
    """A tool call's arguments as JSON text (some servers send the object itself)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, dict):
        return json.dumps(value)
    raise UnexpectedAnswer("a tool call's arguments are neither a string nor an object")


def openai_to_message(data: dict[str, Any], model: str, stops: list[str]) -> dict[str, Any]:
    """A chat completion as an Anthropic message; ``UnexpectedAnswer`` for any other shape."""
    choices = data.get("choices") or [{}]
    if not isinstance(choices, list):
        raise UnexpectedAnswer("choices is not a list")
    choice = _object(choices[0], "choices[0]")
    message = _object(choice.get("message"), "choices[0].message")
    content: list[dict[str, Any]] = []
    text = _answer_text(message.get("content"))
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise UnexpectedAnswer("message.tool_calls is not a list")
    reason, sequence = _stop(
        choice.get("finish_reason"),
        choice.get("stop_reason"),
        text,
        stops,
        bool(calls),
    )
    if sequence is not None and text.endswith(sequence):
        text = text[: -len(sequence)]  # Anthropic's text stops before the sequence
    if text:
        content.append({"type": "text", "text": text})
    for call in calls:
        function = _object(_object(call, "a tool call").get("function"), "a tool call's function")
        content.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or f"toolu_{new_id().replace('-', '')[:24]}"),
                "name": str(function.get("name") or ""),
                "input": _tool_input(_arguments(function.get("arguments"))),
            }
        )
    tokens_in, tokens_out = usage_counts(data.get("usage"))
    return {
        "id": "msg_" + new_id().replace("-", ""),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
    }


class UntranslatableStream(Exception):
    """The backend's stream has a shape Anthropic's events cannot carry."""


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


class StreamTranslator:
    """OpenAI chunks in, Anthropic events out: message_start, content blocks, message_delta,
    message_stop (or an error event), emitted as each chunk arrives.

    Events go through a buffer: what a chunk built before it turned out untranslatable is
    still sent (``drain``), so the events stay well-formed. With
    stop sequences, text that could be the start of one is held back until it is known not to
    be: Anthropic's text never contains the sequence that stopped it."""

    def __init__(self, model: str, stops: list[str] | None = None) -> None:
        self.model = model
        self.stops = [stop for stop in stops or [] if stop]
        self.longest = max((len(stop) for stop in self.stops), default=0)
        self.firsts = {stop[0] for stop in self.stops}
        self.held = ""  # streamed text not sent yet: it may be a stop sequence's beginning
        self.index = -1
        self.open: str | None = None  # "text" or "tool:<openai index>:<call id>"
        self.finish: str | None = None
        self.text_tail = ""
        self.input_tokens = 0
        self.output_tokens = 0
        self.tool_seen = False
        self.matched: Any = None  # the stop sequence that hit, where the backend says (vLLM)
        # Each OpenAI tool-call index: the id of the call under it and its block's index.
        self.calls: dict[Any, tuple[str, int]] = {}
        self._out: list[bytes] = []

    def start(self) -> bytes:
        message = {
            "id": "msg_" + new_id().replace("-", ""),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse("message_start", {"type": "message_start", "message": message})

    def drain(self) -> bytes:
        """The events built since the last call."""
        out, self._out = b"".join(self._out), []
        return out

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        self._out.append(sse(event, data))

    def _close(self) -> None:
        if self.open is None:
            return
        if self.open == "text" and self.held:
            self._text_delta(self.held)  # not at the end after all
            self.held = ""
        self.open = None
        self._emit("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _begin(self, kind: str, block: dict[str, Any]) -> None:
        self._close()
        self.index += 1
        self.open = kind
        self._emit(
            "content_block_start",
            {"type": "content_block_start", "index": self.index, "content_block": block},
        )

    def _text_delta(self, text: str) -> None:
        self._emit(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": self.index,
                "delta": {"type": "text_delta", "text": text},
            },
        )

    def _releasable(self, text: str) -> str:
        """Of the held text and ``text``, what may be sent now: all but the part from the
        first character, among the last ``longest``, that begins a stop sequence."""
        pending = self.held + text
        cut = len(pending)
        for i in range(max(0, len(pending) - self.longest), len(pending)):
            if pending[i] in self.firsts:
                cut = i
                break
        self.held = pending[cut:]
        return pending[:cut]

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events for one chunk. ``UntranslatableStream`` for a chunk of a shape
        Anthropic's events cannot carry, or not a chat completion chunk's: the events it
        had built by then are left for ``drain``."""
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.input_tokens, self.output_tokens = usage_counts(usage)
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise UntranslatableStream("a chunk's choices is not a list")
        for choice in choices:
            self._choice(choice)
        return self.drain()

    def _choice(self, choice: Any) -> None:
        if not isinstance(choice, dict) or not isinstance(choice.get("delta") or {}, dict):
            raise UntranslatableStream("a chunk's choice is not an object with a delta")
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text is not None and not isinstance(text, str):
            raise UntranslatableStream("a chunk's delta.content is not text")
        if text:
            if self.open != "text":
                self._begin("text", {"type": "text", "text": ""})
            self.text_tail = (self.text_tail + text)[-max(200, self.longest) :]
            if released := self._releasable(text) if self.stops else text:
                self._text_delta(released)
        calls = delta.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise UntranslatableStream("a chunk's delta.tool_calls is not a list of objects")
        for call in calls:
            function = call.get("function") or {}
            if not isinstance(function, dict):
                raise UntranslatableStream("a tool call's function is not an object")
            try:
                arguments = _arguments(function.get("arguments"))
            except UnexpectedAnswer as exc:
                raise UntranslatableStream(str(exc)) from None
            self._tool_call(call, function)
            if arguments:
                self._emit(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self.index,
                        "delta": {"type": "input_json_delta", "partial_json": arguments},
                    },
                )
        if choice.get("finish_reason"):
            self.finish = str(choice["finish_reason"])
        if isinstance(choice.get("stop_reason"), str):
            self.matched = choice["stop_reason"]

    def _tool_call(self, call: dict[str, Any], function: dict[str, Any]) -> None:
        """Opens the call's block when the call is new: under an index not seen yet, or under
        one seen with another id (some servers send every call as index 0, each with its id).
        Raises ``UntranslatableStream`` for a fragment of a call whose block has closed."""
        position = call.get("index", 0)
        if not isinstance(position, int | str):
            raise UntranslatableStream("a tool call's index is not a number")
        known = self.calls.get(position)
        call_id = call.get("id")
        if known is not None and (not call_id or call_id == known[0]):
            if known[1] != self.index or self.open is None:
                raise UntranslatableStream(
                    "the backend interleaved the arguments of several tool calls, which "
                    "Anthropic's stream events cannot carry"
                )
            return
        self.tool_seen = True
        call_id = str(call_id or f"toolu_{new_id().replace('-', '')[:24]}")
        block = {"type": "tool_use", "id": call_id, "name": str(function.get("name") or "")}
        self._begin(f"tool:{position}:{call_id}", {**block, "input": {}})
        self.calls[position] = (call_id, self.index)

    def end(self, error: str | None = None) -> bytes:
        """The events that end the stream: the held text (less the stop sequence that ended
        it), the open block's end, then message_delta and message_stop, or the error."""
        if error is not None:
            self._close()
            self._emit("error", {"type": "error", "error": {"type": "api_error", "message": error}})
            return self.drain()
        reason, sequence = _stop(
            self.finish, self.matched, self.text_tail, self.stops, self.tool_seen
        )
        if self.held and sequence is not None and self.held.endswith(sequence):
            self.held = self.held[: -len(sequence)]
        self._close()
        self._emit(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
            },
        )
        self._emit("message_stop", {"type": "message_stop"})
        return self.drain()
