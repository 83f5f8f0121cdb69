"""A suite: the validated sway.yaml (spec), its typed probe entries, where it came from and
its `.dlm` document. Loading reports every problem at once, each with its YAML path, before
any model loads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sway_engine import safe_yaml
from sway_engine.calibration import NullPlan, plan_for
from sway_engine.dlm import Document, load_dlm
from sway_engine.errors import SpecError
from sway_engine.probes.null_adapter import NullAdapterSpec
from sway_engine.probes.registry import Entry, validate_entry
from sway_engine.spec import Defaults, NullConfig, SuiteSpec, problems_of


@dataclass(frozen=True)
class Suite:
    """The sway.yaml one evaluation runs: spec, entries in declaration order, source file."""

    spec: SuiteSpec
    entries: tuple[Entry, ...]
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> Suite:
        """Read and validate a file; a missing or malformed `.dlm` fails here too, naming the
        document's path and line, not mid-run."""
        spec, entries = load_spec(path)
        suite = cls(spec, tuple(entries), Path(path).expanduser())
        suite.document  # noqa: B018 - parse the document now: a bad one is bad input
        return suite

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "<memory>"

    @property
    def spec_hash(self) -> str:
        return self.spec.spec_hash()

    @property
    def document(self) -> Document | None:
        """The suite's `.dlm` document (parsed once per process), or None."""
        return document_of(self.spec)

    def null_entry(self) -> Entry | None:
        return null_entry(list(self.entries))

    def plan(self) -> NullPlan | None:
        """The null-calibration plan, or None when the suite has no enabled null_adapter."""
        entry = self.null_entry()
        if entry is None:
            return None
        assert isinstance(entry.spec, NullAdapterSpec)
        return plan_for(entry.spec, self.spec.defaults.null)

    def weight(self, probe: str) -> float:
        return next((e.spec.weight for e in self.entries if e.spec.name == probe), 1.0)

    def order(self, probe: str) -> int:
        """Declaration position of `probe` (unknown names last)."""
        names = [e.spec.name for e in self.entries]
        return names.index(probe) if probe in names else len(names)

    def warnings(self) -> list[str]:
        return spec_warnings(list(self.entries), self.spec.defaults)


@functools.cache
def _load_document(path: str) -> Document:
    return load_dlm(path)


def document_of(spec: SuiteSpec) -> Document | None:
    """The spec's `.dlm` document (parsed once per process), or None without dlm_source."""
    return _load_document(spec.dlm_source) if spec.dlm_source else None


def null_entry(entries: list[Entry]) -> Entry | None:
    return next(
        (e for e in entries if isinstance(e.spec, NullAdapterSpec) and e.spec.enabled), None
    )


def load_spec(path: str | Path) -> tuple[SuiteSpec, list[Any]]:
    """Read and validate a sway.yaml: the suite and each probe entry's typed spec.

    Raises SpecError listing every problem (top level and every probe entry) at once.
    """
    source = str(path)
    try:
        path = Path(path).expanduser()
        source = str(path)
        data = safe_yaml.load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError([("<file>", f"cannot read: {exc.strerror or exc}")], source=source) from exc
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        raise SpecError([("<file>", why)], source=source) from exc
    except yaml.YAMLError as exc:
        raise SpecError([("<file>", f"invalid YAML: {exc}")], source=source) from exc
    except (RuntimeError, ValueError) as exc:  # `~user` unknown, a NUL byte in the path
        raise SpecError([("<file>", f"cannot read: {exc}")], source=source) from exc
    return parse_spec(data, source=source, base_dir=path.resolve().parent)


def parse_spec(
    data: Any, *, source: str = "<memory>", base_dir: Path | None = None
) -> tuple[SuiteSpec, list[Any]]:
    data = _null_key(data)
    if not isinstance(data, dict):
        raise SpecError([("<root>", "the spec must be a YAML mapping")], source=source)
    loop = _self_containing(data)
    if loop is not None:
        why = "holds itself (a YAML alias inside its own anchor); write the value out"
        raise SpecError([(loop, why)], source=source)
    problems: list[tuple[str, str]] = []
    spec: SuiteSpec | None = None
    try:
        spec = SuiteSpec.model_validate(_resolve_paths(data, base_dir))
    except ValidationError as exc:
        problems += problems_of(exc)
    entries: list[Any] = []
    raw_suite = data.get("suite")
    if isinstance(raw_suite, list):
        seen: set[str] = set()
        for i, raw in enumerate(raw_suite):
            entry, errs = validate_entry(raw, f"suite[{i}]")
            problems += errs
            entries.append(entry)
            name = raw.get("name") if isinstance(raw, dict) else None
            if isinstance(name, str):
                if name in seen:
                    problems.append((f"suite[{i}].name", f"duplicate probe name {name!r}"))
                seen.add(name)
    if problems or spec is None:
        raise SpecError(problems, source=source)
    return spec, [_with_alpha(e, spec.defaults.alpha) for e in entries]


def _self_containing(data: Any) -> str | None:
    """The YAML path of the first mapping or list that contains itself, or None. (A spec
    with such a loop validates, then cannot be hashed or written.)"""
    done: set[int] = set()

    def walk(value: Any, path: str, open_: frozenset[int]) -> str | None:
        if not isinstance(value, dict | list) or id(value) in done:
            return None
        if id(value) in open_:
            return path or "<root>"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            step = f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
            found = walk(child, path + step, open_ | {id(value)})
            if found is not None:
                return found
        done.add(id(value))
        return None

    return walk(data, "", frozenset())


def _null_key(data: Any) -> Any:
    """`defaults: {null: {...}}` written in plain YAML: `null` is YAML's None, so the key
    arrives as None (users saw "defaults.None: Keys should be strings"). Read it as "null";
    `nulls:` and the quoted `"null":` work too."""
    if not isinstance(data, dict) or not isinstance(data.get("defaults"), dict):
        return data
    defaults = dict(data["defaults"])
    for alias in (None, "nulls"):
        if alias in defaults:
            if "null" in defaults:
                continue  # both given: pydantic reports the unknown key
            defaults["null"] = defaults.pop(alias)
    return {**data, "defaults": defaults}


def _with_alpha(entry: Any, alpha: float) -> Any:
    """The entry with the suite's alpha where it sets none of its own."""
    if entry is None or getattr(entry.spec, "alpha", 0.0) is not None:
        return entry
    return replace(entry, spec=entry.spec.model_copy(update={"alpha": alpha}))


# The nulls to suggest: sway's default count (defaults.null.seeds may be the too-small one).
_RECOMMENDED_NULLS = NullConfig.model_fields["seeds"].default


def spec_warnings(entries: list[Any], defaults: Defaults) -> list[str]:
    """What loads but weakens the verdict: a null_adapter with too few runs to calibrate."""
    from sway_engine import stats

    out = []
    for e in entries:
        if e is None or e.spec.kind != "null_adapter" or not e.spec.enabled:
            continue
        runs = getattr(e.spec, "runs", None) or defaults.null.seeds
        if runs < stats.MIN_NULLS:
            if runs >= 2:
                rate = stats.student_t_sf(3.0 / math.sqrt(1 + 1 / runs), runs - 1)
                cost = (
                    f"a z >= 3 rule on {runs} nulls would PASS {rate:.1%} of random adapters "
                    "(0.13% is what '3 sigma' promises)"
                )
            else:
                cost = "one null has no spread, so a z-score cannot be formed at all"
            out.append(
                f"{e.spec.name}: runs: {runs} is too few to calibrate ({cost}); calibrated "
                f"probes report WARN uncalibrated. Use runs: {_RECOMMENDED_NULLS} or more."
            )
    return out


def _resolve_paths(data: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Make relative local paths (models, adapter, dlm_source) relative to the spec file."""
    if base_dir is None:
        return data
    source = data.get("dlm_source")
    if isinstance(source, str) and not Path(source).is_absolute():
        data = {**data, "dlm_source": _resolved(base_dir, source)}
    if not isinstance(data.get("models"), dict):
        return data
    models = dict(data["models"])
    for side in ("base", "ft"):
        m = models.get(side)
        if not isinstance(m, dict):
            continue
        m = dict(m)
        for key in ("base", "adapter"):
            value = m.get(key)
            if isinstance(value, str) and value.startswith((".", "~")):
                m[key] = _resolved(base_dir, value)
        models[side] = m
    return {**data, "models": models}


def _resolved(base_dir: Path, value: str) -> str:
    """`value` made absolute against `base_dir`, `~` expanded; as written when this system
    cannot resolve it (`~nobody`, a NUL byte, a symlink loop): loading it then fails by name."""
    try:
        return str((base_dir / Path(value).expanduser()).resolve())
    except (OSError, RuntimeError, ValueError):
        return value
