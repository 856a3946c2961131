"""Legator: a self-hosted control plane for AI infrastructure."""

__version__ = "0.1.0"
