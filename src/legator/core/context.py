"""Per-request context carried in contextvars (request id for logs, audit and errors)."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("legator_request_id", default="")


def current_request_id() -> str:
    return request_id_var.get()
