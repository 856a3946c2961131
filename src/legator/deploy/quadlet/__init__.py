"""Quadlet unit files: parse, validate per type, find conflicts, run the real generator."""
