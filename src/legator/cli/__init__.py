"""Command-line entry points. Thin: parse, call a service, print."""
