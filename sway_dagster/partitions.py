"""The `adapters` dynamic partitions: one partition per (adapter directory, weights content)."""

from __future__ import annotations

import dagster as dg

from sway_engine.adapters import partition_key, slug, split_key

ADAPTERS = "adapters"
adapters = dg.DynamicPartitionsDefinition(name=ADAPTERS)

__all__ = ["ADAPTERS", "adapters", "partition_key", "slug", "split_key"]
