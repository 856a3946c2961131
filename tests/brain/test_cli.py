"""``legator task`` and ``legator chat`` as real subprocesses against the live server."""

from __future__ import annotations

import httpx

from tests.brain.llm_server import ScriptedLLM
from tests.support import LiveServer, run_cli


def test_task_and_chat_commands(
    fleet_server: LiveServer, admin: httpx.Client, spawn_probe, llm: ScriptedLLM
) -> None:  # type: ignore[no-untyped-def]
    probe = spawn_probe("cli-a")
    pid = probe.probe_id
    env = {"LEGATOR_SERVER_URL": fleet_server.url, "LEGATOR_API_KEY": fleet_server.admin_key}
    llm.script = [
        {
            "text": "Looking.",
            "tools": [("run_command", {"probe": pid, "command": "uptime", "reason": "look"})],
        },
        {"text": "All good."},
        {"text": "Hello from the probe chat."},
        {"text": "Second answer."},
    ]
    done = run_cli("legator", "task", pid, "check the host", env=env)
    assert done.returncode == 0, done.stderr
    assert "step 1" in done.stdout and "uptime" in done.stdout and "All good." in done.stdout
    chat = run_cli("legator", "chat", pid, env=env, input="hi\nagain\n\n")
    assert chat.returncode == 0, chat.stderr
    assert "Hello from the probe chat." in chat.stdout and "Second answer." in chat.stdout
    # The second message continued the same session.
    assert "Hello from the probe chat." in str(llm.requests[-1]["messages"])
    missing = run_cli("legator", "task", "prb-00000000", "x", env=env)
    assert missing.returncode == 3 and "no probe" in missing.stderr
    outage = run_cli("legator", "chat", pid, "-m", "hi", env=env)  # the script is empty now
    assert outage.returncode == 1 and "provider failed" in outage.stdout + outage.stderr
