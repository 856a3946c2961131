"""The agent loop shared by chat, fleet chat and the task runner: ask the model, run the tools
it calls (each through the gate), feed the results back, until it answers in words or a step
or time limit is reached. A provider failure ends the loop with a clear error; a tool call
already made is never repeated, because nothing here retries a step.

The time limit holds inside a step too: a model turn still streaming at the deadline is
cancelled, and the tool calls of a turn are checked against it one by one (a call already
running finishes: its command may have started on a host). At most
``MAX_TOOL_CALLS_PER_TURN`` calls of one turn run; every call left over is answered to the
model as not run, so the conversation stays well formed.

What tools put into the conversation is bounded where it enters it: one result at most
``Toolbox.result_chars`` (the rest cut, with a marker saying how much), and all the results
the model is shown at once at most ``RESULTS_BUDGET_CHARS``: past it the oldest give way to
a short note, however many probes a call reached or steps a conversation took. The
transcript keeps each result as the tool gave it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from legator.brain.providers import OnToken, Provider, ProviderError, ToolCall
from legator.brain.tools import Toolbox, ToolOutcome

MAX_TOOL_CALLS_PER_TURN = 16
# All the tool results a model is shown at once: about 25,000 tokens at four characters a
# token, so every request of a conversation stays well within what a provider accepts.
RESULTS_BUDGET_CHARS = 100_000
DROPPED_HEAD_CHARS = 120  # kept of a result that gives way: a command's request id comes first
DROPPED = "[dropped by Legator"
GONE = f"{DROPPED}: an earlier result]"
CUT = "\n…[cut by Legator: {cut:,} of {whole:,} characters not shown]"


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


def _not_run(reason: str, why: str) -> ToolOutcome:
    return ToolOutcome(f"not run: {why}", {"error": f"not run: {why}", "not_run": reason})


def _limit(timeout_s: float) -> str:
    return f"the time limit of {timeout_s:g}s was reached"


def shown(content: str, limit: int) -> str:
    """``content`` as the model sees it: at most ``limit`` characters, marker included."""
    whole = len(content)
    if whole <= limit:
        return content
    keep = max(0, limit - len(CUT.format(cut=whole, whole=whole)))
    return content[:keep] + CUT.format(cut=whole - keep, whole=whole)


def _dropped(content: str) -> str:
    if content.startswith(DROPPED):
        return content
    head = content[:DROPPED_HEAD_CHARS]
    return (
        f"{DROPPED}: an earlier result of {len(content):,} characters, to keep the "
        f"conversation within its budget; call the tool again if you need it. It began: {head}]"
    )


NOTE_CHARS = len(_dropped("")) + DROPPED_HEAD_CHARS + 16  # the longest a note can be


def _fit(content: str, room: int) -> str:
    """``content`` if it fits ``room``, else its note, else the shorter of it and ``GONE``."""
    if len(content) <= room:
        return content
    note = _dropped(content)
    return note if len(note) <= room else min(content, GONE, key=len)


def make_room(messages: list[dict[str, Any]], budget: int) -> None:
    """Fit the tool results into ``budget``, the newest first: each stays whole while it
    fits, else becomes a note, else (a long conversation's oldest) a shorter one. Messages are
    replaced, not changed: they may be a stored history's."""
    results = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    if sum(len(messages[i]["content"]) for i in results) <= budget:
        return
    left = budget
    for older, index in reversed(list(enumerate(results))):
        # Leave the older results room for a note each while those notes take at most a
        # quarter of the budget, else (a long conversation) for their shortest form.
        reserve = NOTE_CHARS if older * NOTE_CHARS <= budget // 4 else len(GONE)
        fitted = _fit(messages[index]["content"], left - older * reserve)
        left -= len(fitted)
        if fitted != messages[index]["content"]:
            messages[index] = {**messages[index], "content": fitted}


def results_budget(toolbox: Toolbox) -> int:
    # Room for two whole results at least, where an operator asks for longer outputs.
    return max(RESULTS_BUDGET_CHARS, 2 * toolbox.result_chars)


async def _call(
    toolbox: Toolbox, call: ToolCall, number: int, deadline: float, timeout_s: float
) -> ToolOutcome:
    """Run the ``number``-th call (from 0) of a turn, or say why it was not run."""
    if number >= MAX_TOOL_CALLS_PER_TURN:
        return _not_run(
            "too_many_calls",
            f"at most {MAX_TOOL_CALLS_PER_TURN} tool calls run in one turn; "
            "ask for this one again in the next turn",
        )
    if time.monotonic() >= deadline:
        return _not_run("time_limit", _limit(timeout_s))
    return await toolbox.call(call.name, call.arguments)


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
    transcript: Transcript | None = None,
) -> Transcript:
    """Run the loop; ``messages`` is extended in place with every assistant and tool turn.
    ``transcript`` (a new one unless given) fills as the loop goes: a caller that passes its
    own still knows what was spent when the loop raises."""
    transcript = Transcript() if transcript is None else transcript
    deadline = time.monotonic() + timeout_s
    toolbox.deadline = deadline
    budget = results_budget(toolbox)
    for number in range(1, max_steps + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            transcript.status = "time_limit"
            transcript.error = _limit(timeout_s)
            return transcript
        limit = asyncio.timeout(remaining)
        try:
            async with limit:
                turn = await provider.turn(system, messages, toolbox.tools, on_token)
        except ProviderError as exc:
            transcript.status = "error"
            transcript.error = str(exc)
            return transcript
        except TimeoutError:
            if not limit.expired():  # not our deadline (the provider wraps its own)
                raise
            transcript.status = "time_limit"
            transcript.error = f"{_limit(timeout_s)} while the model was answering"
            return transcript
        transcript.input_tokens += turn.input_tokens
        transcript.output_tokens += turn.output_tokens
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.tool_calls]
        messages.append({"role": "assistant", "content": turn.text, "tool_calls": calls})
        step: dict[str, Any] = {"step": number, "text": turn.text, "tools": []}
        for index, call in enumerate(turn.tool_calls):
            outcome = await _call(toolbox, call, index, deadline, timeout_s)
            content = shown(outcome.content, toolbox.result_chars)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
            make_room(messages, budget)
            step["tools"].append({"name": call.name, "arguments": call.arguments, **outcome.record})
        transcript.steps.append(step)
        if on_step is not None:
            await on_step(step)
        skipped = sum(1 for t in step["tools"] if t.get("not_run") == "time_limit")
        if skipped:
            transcript.status = "time_limit"
            transcript.error = f"{_limit(timeout_s)}; {skipped} tool call(s) were not run"
            return transcript
        if not turn.tool_calls:
            transcript.status = "completed"
            transcript.answer = turn.text
            return transcript
    transcript.status = "step_limit"
    transcript.error = f"the step limit of {max_steps} was reached before a final answer"
    return transcript
