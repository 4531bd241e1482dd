"""The one markdown-table writer of the project (benchmark reports, the demo's summary).

    markdown_table(["arm", "TTFT p90"], [["epp", "0.163 s"], ["round-robin", None]])
    records_table([{"arm": "epp", "rate": 800}, ...])          # columns = the first record's keys

A row is `| a | b |`; an empty cell is a single space (`| a | | c |`); None prints as an en dash; other
values print with `str()`, so callers format numbers themselves. `align` gives each column's alignment
("l", "r", "c"; default left, the plain `---`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

NONE = "–"
_RULES = {"l": "---", "r": "---:", "c": ":---:"}


def cell(value: Any) -> str:
    return NONE if value is None else str(value)


def table_lines(
    columns: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | Sequence[str] = ""
) -> list[str]:
    """The table's lines (header, rule, rows), without newlines."""
    if isinstance(align, str):
        align = [align or "l"] * len(columns)
    lines = [_row(columns), "|" + "|".join(_RULES[a] for a in align) + "|"]
    lines += [_row(r) for r in rows]
    return lines


def markdown_table(
    columns: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | Sequence[str] = ""
) -> str:
    """The table as text ending in a newline."""
    return "\n".join(table_lines(columns, rows, align)) + "\n"


def records_table(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    align: str | Sequence[str] = "",
) -> str:
    """A table of dicts: one column per key of `columns` (default: the first record's keys), missing keys
    print as None does; "(no rows)" when there are none."""
    if not records:
        return "(no rows)\n"
    keys = list(columns or records[0].keys())
    return markdown_table(keys, ([r.get(k) for k in keys] for r in records), align)


def _row(values: Iterable[Any]) -> str:
    cells = (cell(v) for v in values)
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
