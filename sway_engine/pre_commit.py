"""`sway-gate-changed`, the entry of pre-commit's `sway-gate` hook: gate every adapter folder
among the changed files.

pre-commit appends the changed paths; an adapter is the nearest folder (the file's own or an
ancestor) holding adapter_config.json. Each is gated as `sway gate SPEC --adapter DIR` would,
and the exit code is the worst of theirs (0 ok, 1 a gate failed, 2 bad input, 3 a bug).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sway_engine import cli


def adapter_dirs(files: Sequence[str | Path]) -> list[Path]:
    """The adapter folders the files belong to, in first-seen order; files outside any
    adapter are left out."""
    found: list[Path] = []
    for file in files:
        path = Path(file)
        folder = next(
            (
                d
                for d in (path.parent, *path.parent.parents)
                if (d / "adapter_config.json").is_file()
            ),
            None,
        )
        if folder is not None and folder not in found:
            found.append(folder)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sway-gate-changed",
        description="Gate each adapter folder among FILES with a suite (pre-commit's sway-gate).",
    )
    parser.add_argument("--spec", required=True, help="the sway.yaml to gate with")
    parser.add_argument("--threshold", type=float, help="minimum overall (default: the spec's)")
    parser.add_argument("files", nargs="*", help="changed files (pre-commit passes them)")
    args = parser.parse_args(argv)
    dirs = adapter_dirs(args.files)
    if not dirs:
        print("sway-gate: no adapter among the changed files")
        return 0
    worst = 0
    for folder in dirs:
        print(f"sway-gate: {folder}")
        extra = ["--threshold", str(args.threshold)] if args.threshold is not None else []
        worst = max(worst, cli.main(["gate", args.spec, "--adapter", str(folder), *extra]))
    return worst


if __name__ == "__main__":
    sys.exit(main())
