"""The agent loop shared by chat, fleet chat and the task runner: ask the model, run the tools
it calls (each through the gate), feed the results back, until it answers in words or a step
or time limit is reached. A provider failure ends the loop with a clear error; a tool call
already made is never repeated, because nothing here retries a step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from legator.brain.providers import OnToken, Provider, ProviderError
from legator.brain.tools import Toolbox


@dataclass
class Transcript:
    status: str = "running"  # completed / step_limit / time_limit / error
    steps: list[dict[str, Any]] = field(default_factory=list)
    answer: str = ""
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "answer": self.answer,
            "error": self.error,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }


async def converse(
    provider: Provider,
    system: str,
    messages: list[dict[str, Any]],
    toolbox: Toolbox,
    *,
    max_steps: int,
    timeout_s: float,
    on_token: OnToken | None = None,
    on_step: Any = None,
) -> Transcript:
    """Run the loop; ``messages`` is extended in place with every assistant and tool turn."""
    transcript = Transcript()
    deadline = time.monotonic() + timeout_s
    toolbox.deadline = deadline
    for number in range(1, max_steps + 1):
        if time.monotonic() >= deadline:
            transcript.status = "time_limit"
            transcript.error = f"the time limit of {timeout_s:.0f}s was reached"
            return transcript
        try:
            turn = await provider.turn(system, messages, toolbox.tools, on_token)
        except ProviderError as exc:
            transcript.status = "error"
            transcript.error = str(exc)
            return transcript
        transcript.input_tokens += turn.input_tokens
        transcript.output_tokens += turn.output_tokens
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.tool_calls]
        messages.append({"role": "assistant", "content": turn.text, "tool_calls": calls})
        step: dict[str, Any] = {"step": number, "text": turn.text, "tools": []}
        for call in turn.tool_calls:
            outcome = await toolbox.call(call.name, call.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": outcome.content})
            step["tools"].append({"name": call.name, "arguments": call.arguments, **outcome.record})
        transcript.steps.append(step)
        if on_step is not None:
            await on_step(step)
        if not turn.tool_calls:
            transcript.status = "completed"
            transcript.answer = turn.text
            return transcript
    transcript.status = "step_limit"
    transcript.error = f"the step limit of {max_steps} was reached before a final answer"
    return transcript
