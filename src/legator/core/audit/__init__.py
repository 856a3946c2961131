"""The audit trail: append-only, sanitised, optionally hash-chained."""
