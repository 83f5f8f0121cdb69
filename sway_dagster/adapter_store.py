"""The adapter directory as a resource: scan it for adapters and map partition keys to paths."""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import ConfigDict, PrivateAttr

from sway_dagster.partitions import partition_key, slug, split_key
from sway_engine.adapters import CONFIG, WEIGHTS, AdapterInfo, read_adapter
from sway_engine.errors import AdapterError

Status = Literal["ready", "writing", "queued", "not_adapter", "invalid"]
WAITING = frozenset({"writing", "queued"})  # not yet judged: look again next tick


@dataclass(frozen=True)
class Candidate:
    """One immediate subdirectory of the adapter root and what the scan made of it."""

    name: str
    path: Path
    status: Status
    key: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    reason: str = ""
    stamp: str | None = None


class AdapterStoreResource(dg.ConfigurableResource):
    """A folder whose subdirectories are PEFT LoRA adapters (one adapter per directory)."""

    model_config = ConfigDict(extra="forbid")

    root: str
    settle_seconds: float = 5.0
    # Bytes of new weights one scan hashes (always at least one adapter); the rest wait for
    # the next tick. Measured: a scan of a 262 MB adapter takes 0.21 s on the 2-core dev
    # machine, so the budget costs about 7 s, far inside Dagster's 60 s sensor timeout.
    hash_budget_bytes: int = 8 * 1024**3
    # (path, weights stamp) -> (info, finiteness checked): every asset of a run verifies its
    # partition, and the weights are hashed once per run, not once per asset.
    _verified: dict[tuple[str, str], tuple[AdapterInfo, bool]] = PrivateAttr(default_factory=dict)
    _hashed: int = PrivateAttr(default=0)  # bytes hashed by the scan in progress

    @property
    def root_path(self) -> Path:
        """The root folder, with `~` expanded."""
        return Path(self.root).expanduser()

    def scan(
        self, now: float | None = None, *, known: Mapping[str, tuple[str, str]] | None = None
    ) -> list[Candidate]:
        """Classify every subdirectory (sorted by name); a missing root gives [].

        `known`: directory name -> (weights stamp, sha256) of an earlier scan, to skip re-hashing.
        """
        now = time.time() if now is None else now
        known = known or {}
        dirs = self._subdirs()
        slugs = Counter(slug(p.name) for p in dirs)
        out = []
        root = self.root_path.resolve()
        self._hashed = 0
        for path in dirs:
            if not path.resolve().is_relative_to(root):
                why = f"a symlink that leads outside the adapter root ({path.resolve()}); ignored"
                out.append(Candidate(path.name, path, "invalid", reason=why))
                continue
            try:
                out.append(self._classify(path, now, known, slugs))
            except OSError as exc:
                out.append(Candidate(path.name, path, "invalid", reason=f"cannot read it: {exc}"))
            except Exception as exc:  # noqa: BLE001 - one odd folder must never stop the tick
                why = f"{type(exc).__name__}: {exc}"
                out.append(Candidate(path.name, path, "invalid", reason=why))
        return out

    def path_for(self, key: str) -> Path:
        """The directory whose name has the slug of `key`."""
        base, _ = split_key(key)
        root = self.root_path
        if not root.is_dir():
            raise AdapterError(f"adapter root {root} does not exist (looking for partition {key})")
        inside = root.resolve()
        matches = [
            p
            for p in self._subdirs()
            if slug(p.name) == base and p.resolve().is_relative_to(inside)
        ]
        if not matches:
            raise AdapterError(
                f"no directory in {root} matches partition {key}; "
                "was the adapter renamed or removed?"
            )
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise AdapterError(f"directories {names} in {root} all match partition {key}")
        return matches[0]

    def verify(self, key: str, *, check_finite: bool = True) -> AdapterInfo:
        """Read the adapter of `key` and check its weights are still the ones the key names.
        Within one resource lifetime (a run) an unchanged weights file is read once."""
        path = self.path_for(key)
        stamp = _stamp(path / WEIGHTS) or ""
        cached = self._verified.get((str(path), stamp))
        if cached is not None and stamp and (cached[1] or not check_finite):
            info = cached[0]
        else:
            info = read_adapter(path, check_finite=check_finite)
            self._verified[(str(path), stamp)] = (info, check_finite)
        if info.sha8 != split_key(key)[1]:
            raise AdapterError(
                f"weights of {path} changed since partition {key} was created; "
                "the new weights have their own partition"
            )
        return info

    def _subdirs(self) -> list[Path]:
        """Immediate subdirectories not starting with '.', sorted by name ([] without a root)."""
        root = self.root_path
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _classify(
        self,
        path: Path,
        now: float,
        known: Mapping[str, tuple[str, str]],
        slugs: Counter[str],
    ) -> Candidate:
        name = path.name
        recent = self._recently_modified(path, now)
        if recent:
            return Candidate(name, path, "writing", reason=f"still being written ({recent})")
        if not (path / CONFIG).is_file():
            return Candidate(name, path, "not_adapter", reason=f"not an adapter (no {CONFIG})")
        weights = path / WEIGHTS
        if not weights.is_file() and not (path / "adapter_model.bin").exists():
            return Candidate(
                name, path, "writing", reason=f"still being written (no {WEIGHTS} yet)"
            )
        if not slug(name):
            return Candidate(
                name, path, "invalid", reason="the name has no letters or digits; rename it"
            )
        if slugs[slug(name)] > 1:
            return Candidate(
                name,
                path,
                "invalid",
                reason=f"another directory has the same partition slug {slug(name)!r}; rename one",
            )
        stamp = _stamp(weights)
        cached = known.get(name)
        if stamp is not None and cached is not None and cached[0] == stamp:
            sha256, size = cached[1], weights.stat().st_size
        else:
            if self._hashed and self._hashed + weights.stat().st_size > self.hash_budget_bytes:
                why = f"queued: this tick already hashed {self._hashed / 1e9:.1f} GB of weights"
                return Candidate(name, path, "queued", reason=why)
            try:
                info = read_adapter(path, check_finite=False)
            except AdapterError as exc:
                return Candidate(name, path, "invalid", reason=str(exc))
            sha256, size = info.sha256, info.size_bytes
            self._hashed += size
        return Candidate(
            name,
            path,
            "ready",
            key=partition_key(name, sha256),
            sha256=sha256,
            size_bytes=size,
            reason="ready",
            stamp=stamp,
        )

    def _recently_modified(self, path: Path, now: float) -> str:
        """Why `path` looks unsettled ('' when every file is older than settle_seconds).

        Symlinks are not followed (a link to a large tree is not walked every tick) and a
        dangling one is not a file being written."""
        for folder, _, files in os.walk(path, followlinks=False):
            for name in files:
                f = Path(folder) / name
                try:
                    st = f.lstat()
                except FileNotFoundError:
                    return f"{f.relative_to(path)} vanished during the scan"
                age = now - st.st_mtime
                if stat.S_ISREG(st.st_mode) and age < self.settle_seconds:
                    return f"{f.relative_to(path)} modified {max(age, 0.0):.1f}s ago"
        return ""


def _stamp(weights: Path) -> str | None:
    """Identity of the weights file as the filesystem sees it (changes on any rewrite)."""
    try:
        st = weights.stat()
    except FileNotFoundError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
