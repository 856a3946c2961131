"""The probe's version: the distribution's, or the one baked into a zipapp build."""

from __future__ import annotations

from legator import __version__

PROBE_VERSION = __version__
