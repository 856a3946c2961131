"""Encrypted secrets with setec semantics: the store behind `legerd` and the control plane."""
