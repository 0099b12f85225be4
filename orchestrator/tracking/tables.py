"""Markdown tables, written one way: pandas' ``DataFrame.to_markdown`` (tabulate's pipe format).

The search summary's ``trials.md`` and the reports (``normlab report --format markdown``,
``comparison.md``) all come from ``markdown_table``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def _escaped(value: object) -> str:
    return str(value).replace("|", "\\|")  # a `|` in a cell would end it


def markdown_table(frame: pd.DataFrame, right: Iterable[str] = ()) -> str:
    """``frame`` (its index left out) as a markdown table: each cell as ``str`` writes it (numbers
    formatted by the caller are not re-formatted), ``|`` escaped, the ``right`` columns
    right-aligned and every other column left-aligned."""
    right = set(right)
    cells = frame.map(_escaped)
    cells.columns = [_escaped(c) for c in frame.columns]
    aligns = tuple("right" if c in right else "left" for c in frame.columns)
    return cells.to_markdown(index=False, disable_numparse=True, colalign=aligns)
