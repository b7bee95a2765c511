"""Tables people read: one markdown writer, pandas' ``DataFrame.to_markdown`` (tabulate) in GitHub style,
and results over seeds as mean ± sample std.

Every table reads alike: floats to 4 significant digits, missing values empty, and any other cell
(a string a caller has already formatted, such as ``"1.50"``) exactly as given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd


def _cell(value) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):  # None, NaN, NaT, pd.NA
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", r"\|")  # a pipe would end the cell


def markdown_table(rows: pd.DataFrame | Iterable, columns: Sequence[str] | None = None) -> str:
    """``rows``, a DataFrame or an iterable of dicts (or of lists, with ``columns``), as a markdown table."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=columns)
    cells = table.map(_cell).rename(columns=str)
    return cells.to_markdown(index=False, tablefmt="github", disable_numparse=True)


def over_seeds(runs: pd.DataFrame, by: str | list[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per group of ``by`` (a configuration trained with several seeds): ``by``, then each
    metric's ``<metric>_mean`` and ``<metric>_std`` (pandas' sample std: empty for one seed), then ``n_seeds``."""
    grouped = runs.groupby(by, sort=False)
    table = grouped[list(metrics)].agg(["mean", "std"])
    table.columns = [f"{metric}_{statistic}" for metric, statistic in table.columns]
    return table.assign(n_seeds=grouped.size()).reset_index()


def plus_minus(mean: float, std: float | None) -> str:
    """``0.9712 ± 0.0011``: a mean over seeds and its sample std; the mean alone for one seed."""
    if pd.isna(mean):
        return ""
    return f"{mean:.4f}" + ("" if pd.isna(std) else f" ± {std:.4f}")


def with_spread(table: pd.DataFrame) -> pd.DataFrame:
    """A table of ``over_seeds`` to print: each ``<metric>_mean`` and ``<metric>_std`` as one ``<metric>`` cell."""
    shown = table.copy()
    for column in [c for c in table if c.endswith("_mean")]:
        name = column.removesuffix("_mean")
        shown.insert(shown.columns.get_loc(column), name, list(map(plus_minus, table[column], table[f"{name}_std"])))
        shown = shown.drop(columns=[column, f"{name}_std"])
    return shown
