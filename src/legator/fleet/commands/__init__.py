"""Commands: the one dispatch path to probes, results, streams."""
