"""The ``local`` provider: the gateway's own models, called in-process through its service
layer (admission, fair scheduler, usage accounting) with a service identity, so the usage is
attributed to ``legator-brain`` and no network hop to the control plane itself is made."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from legator.brain.providers import (
    AnswerError,
    CallbackFailed,
    ChatChunkReader,
    OnToken,
    OpenAIProvider,
    ProviderError,
    TextSink,
    Turn,
    unreadable,
)
from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.errors import AppError
from legator.gateway.relay import (
    UPSTREAM_ERRORS,
    event_json,
    is_done,
    open_stream,
    sse_batches,
)

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


LABEL = "local provider (gateway)"


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
        body: dict[str, Any] = {
            "model": self.model,
            "messages": OpenAIProvider.wire_messages(system, messages),
            "max_tokens": self.max_tokens,
        }
        if tools:
            body["tools"] = OpenAIProvider.wire_tools(tools)
        try:
            adm = await self.gateway.admit(
                SERVICE, self.model, _internal_request(), endpoint="chat", stream=True
            )
        except AppError as exc:
            raise ProviderError(f"local provider (gateway) refused: {exc.message}") from exc
        result = Turn()
        sink = TextSink(on_token)
        reader = ChatChunkReader(result, sink)
        # 499 unless set: a turn cancelled (its time limit) or whose caller went away.
        status, done, chunks = 499, False, 0
        try:
            upstream = await open_stream(adm, "/chat/completions", body)
            try:
                async for batch in sse_batches(upstream, self.gateway.max_answer_bytes):
                    for event in batch:
                        done = done or is_done(event)
                        data = event_json(event)
                        if isinstance(data, dict):
                            chunks += 1
                            await reader.feed(data)
            finally:
                upstream.release()
            if not done:
                status = 502
                raise ProviderError("local provider (gateway): the model's stream ended early")
            status = 200
        except CallbackFailed as exc:
            raise exc.__cause__ or exc from None
        except AnswerError as exc:
            status = 502
            raise ProviderError(f"{LABEL}: {exc}") from exc
        except ProviderError:
            status = 502
            raise
        except AppError as exc:
            status = getattr(exc, "status", 502)
            raise ProviderError(f"local provider (gateway) failed: {exc.message}") from exc
        except UPSTREAM_ERRORS as exc:
            status = 502
            raise ProviderError(
                f"local provider (gateway): the model's stream failed: {type(exc).__name__}"
            ) from exc
        except Exception as exc:  # anything else reading the answer: never a bare 500
            status = 502
            raise unreadable(LABEL, exc) from exc
        finally:
            # A backend that reports no usage in streams is billed by chunks, as the gateway
            # bills any stream.
            result.output_tokens = result.output_tokens or chunks
            adm.finish(status, result.input_tokens, result.output_tokens)
        reader.finish()
        result.text = sink.text
        return result
