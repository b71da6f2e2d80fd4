"""One router per resource: features, jobs, health (and metrics)."""
