"""The durable approval queue: risky actions wait here for a human decision."""
