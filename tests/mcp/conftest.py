"""Real control plane and probes (the fleet's e2e fixtures)."""

from tests.fleet.e2e.conftest import admin, fleet_server, spawn_probe  # noqa: F401
