"""The one markdown table writer: what a cell becomes, and a table that reads back."""

from __future__ import annotations

import math
import re

import pandas as pd

from pipeline.tables import markdown_table


def table_rows(markdown: str) -> list[dict]:
    """The rows of a markdown table, as dicts keyed by its header (escaped pipes are not split)."""
    lines = [re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in markdown.strip().splitlines()]
    lines = [[cell.strip() for cell in line] for line in lines]
    assert set("".join(lines[1])) == {"-"}  # the line under the header
    return [dict(zip(lines[0], line, strict=True)) for line in lines[2:]]


def test_cells_floats_to_4_digits_missing_empty_strings_as_given():
    frame = pd.DataFrame({"rank": [1, 2], "accuracy": [0.987654, math.nan], "ratio": ["1.50", "a|b"]})
    text = markdown_table(frame)
    assert table_rows(text) == [
        {"rank": "1", "accuracy": "0.9877", "ratio": "1.50"},  # a formatted string keeps its trailing zero
        {"rank": "2", "accuracy": "", "ratio": r"a\|b"},  # a pipe would end the cell
    ]
    assert markdown_table([[1, 0.987654, "1.50"], [2, None, r"a|b"]], columns=["rank", "accuracy", "ratio"]) == text
    assert markdown_table([], columns=["a", "b"]).splitlines()[0].split() == ["|", "a", "|", "b", "|"]
