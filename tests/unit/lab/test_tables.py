"""The one markdown-table writer."""

from __future__ import annotations

from epp_lab.tables import markdown_table, records_table, table_lines


def test_rows_rules_empty_cells_and_none() -> None:
    assert table_lines(["a", "b", "c"], [[1, "", None]]) == ["| a | b | c |", "|---|---|---|", "| 1 | | – |"]
    assert (
        markdown_table(["x", "y"], [["l", 2.5]], align=["l", "r"]) == "| x | y |\n|---|---:|\n| l | 2.5 |\n"
    )
    assert markdown_table(["x"], [], align="c") == "| x |\n|:---:|\n"


def test_records() -> None:
    rows = [{"arm": "epp", "rate": 800}, {"arm": "noop", "extra": 1}]
    assert records_table(rows) == "| arm | rate |\n|---|---|\n| epp | 800 |\n| noop | – |\n"
    assert records_table(rows, ["extra"]) == "| extra |\n|---|\n| – |\n| 1 |\n"
    assert records_table([]) == "(no rows)\n"
