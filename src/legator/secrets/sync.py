"""Copy a control-plane user's deploy secrets into the local legerd."""

from __future__ import annotations

from legator.secrets.client import Client

DEPLOY_PREFIX = "deploy/"


def sync_deploy_secrets(remote: Client, local: Client, local_user: str) -> list[tuple[str, int]]:
    """``deploy/<me>/<name>`` on the control plane → ``leger/<local_user>/<name>`` locally.
    Returns (local name, local version) for each; an unchanged value keeps its version."""
    me = remote.whoami()
    prefix = f"{DEPLOY_PREFIX}{me}/"
    copied = []
    for info in remote.list():
        if not info.name.startswith(prefix):
            continue
        value, _ = remote.get(info.name)
        local_name = f"leger/{local_user}/{info.name[len(prefix) :]}"
        version = local.put(local_name, value)
        # A put of a new value is stored inactive; a sync means "use what the plane has".
        if local.info(local_name).active_version != version:
            local.activate(local_name, version)
        copied.append((local_name, version))
    return copied
