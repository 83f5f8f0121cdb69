"""sway's Dagster face: thin assets over sway_engine, resources bound in definitions.py."""
