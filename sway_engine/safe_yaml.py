"""YAML that users write (sway.yaml, a `.dlm` front matter), read with PyYAML's safe loader.

PyYAML's safe constructors leak plain Python errors on some scalars (`2020-13-01` is a
ValueError, `!!bool maybe` a KeyError, `!!int ''` an IndexError) and deep nesting is a
RecursionError; here every failure is a `yaml.YAMLError`, with the line of the bad value.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import Node, ScalarNode


class _Loader(yaml.SafeLoader):
    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (AttributeError, LookupError, OverflowError, TypeError, ValueError) as exc:
            shown = repr(node.value) if isinstance(node, ScalarNode) else "this value"
            kind = str(node.tag).rsplit(":", 1)[-1]
            why = f": {exc}" if isinstance(exc, ValueError) else ""
            raise ConstructorError(
                None,
                None,
                f"{shown} is not a valid {kind}{why}; quote it if it is text",
                node.start_mark,
            ) from exc


def load(text: str) -> Any:
    """`yaml.safe_load(text)`; any failure is a `yaml.YAMLError`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError as exc:
        raise yaml.YAMLError("nested too deeply to read; flatten the structure") from exc
