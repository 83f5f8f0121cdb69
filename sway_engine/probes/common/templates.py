"""Format-string templates in a spec: only the named placeholders, each used whole."""

from __future__ import annotations

import string


def check_template(field: str, text: str, names: tuple[str, ...]) -> str:
    """`text` if it is a format string whose placeholders are exactly `names` (each at least
    once, nothing else: no `{message[0]}`, `{message.x}`, conversion or format spec, which
    would render part of the value or fail at run time); else ValueError naming the fix."""
    wanted = ", ".join(f"{{{n}}}" for n in names)
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{field} is not a valid format string ({exc}); use {wanted}") from exc
    used = set()
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in names or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(
                f"{field} may only hold {wanted} as written, not {{{shown}}} "
                "(double a brace for a literal one: {{ }})"
            )
        used.add(name)
    missing = [f"{{{n}}}" for n in names if n not in used]
    if missing:
        raise ValueError(f"{field} must contain {', '.join(missing)}")
    return text
