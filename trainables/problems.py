"""Problem reports people read: one ``source: key.path: reason`` line each, bounded.

Whatever a hostile file or argument holds (a megabyte-long key, a thousand bad values),
a report stays short: values are shown through ``short_repr`` (at most ``MAX_REPR``
characters), a key path is cut at ``MAX_PATH`` characters and a reason at ``MAX_REASON``,
line breaks inside them are escaped, and at most ``MAX_PROBLEMS`` problems are listed,
then ``... and N more``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_PROBLEMS = 15
MAX_REPR = 80
MAX_PATH = 120
MAX_REASON = 400

Problem = tuple[str, str]  # (key path, or "" for the whole source; reason)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with ``...``."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``, ``\\x00``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises (huge ints, odd objects)."""
    if isinstance(value, str):
        return repr(clip(value, limit)) if len(value) > limit else repr(value)
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. int too large to print: say what it is instead
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def problem_lines(source: str, problems: Iterable[Problem], limit: int = MAX_PROBLEMS) -> str:
    """``source: path: reason`` lines (``path: reason`` without a source, ``source: reason``
    without a path), at most ``limit`` of them, then ``... and N more``."""
    problems = list(problems)
    prefix = f"{one_line(source)}: " if source else ""
    lines = []
    for path, reason in problems[:limit]:
        reason = one_line(clip(reason.strip().replace("\n", "; "), MAX_REASON))
        path = one_line(clip(path, MAX_PATH))
        lines.append(f"{prefix}{path}: {reason}" if path else f"{prefix}{reason}")
    if len(problems) > limit:
        lines.append(f"{prefix}... and {len(problems) - limit} more")
    return "\n".join(lines)
