"""The SDKs' HTTP clients log each request's URL (``HTTP Request: POST https://…``, at INFO on
the ``httpx2`` logger, which the core's logging set-up does not quiet): a key in a provider
URL's query must not reach the server's log, at the default level or at DEBUG."""

from __future__ import annotations

import asyncio
import logging

import pytest

from legator.brain.providers import SDK_PROVIDERS, ProviderConfig, ProviderError
from tests.brain.llm_server import ScriptedLLM

SECRET = "k3y-in-the-query-qz9"


def _call(llm: ScriptedLLM, provider: str) -> None:
    """One real model call with ``?key=SECRET`` in the base URL. The SDKs append their path
    after the query, so the server answers 404: the request is made, and logged, all the same."""
    root = f"{llm.url}/v1" if provider == "openai" else llm.url
    config = ProviderConfig(provider, "scripted-model", "sk-test", f"{root}?key={SECRET}")
    llm.script = [{"text": "Fine."}]

    async def run() -> None:
        sdk = SDK_PROVIDERS[provider](config, max_retries=0)
        try:
            await sdk.turn("", [{"role": "user", "content": "hi"}], [])
        except ProviderError:
            pass
        finally:
            await sdk.client.close()

    asyncio.run(run())


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_key_in_a_provider_urls_query_stays_out_of_the_logs(
    llm: ScriptedLLM,
    provider: str,
    level: int,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: ``{"event": "HTTP Request: POST http://127.0.0.1:…/v1/?key=…chat/completions
    \\"HTTP/1.1 404 Not Found\\"", "level": "info", "logger": "httpx2"}`` on stdout, key and all,
    at the default level (tests/conftest.py sets up logging as the server does)."""
    with caplog.at_level(level):
        _call(llm, provider)
    lines = [record.getMessage() for record in caplog.records]
    requests = [line for line in lines if line.startswith("HTTP Request: POST")]
    assert requests, lines  # the line is still logged, its URL without the key
    assert all("key=***" in line for line in requests), requests
    assert not [line for line in lines if SECRET in line]
    written = capsys.readouterr().out
    assert SECRET not in written
