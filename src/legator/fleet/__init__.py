"""Fleet wing: probes on hosts, the WebSocket hub, signed commands and two-layer policy."""
