"""Probes: build requests, let the backend execute them, compute a metric with numpy."""
