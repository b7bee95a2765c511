"""The project's one markdown table writer: pandas' ``DataFrame.to_markdown`` (tabulate) in GitHub style.

Leaderboards, benchmark reports and the pipeline run's note all go through ``markdown_table``, so
every table reads alike: floats to 4 significant digits, missing values empty, and any other
cell (a string a caller has already formatted, such as ``"1.50"``) exactly as given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd


def _cell(value) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", r"\|")  # a pipe would end the cell


def markdown_table(rows: pd.DataFrame | Iterable, columns: Sequence[str] | None = None) -> str:
    """``rows``, a DataFrame or an iterable of dicts (or of lists, with ``columns``), as a markdown table."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=columns)
    cells = table.map(_cell).rename(columns=str)
    return cells.to_markdown(index=False, tablefmt="github", disable_numparse=True)
