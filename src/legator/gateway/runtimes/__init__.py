"""Managed backend runtimes: ``process`` (a supervised llama.cpp server) and ``podman``."""
