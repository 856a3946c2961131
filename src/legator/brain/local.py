"""The ``local`` provider: the gateway's own models, called in-process through its service
layer (admission, fair scheduler, usage accounting) with a service identity, so the usage is
attributed to ``legator-brain`` and no network hop to the control plane itself is made."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from legator.brain.providers import (
    OnToken,
    OpenAIProvider,
    ProviderError,
    ToolCall,
    Turn,
    parse_arguments,
)
from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import AppError

SERVICE = Principal(
    user_id=None,
    username="legator-brain",
    role="service",
    permissions=frozenset({Permission.AUTHENTICATED, Permission.GATEWAY_INFER}),
    method="service",
)


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}  # pragma: no cover - never reached


def _internal_request() -> Request:
    # The scheduler watches the caller's request for a disconnect while it queues; an
    # in-process caller never disconnects (its own time limit cancels it instead).
    scope = {"type": "http", "method": "POST", "path": "/internal/brain", "headers": []}
    return Request(scope, receive=_never_disconnects)


class LocalProvider:
    def __init__(self, gateway: Any, model: str, max_tokens: int) -> None:
        self.gateway = gateway
        self.model = model
        self.max_tokens = max_tokens

    async def turn(
        self,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        on_token: OnToken | None = None,
    ) -> Turn:
        from legator.gateway.relay import call_json

        body: dict[str, Any] = {
            "model": self.model,
            "messages": OpenAIProvider.wire_messages(system, messages),
            "stream": False,
            "max_tokens": self.max_tokens,
        }
        if tools:
            body["tools"] = OpenAIProvider.wire_tools(tools)
        try:
            adm = await self.gateway.admit(
                SERVICE, self.model, _internal_request(), endpoint="chat", stream=False
            )
        except AppError as exc:
            raise ProviderError(f"local provider (gateway) refused: {exc.message}") from exc
        status, tokens_in, tokens_out = 499, 0, 0
        try:
            data = await call_json(adm, "/chat/completions", body)
            usage = data.get("usage") or {}
            tokens_in = int(usage.get("prompt_tokens") or 0)
            tokens_out = int(usage.get("completion_tokens") or 0)
            status = 200
        except AppError as exc:
            status = getattr(exc, "status", 502)
            raise ProviderError(f"local provider (gateway) failed: {exc.message}") from exc
        finally:
            adm.finish(status, tokens_in, tokens_out)
        message = ((data.get("choices") or [{}])[0]).get("message") or {}
        turn = Turn(text=message.get("content") or "", input_tokens=tokens_in)
        turn.output_tokens = tokens_out
        for index, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") or {}
            turn.tool_calls.append(
                ToolCall(
                    call.get("id") or f"call_{index}",
                    function.get("name") or "",
                    parse_arguments(function.get("arguments")),
                )
            )
        if turn.text and on_token is not None:
            await on_token(turn.text)
        return turn
