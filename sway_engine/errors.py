"""Typed errors. Each names what is wrong (a path, a field, a tensor) and what to do."""

from __future__ import annotations


class SwayError(Exception):
    """Base of every error sway raises on purpose."""


class SpecError(SwayError):
    """A sway.yaml is invalid. `problems` lists every (yaml_path, message) found."""

    def __init__(self, problems: list[tuple[str, str]], *, source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        lines = [f"  {path}: {msg}" for path, msg in problems]
        super().__init__(f"{head}{len(problems)} problem(s) in spec\n" + "\n".join(lines))


class BackendError(SwayError):
    """A backend could not load or answer (missing extra, bad model path, endpoint down)."""


class AdapterError(SwayError):
    """An adapter directory is missing, truncated, mismatched or holds non-finite weights."""


class ProbeError(SwayError):
    """A probe could not compute its metric (distinct from a FAIL verdict)."""

    def __init__(self, probe: str, message: str) -> None:
        self.probe = probe
        super().__init__(f"{probe}: {message}")


class ProbeSkip(SwayError):
    """A probe cannot run here for a reason that is not a fault: an optional extra is not
    installed, or an input it reads does not exist. The runner reports SKIP with this message
    (say what to install or provide)."""

    def __init__(self, probe: str, message: str) -> None:
        self.probe = probe
        super().__init__(f"{probe}: {message}")
