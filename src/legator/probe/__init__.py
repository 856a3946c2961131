"""The probe: a lean agent on each host. It imports only ``legator.fleet.protocol``,
``legator.fleet.policy``, ``legator.core.canonical`` and its own modules."""
