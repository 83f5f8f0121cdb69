"""The `adapters` dynamic partitions: one partition per (adapter directory, weights content)."""

from __future__ import annotations

import re

import dagster as dg

ADAPTERS = "adapters"
adapters = dg.DynamicPartitionsDefinition(name=ADAPTERS)

_NOT_SLUG = re.compile(r"[^a-z0-9_]+")
_SHA8 = re.compile(r"[0-9a-f]{8}")


def slug(name: str) -> str:
    """Lowercase `name`, turn every run of chars outside [a-z0-9_] into one '-', trim '-'."""
    return _NOT_SLUG.sub("-", name.lower()).strip("-")


def partition_key(name: str, sha256: str) -> str:
    """`<slug(name)>-<sha8>`: safe for Dagster keys, UI backfills and run keys."""
    base, sha8 = slug(name), sha256[:8].lower()
    if not base:
        raise ValueError(f"adapter name {name!r} has no letters or digits to build a key from")
    if not _SHA8.fullmatch(sha8):
        raise ValueError(f"{sha256!r} is not a hex sha256 digest")
    return f"{base}-{sha8}"


def split_key(key: str) -> tuple[str, str]:
    """(slug, sha8) of a partition key built by `partition_key`."""
    base, sep, sha8 = key.rpartition("-")
    if not (sep and base and _SHA8.fullmatch(sha8)):
        raise ValueError(f"{key!r} is not an adapter partition key (<slug>-<sha8>)")
    return base, sha8
